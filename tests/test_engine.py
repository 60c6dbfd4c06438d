"""The fast engine on CPU: greedy tokens equal HF generate, vectors equal the reference extractor,
forward hooks fire on the fast path, sampling equals harness.models.sampling, OOM halves the batch."""

from __future__ import annotations

import pytest

from harness.engine import Engine, sample_step
from harness.models.loading import end_token_ids, prompt_ids
from harness.models.sampling import sample_tokens

QUESTIONS = ["What is the capital of France?", "Tell me a joke.", "Why is the sky blue?",
             "Give me one tip for sleeping well."]


def _prompts(tok, n=4):
    return [prompt_ids(tok, [{"role": "system", "content": f"You are assistant number {i}."},
                             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i % 2)}])
            for i in range(n)]


def _hf_greedy(lm, prompts, max_new):
    import torch
    from transformers import GenerationConfig

    tok = lm.tokenizer
    ends = end_token_ids(tok, lm.model)
    pad = tok.pad_token_id
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=ends, pad_token_id=pad)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    res = []
    for row in out[:, P:].tolist():
        cut = next((k for k, x in enumerate(row) if x in ends), None)
        res.append(row[:cut] if cut is not None else row)
    return res


def _fast_greedy(lm, prompts, max_new, **kw):
    tok = lm.tokenizer
    eng = Engine(lm, **kw)
    outs = eng.generate(prompts, max_new, temperature=0.0, stop_ids=end_token_ids(tok, lm.model),
                        pad_id=tok.pad_token_id)
    return [o.ids for o in outs], eng


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_greedy_equals_hf_generate_tiny(embedded_dir, model_type):
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=64, seed=3, model_type=model_type)
    prompts = _prompts(lm.tokenizer, 4)
    ref = _hf_greedy(lm, prompts, 20)
    got, _ = _fast_greedy(lm, prompts, 20)
    assert got == ref
    assert all(len(r) > 0 for r in ref)


@pytest.mark.slow
def test_greedy_equals_hf_generate_embedded(embedded_lm):
    prompts = _prompts(embedded_lm.tokenizer, 3)
    ref = _hf_greedy(embedded_lm, prompts, 12)
    got, _ = _fast_greedy(embedded_lm, prompts, 12, max_batch=2)  # two batches: 2 + 1 rows
    assert got == ref


def test_batch_composition_does_not_change_tokens(tiny_lm):
    import random

    prompts = _prompts(tiny_lm.tokenizer, 4)
    eng = Engine(tiny_lm)
    seeds = [random.Random(i).getrandbits(60) for i in range(4)]
    kw = dict(temperature=1.0, stop_ids=[], pad_id=0)
    together = eng.generate(prompts, 10, seeds=seeds, **kw)
    alone = [eng.generate([p], 10, seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert [o.ids for o in together] == [o.ids for o in alone]


def test_sample_step_equals_harness_sampling():
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 301, generator=g)
    seeds = torch.tensor([1, 2, 3, 2**61 + 5, 77], dtype=torch.long)
    for step in (0, 1, 17, 255):
        for temp, top_p in ((1.0, 1.0), (0.7, 0.9)):
            a = sample_tokens(logits, seeds, step, temp, top_p)
            b = sample_step(logits, seeds, torch.tensor([step]), temp, top_p)
            assert torch.equal(a, b)


def test_forward_hook_fires_and_steers_on_fast_path(tiny_lm):
    """A forward hook on model.model.layers[i] changes the fast path's tokens, as in HF generate."""
    import torch

    prompts = _prompts(tiny_lm.tokenizer, 2)
    calls = []
    vec = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(1)) * 50

    def hook(mod, args, out):
        calls.append(1)
        return out + vec if isinstance(out, torch.Tensor) else (out[0] + vec, *out[1:])

    h = tiny_lm.model.model.layers[1].register_forward_hook(hook)
    try:
        ref = _hf_greedy(tiny_lm, prompts, 8)
        n_hf = len(calls)
        got, eng = _fast_greedy(tiny_lm, prompts, 8)
    finally:
        h.remove()
    assert len(calls) > n_hf > 0  # the hook ran on the fast path too
    plain, _ = _fast_greedy(tiny_lm, prompts, 8)
    assert got == ref and got != plain


