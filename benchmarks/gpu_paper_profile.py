"""Where the paper workload's time goes on one GPU (diagnostics, not the benchmark of record).

python benchmarks/gpu_paper_profile.py [--out DIR] [--n 600] [--sections cold,loop,profile,steps]

* ``cold``: a fresh process's first engine call, split into the compile of each fused function, the
  Triton sampling kernel, graph capture and the rest;
* ``loop``: continuous batching over ``--n`` paper requests with the loop's own counters (steps, graph
  replays, eager steps, prefill time, host waits) and the engine's ``graph_error`` if any;
* ``steps``: one decode step at full batch and long KV, eager vs replayed graph;
* ``profile``: ``torch.profiler`` kernel table of a few decode steps.
Writes ``paper_profile.json`` to ``--out``.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--max-new", type=int, default=1000)
    ap.add_argument("--sections", default="cold,loop,steps,profile")
    ap.add_argument("--model", default="qwen7b-shape")
    ap.add_argument("--loop-modes", default="auto:auto,auto:never", help="fused:graphs pairs")
    ap.add_argument("--cold-modes", default="compile,compile,triton", help="fresh processes (a repeated mode reuses its cache)")
    a = ap.parse_args()
    import torch

    res: dict = {"sections": a.sections}
    secs = a.sections.split(",")
    t0 = time.perf_counter()
    lm = _bench.build_model(a.model)
    _bench.sync(lm)
    res["build_s"] = time.perf_counter() - t0
    res["info"] = _bench.device_info(lm)
    res["ceilings"] = _bench.ceilings(lm)
    from harness.engine import Engine

    def timed(fn):
        _bench.sync(lm)
        t = time.perf_counter()
        r = fn()
        _bench.sync(lm)
        return time.perf_counter() - t, r

    def save():
        with open(os.path.join(a.out, "paper_profile.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)

    w = _bench.PaperWork(n=a.n, max_new=a.max_new, rounds=1)
    if "attn" in secs:
        try:
            from harness.engine.attention import engine_attention
            from harness.engine.kernels import decode_attention_cuda

            g = torch.Generator(device="cuda").manual_seed(0)
            errs = {}
            for B, Kc in ((512, 1088), (3, 1088), (64, 200)):
                Hq, Hk, D = 28, 4, 128
                q = torch.randn(B, 1, Hq, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
                kc = torch.randn(B, Hk, Kc + 64, D, device="cuda", generator=g).to(torch.bfloat16)
                vc = torch.randn_like(kc)
                lengths = torch.randint(1, Kc + 1, (B,), device="cuda", generator=g)
                valid = torch.arange(Kc, device="cuda")[None] < lengths[:, None]
                valid &= torch.rand(B, Kc, device="cuda", generator=g) > 0.2  # holes (left padding)
                valid[torch.arange(B), lengths - 1] = True
                mask = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
                ref, _ = engine_attention(None, q, kc[:, :, :Kc], vc[:, :, :Kc], mask, scaling=D ** -0.5)
                got = decode_attention_cuda(q, kc[:, :, :Kc], vc[:, :, :Kc], mask, lengths, D ** -0.5)
                full = decode_attention_cuda(q, kc[:, :, :Kc], vc[:, :, :Kc], mask, None, D ** -0.5)
                errs[f"{B}x{Kc}"] = {"max_abs_err": float((got.float() - ref.float()).abs().max()),
                                     "max_abs_err_no_lengths": float((full.float() - ref.float()).abs().max()),
                                     "ref_abs_mean": float(ref.float().abs().mean())}
            res["attn"] = errs
            print("ATTN", json.dumps(errs), flush=True)
        except Exception:
            res["attn_error"] = traceback.format_exc()[-3000:]
            print(res["attn_error"])
        save()
    if "cold" in secs:
        import subprocess
        import tempfile

        code = ("import json,sys,time; sys.path.insert(0, %r); import _bench, torch\n"
                "from harness.engine import Engine\n"
                "t0=time.perf_counter(); lm=_bench.build_model('qwen7b-shape'); _bench.sync(lm); t1=time.perf_counter()\n"
                "w=_bench.PaperWork(n=200, max_new=256, rounds=1)\n"
                "Engine.for_model(lm, fused=%r)\n"
                "def go():\n"
                "  t=time.perf_counter(); p=_bench.paper_prompts(lm, w)\n"
                "  eng=Engine.for_model(lm, fused=%r)\n"
                "  with torch.inference_mode(): eng.generate(p, 256, temperature=1.0, seeds=list(range(len(p))), ignore_eos=True)\n"
                "  _bench.sync(lm); return time.perf_counter()-t\n"
                "a=go(); b=go(); print('COLDJSON'+json.dumps({'build_s':t1-t0,'first_s':a,'warm_s':b,'stats':{k:v for k,v in Engine.for_model(lm, fused=%r).stats.items() if k!='continuous'}}))\n")
        dirs: dict = {}
        out = []
        for mode in a.cold_modes.split(","):
            reuse = mode in dirs
            d = dirs.setdefault(mode, tempfile.mkdtemp(prefix=f"cc-{mode}-"))
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(d, "inductor"),
                   "TRITON_CACHE_DIR": os.path.join(d, "triton")}
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", code % (os.path.dirname(os.path.abspath(__file__)), mode, mode, mode)],
                               capture_output=True, text=True, env=env)
            line = next((x for x in p.stdout.splitlines() if x.startswith("COLDJSON")), None)
            r = json.loads(line[8:]) if line else {"error": p.stderr[-2000:]}
            r.update(mode=mode, disk_cache="warm" if reuse else "empty", process_s=time.perf_counter() - t)
            if "first_s" in r:
                r["first_minus_warm_s"] = r["first_s"] - r["warm_s"]
            out.append(r)
            print("COLD", json.dumps(r)[:1500], flush=True)
        res["cold"] = out
        save()
    if "loop" in secs:
        for pair in a.loop_modes.split(","):
            fm, gm = pair.split(":")
            try:
                Engine.for_model(lm, graphs=gm, fused=fm).stats.clear()

                def go():
                    prompts = _bench.paper_prompts(lm, w)
                    seeds = [(i * 0x9E3779B97F4A7C15) & ((1 << 62) - 1) for i in range(len(prompts))]
                    eng = Engine.for_model(lm, graphs=gm, fused=fm)
                    with torch.inference_mode():
                        outs = eng.generate(prompts, w.max_new, temperature=1.0, seeds=seeds,
                                            stop_ids=_bench.paper_stop_ids(lm, w), pad_id=0)
                    return prompts, outs, eng
                go() if a.n <= 64 else None
                t, (prompts, outs, eng) = timed(go)
                lengths = [len(o.ids) + (o.finish_reason == "stop") for o in outs]
                floor = _bench.paper_floor(lm, prompts, lengths)
                res[f"loop_{fm}_{gm}"] = {"seconds": t, "floor_s": floor, "ratio": t / floor,
                                          "tokens": sum(lengths), "stats": dict(eng.stats)}
                print("LOOP", pair, json.dumps(res[f"loop_{fm}_{gm}"], default=str)[:3000], flush=True)
            except Exception:
                res[f"loop_error_{pair}"] = traceback.format_exc()[-3000:]
                print(res[f"loop_error_{pair}"])
            save()
    if "steps" in secs or "profile" in secs:
        try:
            from harness.engine.decode import Continuous
            from harness.models.blockcall import BlockCall

            B, P, kvlen = 512, 100, 1024
            for mode in ("never", "auto"):
                eng = Engine.for_model(lm, graphs=mode)
                dec = eng.decoder
                import random

                rng = random.Random(0)
                prompts = [[rng.randrange(10, 30000) for _ in range(P)] for _ in range(B)]
                c = Continuous(dec, B, eng._capacity(P, kvlen), kvlen, 1.0, 1.0, [], 0, True, B)
                call = BlockCall(mask=None, prefill=False, rows=None, n=B)
                with torch.inference_mode(), eng.attention(), eng.fused_ctx():
                    c.enter(list(range(B)), list(range(B)), prompts, list(range(B)), 1, call)
                    c.wp.fill_(kvlen - 80)  # long rows: the step reads ~kvlen slots
                    c.cache.kv_len = kvlen
                    if mode == "auto":
                        g = c.capture((c.B, kvlen), call)
                        step = g.replay if g is not None else (lambda: c.step(call))
                        res["steps_graph_error"] = eng.stats.get("graph_error")
                    else:
                        def step():
                            c.step(call)
                    for _ in range(3):
                        step()
                        c.wp.fill_(kvlen - 80)
                    res[f"step_ms_{mode}"] = timed(lambda: [step() for _ in range(20)])[0] / 20 * 1e3
                    # rows at mixed lengths (as in continuous batching): the Triton attention reads less
                    c.wp.copy_(torch.randint(P, kvlen - 40, (B,), device=c.wp.device))
                    res[f"step_ms_{mode}_mixed"] = timed(lambda: [step() for _ in range(20)])[0] / 20 * 1e3
                    # host time to issue one eager step (no sync)
                    if mode == "never":
                        _bench.sync(lm)
                        t = time.perf_counter()
                        for _ in range(5):
                            c.step(call)
                        res["step_host_issue_ms"] = (time.perf_counter() - t) / 5 * 1e3
                        _bench.sync(lm)
                    if mode == "never" and "profile" in secs:
                        from torch.profiler import ProfilerActivity, profile as prof

                        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                            for _ in range(3):
                                c.step(call)
                            _bench.sync(lm)
                        res["profile_step"] = p.key_averages().table(sort_by="cuda_time_total", row_limit=30)
                        print(res["profile_step"][:7000], flush=True)
                print("STEP", mode, res.get(f"step_ms_{mode}"), res.get(f"step_ms_{mode}_mixed"),
                      res.get("step_host_issue_ms"), flush=True)
                del c
                eng.decoder.reset()
                torch.cuda.empty_cache()
        except Exception:
            res["steps_error"] = traceback.format_exc()[-3000:]
            print(res["steps_error"])
        save()
    res["total_s"] = time.perf_counter() - t0
    save()
    print("DONE", res["total_s"])


if __name__ == "__main__":
    main()
