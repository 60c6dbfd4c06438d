"""Per-request steering (``steer_requests``): in one batched generation every request carries its own
vectors, layers, coefficient, position mode and scale, and its tokens equal a run of that request alone
under ``steer`` with the same settings -- under HF ``generate`` (the ``hf`` generator) and on the fast
engine (continuous batching with rows refilled at different steps, and static batches). Tiny random
Llama, fp32, CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from harness.core.errors import HarnessError  # noqa: E402
from harness.analysis.steering import RequestSteer, steer, steer_requests  # noqa: E402

# very different prompt lengths, not sorted by length (the engine sorts and splits them)
QUESTIONS = ["Please tell me a long and detailed story about a dragon, a knight and a small village by the sea, "
             "with a twist at the end.", "Hi", "Why is the sky blue?", "Name a colour.",
             "Explain in detail how a steam engine turns heat into motion, step by step.", "2+2?",
             "What is the capital of France, and why did it become the capital?", "Ok", "Tell me a joke about cats."]
MAX_NEW = [12, 3, 9, 5, 12, 2, 7, 10, 4]  # very different response lengths


def _specs(lm):
    """One spec per request: different vectors, layers, coefficients, position modes and scales; some None."""
    from harness.analysis.steering import mean_activation_norms

    g = torch.Generator().manual_seed(7)
    table = torch.randn(lm.num_layers + 1, lm.hidden_size, generator=g)  # a vector file's [L+1, H] tensor
    u, w = torch.randn(lm.hidden_size, generator=g), torch.randn(lm.hidden_size, generator=g)
    norms = mean_activation_norms(lm, [(list(range(10, 30)), list(range(40, 50)))])
    return [
        None,
        RequestSteer({2: u}, coef=30.0),
        RequestSteer(table, coef=-20.0, layers=[1, 2], positions="all", scale="unit"),
        None,
        RequestSteer(w, coef=60.0, layers=1, positions="prompt", scale="unit"),
        RequestSteer({1: u, 2: w}, coef={1: 25.0, 2: -25.0}, positions="all"),
        RequestSteer(table, coef=3.0, layers=2, scale="mean_norm", norms=norms),
        RequestSteer({2: u}, coef=0.0, positions="all"),
        RequestSteer({2: u}, coef=-30.0),
    ]


def _alone(lm, spec):
    """``steer`` with one spec's settings (a no-op context for None)."""
    import contextlib

    if spec is None:
        return contextlib.nullcontext()
    return steer(lm, spec.vectors, spec.coef, layers=spec.layers, positions=spec.positions, scale=spec.scale,
                 norms=spec.norms)


def _check_meaningful(alone, plain, specs):
    """The comparison can fail: steering changed most steered requests, None rows are the unsteered ones."""
    changed = [i for i, s in enumerate(specs) if alone[i] != plain[i]]
    steered = [i for i, s in enumerate(specs) if s is not None and s.coef != 0.0]
    assert len(set(changed) & set(steered)) >= len(steered) - 1, (changed, steered)
    assert all(alone[i] == plain[i] for i, s in enumerate(specs) if s is None or s.coef == 0.0)


# -- HF generate (the hf generator) ---------------------------------------------------------------------
def _hf(tiny_pm, tmp_path, temperature):
    from harness.core.config import Settings
    from harness.core.pipeline import RunContext
    from harness.core.records import GenerationRequest
    from harness_plugins.generate_hf import HFGenerator

    s = Settings(model="tiny", generator="hf", temperature=temperature, max_new_tokens=12, progress=False,
                 cache_dir=str(tmp_path / "cache"))
    ctx = RunContext(settings=s, pm=tiny_pm)
    reqs = [GenerationRequest(id=f"q{i}", trait="t", split="sweep", polarity="steer", question_index=i, question=q,
                              instruction_index=0, sample_index=0, system_prompt="", temperature=temperature,
                              top_p=1.0, max_new_tokens=m, seed=11) for i, (q, m) in enumerate(zip(QUESTIONS, MAX_NEW))]
    return HFGenerator(s), ctx, reqs