def test_oom_halves_the_batch_fake_oom(tiny_lm, monkeypatch):
    """Injected out-of-memory errors (CPU cannot run out for real): the batch halves, results unchanged."""
    from harness.engine import out_of_memory_error

    prompts = _prompts(tiny_lm.tokenizer, 4)
    ref, _ = _fast_greedy(tiny_lm, prompts, 6)
    eng = Engine(tiny_lm, continuous=False)
    real = eng._generate_batch
    sizes = []

    def flaky(batch, *a, **k):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise out_of_memory_error()("CUDA out of memory (injected)")
        return real(batch, *a, **k)

    monkeypatch.setattr(eng, "_generate_batch", flaky)
    outs = eng.generate(prompts, 6, temperature=0.0, stop_ids=end_token_ids(tiny_lm.tokenizer, tiny_lm.model),
                        pad_id=tiny_lm.tokenizer.pad_token_id, batch_size=4)
    assert [o.ids for o in outs] == ref
    assert sizes[:3] == [4, 2, 1] and eng.stats["oom_halvings"] == 2


def test_oom_halves_the_slots_continuous_fake_oom(tiny_lm, monkeypatch):
    """Continuous batching: an injected out-of-memory error halves the rows; requests finished before it
    are kept, the rest run again; tokens unchanged."""
    from harness.engine import out_of_memory_error

    prompts = _prompts(tiny_lm.tokenizer, 6)
    ref, _ = _fast_greedy(tiny_lm, prompts, 6, continuous=False)
    eng = Engine(tiny_lm)
    real = eng._generate_continuous
    calls = []

    def flaky(queue, *a, slots, results, **k):
        calls.append((len(queue), slots))
        if slots == 4:
            raise out_of_memory_error()("CUDA out of memory (injected)")
        if slots == 2 and len(queue) == 6:
            real(queue[:2], *a, slots=2, results=results, **k)  # two requests finish, then memory runs out
            raise out_of_memory_error()("CUDA out of memory (injected)")
        return real(queue, *a, slots=slots, results=results, **k)

    monkeypatch.setattr(eng, "_generate_continuous", flaky)
    outs = eng.generate(prompts, 6, temperature=0.0, stop_ids=end_token_ids(tiny_lm.tokenizer, tiny_lm.model),
                        pad_id=tiny_lm.tokenizer.pad_token_id, batch_size=4)
    assert [o.ids for o in outs] == ref
    assert calls == [(6, 4), (6, 2), (4, 1)] and eng.stats["oom_halvings"] == 2


def _examples(lm, n=5):
    import random

    rng = random.Random(0)
    ps = _prompts(lm.tokenizer, n)
    return [(p, [rng.randrange(100, 5000) for _ in range(rng.randrange(0 if i == 2 else 1, 9))])
            for i, p in enumerate(ps)]


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_fast_extractor_equals_reference(request, which):
    import torch

    from harness_plugins.extract_mean_diff import mean_activations
    from harness.core.records import Generation

    lm = request.getfixturevalue("tiny_lm" if which == "tiny" else "embedded_lm")
    ex = _examples(lm, 5 if which == "tiny" else 3)
    gens = [Generation(id=str(i), trait="t", split="extract", polarity="pos", question_index=i, question="q",
                       instruction_index=0, sample_index=0, system_prompt="", response="",
                       response_token_ids=tuple(r), prompt_token_ids=tuple(p), finish_reason="stop",
                       model_id="m", generator="g") for i, (p, r) in enumerate(ex)]
    ref, n = mean_activations(lm, gens, batch_size=2)
    got, m = Engine(lm).extract_sums(ex, token_budget=40)  # small budget: several batches
    assert n == m == len(ex)
    for k in ref:
        assert got[k].shape == ref[k].shape
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4)


def test_extract_oom_halves_token_budget_fake_oom(tiny_lm, monkeypatch):
    import torch

    from harness.engine import out_of_memory_error

    ex = _examples(tiny_lm, 4)
    ref, _ = Engine(tiny_lm).extract_sums(ex, token_budget=10_000)
    eng = Engine(tiny_lm)
    real = eng._extract_batch
    calls = []

    def flaky(chunk, *a, **k):
        calls.append(len(chunk))
        if len(chunk) > 1:
            raise out_of_memory_error()("CUDA out of memory (injected)")
        return real(chunk, *a, **k)

    monkeypatch.setattr(eng, "_extract_batch", flaky)
    got, _ = eng.extract_sums(ex, token_budget=10_000)
    assert eng.stats["extract_oom_halvings"] >= 1 and max(calls) == 4
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)


