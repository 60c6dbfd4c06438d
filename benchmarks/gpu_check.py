"""One-shot GPU check and timing of the fast engine on the Qwen2.5-7B-shaped model.

python benchmarks/gpu_check.py [--out DIR] [--skip-baselines] [--sections correct,...] [--dtype float32]
Diagnostics, not the benchmark (timings of record come from ``pytest benchmarks/``). Prints correctness (greedy tokens vs HF generate, vectors vs the reference extractor), timings
of every path, the floor and a profile of the decode loop; writes gpu_check.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
import _bench  # noqa: E402


def timed(fn, lm):
    _bench.sync(lm)
    t = time.perf_counter()
    r = fn()
    _bench.sync(lm)
    return time.perf_counter() - t, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="qwen7b-shape")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--sections", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--dtype", default=None, help="float32 to check greedy exactness without bf16 rounding")
    a = ap.parse_args()
    import torch

    res: dict = {}
    t0 = time.perf_counter()
    lm = _bench.build_model(a.model, dtype=a.dtype)
    res["build_s"] = time.perf_counter() - t0
    res["info"] = _bench.device_info(lm)
    res["ceilings"] = _bench.ceilings(lm)
    w = _bench.work_for(a.model, smoke=False)
    res["work"] = w.__dict__
    res["floor_gen_s"] = _bench.gen_floor(lm, w)
    res["floor_extract_s"] = _bench.extract_floor(lm, w)
    print(json.dumps(res, indent=1), flush=True)
    prompts = _bench.prompts_for(lm, w)
    examples = _bench.examples_for(lm, w)

    def section(name, fn):
        try:
            fn()
        except Exception:
            res[name + "_error"] = traceback.format_exc()[-2000:]
            print(res[name + "_error"], flush=True)
        print(name, {k: v for k, v in res.items() if k.startswith(name)}, flush=True)
        with open(os.path.join(a.out, "gpu_check.json"), "w") as fh:
            json.dump(res, fh, indent=1, default=str)

    def sampling():
        """Fused Triton Gumbel-max vs harness.models.sampling.sample_tokens on this device: tokens must be equal."""
        from harness.engine import gumbel_argmax_cuda, sample_step
        from harness.models.sampling import sample_tokens

        g = torch.Generator(device=lm.device).manual_seed(0)
        V = lm.model.config.vocab_size
        bad, total = 0, 0
        for trial in range(3):
            logits = (torch.randn(w.n, V, device=lm.device, generator=g) * (1 + 3 * trial)).to(lm.dtype)
            seeds = torch.randint(0, 2**62, (w.n,), device=lm.device, generator=g)
            for step in (0, 1, 17, 255):
                for temp in (1.0, 0.7, 1.3):
                    a = sample_tokens(logits, seeds, step, temp)
                    b = gumbel_argmax_cuda(logits, seeds, torch.tensor([step], device=lm.device), temp)
                    bad += int((a != b).sum())
                    total += a.numel()
        res["sampling_fused_mismatches"] = bad
        res["sampling_fused_checked"] = total
        logits = torch.randn(w.n, V, device=lm.device, generator=g).to(lm.dtype)
        seeds = torch.randint(0, 2**62, (w.n,), device=lm.device, generator=g)
        st = torch.tensor([3], device=lm.device)
        for name, fn in (("torch", lambda: sample_step(logits, seeds, st, 1.0)),
                         ("fused", lambda: gumbel_argmax_cuda(logits, seeds, st, 1.0))):
            fn()
            ts = [timed(fn, lm)[0] for _ in range(20)]
            res[f"sampling_{name}_ms"] = 1000 * sorted(ts)[10]

    def correct():
        sub = prompts[:16]
        ref = _bench.hf_generate(lm, sub, 32)
        got = _bench.fast_generate(lm, sub, 32, temperature=0.0)
        same = sum(x == y for r, g in zip(ref, got) for x, y in zip(r, g))
        prefix = [next((i for i, (x, y) in enumerate(zip(r, g)) if x != y), len(r)) for r, g in zip(ref, got)]
        res["correct_greedy_token_match"] = same / sum(len(r) for r in ref)
        res["correct_greedy_rows_identical"] = sum(r == g for r, g in zip(ref, got))
        res["correct_greedy_first_diff"] = prefix
        res["correct_greedy_divergence_gaps"] = divergence_gaps(sub, ref, got, prefix)
        ex = examples[:16]
        r, _ = _bench.ref_extract(lm, ex, 8)
        f, _ = _bench.fast_extract(lm, ex)
        res["correct_extract_rel_err"] = {k: float((f[k] - r[k]).norm() / r[k].norm()) for k in r}
        # a forward hook fires on the fast path (eager decode, graphs off while hooks are present)
        calls = []
        h = lm.model.model.layers[len(lm.model.model.layers) // 2].register_forward_hook(lambda m, i, o: calls.append(1))
        _bench.fast_generate(lm, sub[:2], 4, temperature=0.0)
        h.remove()
        res["correct_hook_calls"] = len(calls)
        # sampled tokens, fused vs unfused engine (compiled norms change bf16 rounding: a match fraction)
        a = _bench.fast_generate(lm, sub, 32, temperature=1.0, fused="off")
        b = _bench.fast_generate(lm, sub, 32, temperature=1.0)
        res["correct_sampled_fused_vs_off_match"] = sum(x == y for r, q in zip(a, b) for x, y in zip(r, q)) / (16 * 32)
        fo, _ = _bench.fast_extract(lm, ex, fused="off")
        res["correct_extract_fused_vs_off_rel_err"] = {k: float((f[k] - fo[k]).norm() / fo[k].norm()) for k in fo}
        res["correct_extract_off_vs_ref_rel_err"] = {k: float((fo[k] - r[k]).norm() / r[k].norm()) for k in r}
        got = _bench.fast_generate(lm, sub, 32, temperature=0.0, fused="off")
        res["correct_greedy_token_match_off"] = sum(x == y for r_, g in zip(ref, got) for x, y in zip(r_, g)) / sum(
            len(r_) for r_ in ref)
        # which fused function moves the vectors: one at a time (the others forced eager)
        from harness.engine import Engine, fused_impl

        fz = fused_impl("compile")
        _bench.fast_extract(lm, ex, fused="compile")  # compiles the elementwise functions
        keys = [k for k in fz.fns if k not in fz.errors]
        for k in keys:
            saved = dict(fz.errors)
            fz.errors.update({o: "diag-off" for o in keys if o != k})
            try:
                g1, _ = _bench.fast_extract(lm, ex, fused="compile")
            finally:
                fz.errors.clear()
                fz.errors.update(saved)
                Engine.for_model(lm, fused="compile").stats.pop("fused_errors", None)
            res[f"correct_extract_only_{k}_rel_err"] = max(float((g1[m] - fo[m]).norm() / fo[m].norm()) for m in fo)

    def fast_gen():
        from harness.engine import Engine

        cold, _ = timed(lambda: _bench.fast_generate(lm, prompts, w.new_tokens), lm)
        warm = [timed(lambda: _bench.fast_generate(lm, prompts, w.new_tokens), lm)[0] for _ in range(3)]
        res["fast_gen_cold_s"] = cold
        res["fast_gen_s"] = sorted(warm)[1]
        res["fast_gen_all_s"] = warm
        res["fast_gen_tok_per_s"] = w.n * w.new_tokens / res["fast_gen_s"]
        res["fast_gen_stats"] = dict(Engine.for_model(lm).stats)
        greedy = [timed(lambda: _bench.fast_generate(lm, prompts, w.new_tokens, temperature=0.0), lm)[0]
                  for _ in range(2)]
        res["fast_gen_greedy_s"] = min(greedy)

    def unfused():
        """The same engine without the fused kernels (the previous version), same card, same run."""
        res["unfused_gen_s"] = min(timed(lambda: _bench.fast_generate(lm, prompts, w.new_tokens, fused="off"), lm)[0]
                                   for _ in range(2))
        res["unfused_extract_s"] = min(timed(lambda: _bench.fast_extract(lm, examples, fused="off"), lm)[0]
                                       for _ in range(2))

    def divergence_gaps(sub, ref, got, prefix):
        """Where the engine's greedy token differs from HF's, the HF model's logit gap between the two
        tokens at that position (teacher-forced on HF's prefix) and the logits' spread: a gap at the
        rounding level means a near-tie, not a wrong token."""
        out = []
        for p, r, g, i in zip(sub, ref, got, prefix):
            if i >= len(r):
                continue
            ids = torch.tensor([p + r[:i]], device=lm.device)
            with torch.inference_mode():
                lg = lm.model(ids).logits[0, -1].float()
            out.append({"pos": i, "gap": float(lg[r[i]] - lg[g[i]]), "logit_std": float(lg.std()),
                        "top1_minus_top2": float(lg.topk(2).values.diff().abs())})
        return out

    def fast_ext():
        from harness.engine import Engine

        cold, _ = timed(lambda: _bench.fast_extract(lm, examples), lm)
        warm = [timed(lambda: _bench.fast_extract(lm, examples), lm)[0] for _ in range(3)]
        res["fast_extract_cold_s"] = cold
        res["fast_extract_s"] = sorted(warm)[1]
        res["fast_extract_stats"] = dict(Engine.for_model(lm).stats)

    def profile():
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            _bench.fast_generate(lm, prompts, 64)
            _bench.sync(lm)
        res["profile_gen64"] = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            _bench.fast_extract(lm, examples)
            _bench.sync(lm)
        res["profile_extract"] = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(res["profile_gen64"][:6000])
        print(res["profile_extract"][:6000])

    def baselines():
        t, _ = timed(lambda: _bench.ref_extract(lm, examples, 16), lm)
        res["baseline_ref_extract_bs16_s"] = t
        t, _ = timed(lambda: _bench.ref_extract(lm, examples[:20], 1), lm)
        res["baseline_seed_extract_s_scaled"] = t * w.n / 20
        t, _ = timed(lambda: _bench.hf_generate(lm, prompts, w.new_tokens), lm)
        res["baseline_hf_generate_all_s"] = t
        t, _ = timed(lambda: _bench.seed_generate(lm, prompts[:1], 64), lm)
        res["baseline_seed_generate_s_scaled"] = t * w.n * w.new_tokens / 64

    want = set(filter(None, a.sections.split(",")))
    for name, fn in (("sampling", sampling), ("correct", correct), ("fast_gen", fast_gen), ("fast_extract", fast_ext),
                     ("profile", profile), ("unfused", unfused), ("baseline", baselines)):
        if (not want or name in want) and not (name == "baseline" and a.skip_baselines):
            section(name, fn)
    keys = ["sampling_fused_mismatches", "sampling_fused_checked", "sampling_torch_ms", "sampling_fused_ms",
            "correct_sampled_fused_vs_off_match", "correct_extract_fused_vs_off_rel_err", "correct_extract_off_vs_ref_rel_err",
            "correct_greedy_token_match_off", "correct_greedy_divergence_gaps",
            "unfused_gen_s", "unfused_extract_s", "fast_gen_stats", "fast_extract_stats", "fast_gen_s", "fast_gen_cold_s", "fast_gen_greedy_s", "fast_extract_s", "floor_gen_s", "floor_extract_s",
            "baseline_hf_generate_all_s", "baseline_ref_extract_bs16_s", "baseline_seed_extract_s_scaled",
            "baseline_seed_generate_s_scaled", "correct_greedy_token_match", "correct_greedy_rows_identical",
            "correct_extract_rel_err", "correct_hook_calls"]
    print("SUMMARY", res["info"], res["ceilings"])
    for k in keys:
        print(f"{k:36s} {res.get(k)}")


if __name__ == "__main__":
    main()