@pytest.mark.parametrize("temperature", [0.0, 0.1])  # sampled: the tiny model's logits are flat
def test_hf_generate_batch_equals_each_request_alone(tiny_pm, tiny_lm, tmp_path, temperature):
    gen, ctx, reqs = _hf(tiny_pm, tmp_path, temperature)
    specs = _specs(tiny_lm)

    def toks(gens):
        return [g.response_token_ids for g in gens]

    with steer_requests(tiny_lm, specs) as h:
        together = toks(gen.generate(reqs, ctx))
    alone = []
    for r, spec in zip(reqs, specs):
        with _alone(tiny_lm, spec):
            alone += toks(gen.generate([r], ctx))
    plain = toks(gen.generate(reqs, ctx))
    assert h.layers == [1, 2] and h.requests == len(reqs) and h.calls > 0 and h.steered_positions > 0
    assert [len(t) for t in together] == MAX_NEW  # every request kept its own response length
    _check_meaningful(alone, plain, specs)
    assert together == alone


# -- the fast engine ------------------------------------------------------------------------------------
def _engine_inputs(lm):
    from harness.models.loading import prompt_ids

    prompts = [prompt_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    seeds = [1000 + 7 * i for i in range(len(prompts))]
    # a large stop set: rows stop at very different steps, so continuous batching refills them at different times
    return prompts, seeds, dict(temperature=0.1, stop_ids=list(range(100, 3000)), pad_id=lm.tokenizer.pad_token_id)


@pytest.mark.parametrize("continuous", [True, False])
def test_engine_batch_equals_each_request_alone(tiny_lm, continuous):
    from harness.engine import Engine

    prompts, seeds, kw = _engine_inputs(tiny_lm)
    specs = _specs(tiny_lm)
    eng = Engine(tiny_lm, continuous=continuous, refill_every=2)
    with steer_requests(tiny_lm, specs) as h:
        together = [o.ids for o in eng.generate(prompts, 16, seeds=seeds, batch_size=2, **kw)]
    alone = []
    for p, s, spec in zip(prompts, seeds, specs):
        with _alone(tiny_lm, spec):
            alone.append(Engine(tiny_lm, continuous=False).generate([p], 16, seeds=[s], **kw)[0].ids)
    plain = [o.ids for o in Engine(tiny_lm, continuous=False).generate(prompts, 16, seeds=seeds, **kw)]
    assert h.calls > 0
    assert len({len(t) for t in together}) >= 4, "the test needs rows that finish at different steps"
    _check_meaningful(alone, plain, specs)
    assert together == alone


# -- None rows, one shared hook, errors -----------------------------------------------------------------
def _batch(lm, questions):
    from harness.models.batch import left_padded
    from harness.models.loading import prompt_ids

    ids, att = left_padded([prompt_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in questions],
                           lm.tokenizer.pad_token_id)
    assert att.sum(1).min() < att.shape[1], "the test needs real left padding"
    return ids, att


def test_none_rows_are_bit_identical_to_an_unsteered_run(tiny_lm):
    ids, att = _batch(tiny_lm, QUESTIONS[:4])
    u = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(3))
    specs = [None, RequestSteer({1: u}, coef=20.0, positions="all"), None, RequestSteer({2: u}, coef=-9.0)]
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=ids, attention_mask=att).logits
        with steer_requests(tiny_lm, specs):
            got = tiny_lm.model(input_ids=ids, attention_mask=att).logits
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id)
        plain = tiny_lm.model.generate(input_ids=ids, attention_mask=att, **kw)
        with steer_requests(tiny_lm, specs):
            steered = tiny_lm.model.generate(input_ids=ids, attention_mask=att, **kw)
    for i in (0, 2):
        assert torch.equal(got[i], base[i]) and torch.equal(steered[i], plain[i])
    for i in (1, 3):
        assert not torch.allclose(got[i], base[i])
    assert not torch.equal(steered[1], plain[1])