def test_fast_plugins_in_pipeline_equal_hf_and_reference(tmp_path, tiny_pm, mini_trait_dir):
    import torch

    from harness.core.config import Settings
    from harness.core.pipeline import RunContext, run_trait
    from harness.core.plugins import build_registry

    base = dict(model="tiny", traits_dirs=(str(mini_trait_dir),), max_new_tokens=5, progress=False,
                profile="paper", temperature=0.0)
    a = run_trait("mini", Settings(**base, out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c1")),
                  pm=tiny_pm, stages=("generate",))
    s = Settings(**base, out_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "c2"), generator="fast")
    b = run_trait("mini", s, pm=tiny_pm, stages=("generate",))
    assert [g.response_token_ids for g in a.generations] == [g.response_token_ids for g in b.generations]
    assert {g.generator for g in b.generations} == {"fast"}
    reg = build_registry(tiny_pm, "extractor")
    ctx = RunContext(settings=s, pm=tiny_pm)
    pos = [g for g in b.generations if g.polarity == "pos"]
    neg = [g for g in b.generations if g.polarity == "neg"]
    ref = reg.create("mean-diff", s).extract(b.trait, pos, neg, ctx)
    got = reg.create("fast", s).extract(b.trait, pos, neg, ctx)
    for k, v in ref.tensors.items():
        torch.testing.assert_close(got.tensors[k], v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_swap_eager_equals_hf_and_restores(embedded_dir, model_type):
    """The fused path's replacement forwards (RMSNorm, SwiGLU, rotary, decode softmax), run uncompiled on
    CPU, give HF greedy's tokens and the reference extractor's sums, and are removed afterwards."""
    import sys

    import torch

    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=64, seed=5, model_type=model_type)
    mod = sys.modules[type(lm.model.model.layers[0].self_attn).__module__]
    rope = mod.apply_rotary_pos_emb
    prompts = _prompts(lm.tokenizer, 3)
    ref = _hf_greedy(lm, prompts, 12)
    got, eng = _fast_greedy(lm, prompts, 12, fused="eager")
    assert got == ref and eng.fused_swap and not eng.fused_compile
    ex = _examples(lm, 4)
    a, _ = Engine(lm, fused="off").extract_sums(ex)
    b, _ = Engine(lm, fused="eager").extract_sums(ex)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert mod.apply_rotary_pos_emb is rope
    assert not any("forward" in m.__dict__ for m in lm.model.modules())
    with pytest.raises(ValueError, match="fused"):
        Engine(lm, fused="yes")


def test_fused_is_off_on_cpu(tiny_lm):
    eng = Engine(tiny_lm)
    assert eng.fused == "auto" and not eng.fused_compile and not eng.fused_swap
    for mode in ("triton", "compile"):  # CUDA-only kernels: nothing swapped in on CPU
        e = Engine(tiny_lm, fused=mode)
        assert not e.fused_triton and not e.fused_compile and not e.fused_swap and e.fused_mode == "eager"


def test_continuous_decode_calls_tell_each_rows_kv_length(embedded_dir):
    """Every decode call of the continuous loop says how many cache slots each row holds (its write slot
    + 1): rows that entered later or hold shorter prompts read fewer slots, which the fused decode
    attention skips; the lengths never exceed the slots the call reads."""
    from harness.models.blockcall import block_call_of
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=64, seed=3)
    prompts, seeds = _varied(lm, n=5)
    prompts[0] = prompts[0][:3]
    seen = []

    def hook(mod, args, kwargs, out):
        c = block_call_of(kwargs)
        if c is not None and not c.prefill:
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            seen.append((c.kv_lengths.tolist(), int(cache.kv_len)))

    attn = lm.model.model.layers[0].self_attn
    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        Engine(lm, refill_every=2).generate(prompts, 6, seeds=seeds, temperature=1.0, pad_id=0, ignore_eos=True,
                                            batch_size=2)
    finally:
        h.remove()
    assert seen and all(1 <= x <= kv for lens, kv in seen for x in lens)
    assert any(len(set(lens)) > 1 for lens, _ in seen)  # rows at different lengths in one step


def test_block_calls_tell_hooks_positions_and_rows(tiny_lm):
    """Every block call of the fast path carries a BlockCall: the real positions and prefill at the first
    call, then decode calls; batch row r is the caller's prompt rows[r] (the engine sorts by length)."""
    import torch

    from harness.models.blockcall import BlockCall, block_call_of

    prompts = _prompts(tiny_lm.tokenizer, 3)
    prompts[0] = prompts[0] + prompts[0]  # the longest comes first: the engine reorders the rows
    seen = []

    def hook(mod, args, kwargs, out):
        seen.append(block_call_of(kwargs))

    h = tiny_lm.model.model.layers[0].register_forward_hook(hook, with_kwargs=True)
    try:
        Engine(tiny_lm).generate(prompts, 3, temperature=0.0, stop_ids=[], pad_id=tiny_lm.tokenizer.pad_token_id,
                                 ignore_eos=True)
    finally:
        h.remove()
    assert len(seen) == 3 and all(isinstance(c, BlockCall) for c in seen)
    first, *decode = seen
    order = sorted(range(3), key=lambda i: len(prompts[i]))
    assert first.prefill is True and tuple(first.rows) == tuple(order) and first.n == 3
    lengths = [len(prompts[i]) for i in order]
    assert first.mask.dtype == torch.bool and first.mask.sum(1).tolist() == lengths
    assert all(c.prefill is False and c.mask is None and tuple(c.rows) == tuple(order) for c in decode)
    # HF's own forward passes none
    seen.clear()
    h = tiny_lm.model.model.layers[0].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            tiny_lm.model(input_ids=torch.tensor([prompts[1]]))
    finally:
        h.remove()
    assert seen == [None]