def test_one_shared_setting_equals_steer_exactly(tiny_lm):
    """Every row with the same spec: the hidden states equal ``steer``'s bit for bit (one rule)."""
    ids, att = _batch(tiny_lm, QUESTIONS[:3])
    v = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(4))
    for positions in ("all", "prompt", "response"):
        spec = RequestSteer(v, coef=5.0, layers=[1, 2], positions=positions, scale="unit")
        with torch.inference_mode():
            base = tiny_lm.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
            with steer(tiny_lm, v, 5.0, layers=[1, 2], positions=positions, scale="unit") as h1:
                a = tiny_lm.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
            with steer_requests(tiny_lm, [spec] * 3) as h2:
                b = tiny_lm.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        assert all(torch.equal(x, y) for x, y in zip(a, b)), positions
        assert not torch.equal(a[2], base[2])
        assert h1.steered_positions == h2.steered_positions > 0


def test_wrong_number_of_specs_is_a_clear_error(tiny_lm):
    from harness.engine import Engine

    ids, att = _batch(tiny_lm, QUESTIONS[:3])
    v = torch.ones(tiny_lm.hidden_size)
    specs = [RequestSteer({1: v}, coef=1.0), RequestSteer({1: v}, coef=2.0)]  # 2 specs, 3 requests
    with pytest.raises(HarnessError, match=r"2 specs \(one per request\) but the batch has 3 rows"):
        with steer_requests(tiny_lm, specs), torch.inference_mode():
            tiny_lm.model(input_ids=ids, attention_mask=att)
    prompts, seeds, kw = _engine_inputs(tiny_lm)
    with pytest.raises(HarnessError, match=r"2 specs \(one per request\) but the batch has 3 rows"):
        with steer_requests(tiny_lm, specs):
            Engine(tiny_lm).generate(prompts[:3], 4, seeds=seeds[:3], **kw)


def test_a_loop_that_does_not_say_its_row_order_is_refused(tiny_lm):
    from harness.models.blockcall import BlockCall

    base = tiny_lm.model.model
    ids = torch.ones((2, 4), dtype=torch.long)
    v = torch.ones(tiny_lm.hidden_size)

    def call_block(call):  # block 0 (steered at layer 1), called as a loop that calls the blocks itself does
        with torch.inference_mode():
            h = base.embed_tokens(ids)
            pe = base.rotary_emb(h, torch.arange(4)[None].expand(2, 4))
            base.layers[0](h, attention_mask=None, position_embeddings=pe, **call.kwargs())

    with steer_requests(tiny_lm, [RequestSteer({1: v}), None]) as h:
        with pytest.raises(HarnessError, match="row order"):
            call_block(BlockCall(prefill=True))
        call_block(BlockCall(prefill=True, rows=(1, 0), n=2))  # batch row 1 is request 0: steered
    assert h.steered_positions == 1


def test_bad_specs_name_the_field(tiny_lm):
    v = torch.ones(tiny_lm.hidden_size)
    blocks = tiny_lm.model.model.layers
    hooks = [len(b._forward_hooks) for b in blocks]
    with pytest.raises(HarnessError, match=r"field 'positions': 'last' is not one of all, prompt, response"):
        RequestSteer(v, layers=1, positions="last")
    with pytest.raises(HarnessError, match=r"field 'scale': 'l2'"):
        RequestSteer(v, layers=1, scale="l2")
    with pytest.raises(HarnessError, match=r"field 'coef'"):
        RequestSteer(v, coef=float("nan"), layers=1)
    with pytest.raises(HarnessError, match=r"specs\[1\] is a dict"):
        with steer_requests(tiny_lm, [None, {"coef": 1.0}]):
            pass
    with pytest.raises(HarnessError, match=r"specs\[2\]: .*\(65,\).*\(64,\)"):
        with steer_requests(tiny_lm, [None, RequestSteer(v, layers=1), RequestSteer(torch.ones(65), layers=1)]):
            pass
    with pytest.raises(HarnessError, match=r"specs\[0\]: field 'coef' has layers \[2\]"):
        with steer_requests(tiny_lm, [RequestSteer({1: v}, coef={2: 1.0})]):
            pass
    with pytest.raises(HarnessError, match=r"specs\[0\]: scale='mean_norm' needs norms="):
        with steer_requests(tiny_lm, [RequestSteer(v, layers=1, scale="mean_norm")]):
            pass
    assert [len(b._forward_hooks) for b in blocks] == hooks  # nothing was left installed