def _varied(lm, n=9):
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(10, 4000) for _ in range(rng.randrange(3, 30))] for _ in range(n)]
    return prompts, [rng.getrandbits(60) for _ in prompts]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_equals_static_whatever_the_batch_size(embedded_dir, temperature):
    """Rows stop at very different steps (a large stop set): with continuous batching (rows refilled
    as they finish) every response equals the static batch's and the one-at-a-time one, for any
    number of rows; the refill interval does not matter either."""
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=64, seed=3)
    prompts, seeds = _varied(lm)
    kw = dict(temperature=temperature, seeds=seeds, pad_id=0)
    free = Engine(lm, continuous=False).generate(prompts, 24, stop_ids=[], **kw)
    # stop ids: a token each row writes at a different step (greedy rows of a random model repeat themselves)
    kw["stop_ids"] = sorted({o.ids[(2 + 5 * r) % 30] for r, o in enumerate(free) if (2 + 5 * r) % 30 < 24})
    static = Engine(lm, continuous=False).generate(prompts, 24, batch_size=len(prompts), **kw)
    lengths = [len(o.ids) for o in static]
    assert len(set(lengths)) >= 3 and max(lengths) > 2 * min(lengths) + 4  # the test means something
    alone = [Engine(lm, continuous=False).generate([p], 24, **{**kw, "seeds": [s]})[0] for p, s in zip(prompts, seeds)]
    assert [(o.ids, o.finish_reason) for o in alone] == [(o.ids, o.finish_reason) for o in static]
    for bs in (1, 2, 3, len(prompts)):
        for every in (1, 5, 16):
            for rows in (16, 1):  # 1: the drain compacts the running rows into ever smaller batches
                eng = Engine(lm, refill_every=every, compact_min_rows=rows)
                got = eng.generate(prompts, 24, batch_size=bs, **kw)
                assert [(o.ids, o.finish_reason) for o in got] == [(o.ids, o.finish_reason) for o in static], \
                    (bs, every, rows)
                if rows == 1 and bs == len(prompts) and every == 1:
                    assert eng.stats["continuous"]["compactions"] >= 2


def test_continuous_batching_greedy_equals_hf_in_two_slots(embedded_dir):
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=64, seed=3, model_type="qwen2")
    prompts = _prompts(lm.tokenizer, 5)
    ref = _hf_greedy(lm, prompts, 16)
    eng = Engine(lm, refill_every=2)
    outs = eng.generate(prompts, 16, temperature=0.0, stop_ids=end_token_ids(lm.tokenizer, lm.model),
                        pad_id=lm.tokenizer.pad_token_id, batch_size=2)
    assert [o.ids for o in outs] == ref


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_continuous_steering_per_row_equals_one_at_a_time(embedded_dir, positions):
    """Per-row steering coefficients stay on their requests when requests enter the rows at different
    steps (two rows, nine requests of very different lengths), in every position mode."""
    import torch

    from harness.analysis.steering import steer
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=3, hidden=64, seed=3)
    prompts, seeds = _varied(lm)
    coefs = torch.tensor([0.0, 30.0, -30.0, 15.0, 0.0, -15.0, 30.0, 5.0, -5.0])
    vec = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=1.0, stop_ids=list(range(100, 5000)), pad_id=0)
    with steer(lm, vec, coefs, layers=2, positions=positions):
        got = Engine(lm, refill_every=3, compact_min_rows=1).generate(prompts, 20, seeds=seeds, batch_size=2, **kw)
    alone = []
    for p, s, c in zip(prompts, seeds, coefs.tolist()):
        with steer(lm, vec, c, layers=2, positions=positions):
            alone.append(Engine(lm, continuous=False).generate([p], 20, seeds=[s], **kw)[0])
    plain = Engine(lm).generate(prompts, 20, seeds=seeds, batch_size=2, **kw)
    assert [o.ids for o in got] == [o.ids for o in alone]
    assert sum(a.ids != b.ids for a, b in zip(got, plain)) >= 3  # steering changed the steered rows
