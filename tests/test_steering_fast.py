"""Steering on the fast engine (``--generator fast``): per-row coefficients stay on their requests when the
engine sorts prompts by length and splits the batch, position modes touch exactly the intended positions,
and a generator that does not keep row order is steered one cell at a time."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from harness.core.errors import HarnessError  # noqa: E402

# very different prompt lengths, longest first: the engine's length sort reorders them
QUESTIONS = ["Please tell me a long and detailed story about a dragon, a knight and a small village by the sea.",
             "Hi", "Why is the sky blue?"]
CELLS = [(None, 0.0), (2, 40.0), (2, -40.0), (1, 40.0)]


def _ctx(tiny_pm, tmp_path, generator: str):
    from harness.core.config import Settings
    from harness.core.pipeline import RunContext

    s = Settings(model="tiny", generator=generator, temperature=0.0, max_new_tokens=6, progress=False,
                 cache_dir=str(tmp_path / "cache"))
    return RunContext(settings=s, pm=tiny_pm)  # ctx.cache None: every row is generated


def _requests(s, questions=QUESTIONS):
    from harness.core.records import GenerationRequest

    return [GenerationRequest(id=f"q{i}", trait="t", split="sweep", polarity="steer", question_index=i, question=q,
                              instruction_index=0, sample_index=0, system_prompt="", temperature=s.temperature,
                              top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed)
            for i, q in enumerate(questions)]


def _vectors(lm):
    g = torch.Generator().manual_seed(5)
    return torch.randn(lm.num_layers + 1, lm.hidden_size, generator=g)


def _tokens(by_cell):
    return {cell: [g.response_token_ids for g in gens] for cell, gens in by_cell.items()}


def _generate(ctx, name, cells, vectors, **kw):
    from harness.core.plugins import build_registry
    from harness.analysis.sweep import steered_generate

    gen = build_registry(ctx.pm, "generator").create(name, ctx.settings)
    return _tokens(steered_generate(ctx, gen, _requests(ctx.settings), cells, vectors, **kw))


@pytest.mark.parametrize("split", [False, True])
def test_fast_sweep_rows_equal_separate_cells_and_hf(tiny_pm, tiny_lm, tmp_path, monkeypatch, split):
    """All cells batched through the fast engine == one call per cell == the hf generator (temperature 0).

    ``split``: the engine splits every batch into batches of 2 rows (as it does by free memory)."""
    from harness.engine import Engine

    vectors = _vectors(tiny_lm)
    ctx = _ctx(tiny_pm, tmp_path, "fast")
    if split:
        monkeypatch.setattr(Engine, "gen_batch_size", lambda self, n, p, c: 2)
    together = _generate(ctx, "fast", CELLS, vectors)
    monkeypatch.undo()
    separate = {}
    for cell in CELLS:
        separate.update(_generate(ctx, "fast", [cell], vectors))
    hf = _generate(_ctx(tiny_pm, tmp_path, "hf"), "hf", CELLS, vectors)
    # the test means something: steering changes tokens, and differently per cell
    base = together[(None, 0.0)]
    assert all(together[c] != base for c in CELLS[1:])
    assert together == separate
    assert together == hf


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_fast_sweep_position_modes_equal_hf(tiny_pm, tiny_lm, tmp_path, positions):
    vectors = _vectors(tiny_lm)
    fast = _generate(_ctx(tiny_pm, tmp_path, "fast"), "fast", CELLS, vectors, positions=positions)
    hf = _generate(_ctx(tiny_pm, tmp_path, "hf"), "hf", CELLS, vectors, positions=positions)
    assert fast == hf


def test_generator_that_reorders_rows_is_steered_one_cell_at_a_time(tiny_pm, tiny_lm, tmp_path):
    """A third-party generator that runs the model on its requests in another order: each generate call
    gets one cell (scalar coefficients), so the rows still equal the hf generator's."""
    from harness_plugins.generate_hf import HFGenerator

    from harness.analysis.sweep import steered_generate

    class Reversing(HFGenerator):
        name = "reversing"

        def generate(self, requests, ctx):
            self.calls = getattr(self, "calls", 0) + 1
            return list(reversed(super().generate(list(reversed(requests)), ctx)))

    vectors = _vectors(tiny_lm)
    ctx = _ctx(tiny_pm, tmp_path, "hf")
    gen = Reversing(ctx.settings)
    got = _tokens(steered_generate(ctx, gen, _requests(ctx.settings), CELLS, vectors))
    assert gen.calls == len(CELLS)
    assert got == _generate(ctx, "hf", CELLS, vectors)


def test_hook_refuses_per_row_coefficients_without_the_row_order(tiny_lm):
    """Under a loop that calls the blocks itself (the engine) and does not say which request each row is,
    per-row coefficients are refused; scalar coefficients are fine."""
    from harness.analysis.steering import steer
    from harness.models.blockcall import BlockCall

    base = tiny_lm.model.model
    ids = torch.ones((2, 4), dtype=torch.long)
    v = torch.ones(tiny_lm.hidden_size)

    def call_block(call):  # block 0 (steered at layer 1), called as such a loop calls it
        with torch.inference_mode():
            h = base.embed_tokens(ids)
            pe = base.rotary_emb(h, torch.arange(4)[None].expand(2, 4))
            base.layers[0](h, attention_mask=None, position_embeddings=pe, **call.kwargs())

    with steer(tiny_lm, v, [1.0, 2.0], layers=1):
        with pytest.raises(HarnessError, match="row order"):
            call_block(BlockCall(prefill=True))
    with steer(tiny_lm, v, [1.0, 2.0, 3.0], layers=1):
        with pytest.raises(HarnessError, match="3 per-row values but the batch has 2 rows"):
            call_block(BlockCall(prefill=True, rows=[1, 0], n=2))  # 3 coefficients for the caller's 2 rows
    with steer(tiny_lm, v, 1.0, layers=1) as hd:
        call_block(BlockCall(prefill=True))
    assert hd.calls == 1 and hd.steered_positions == 2  # response mode: the last position of both rows


# -- exact positions on the engine ----------------------------------------------------------------
PROMPTS = ["Tell me a long story about a dragon and a knight please", "Hi"]


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_each_position_mode_touches_exactly_the_intended_positions_fast(tiny_lm, positions):
    """tests/test_steering.py's position test, on the fast engine (which calls the blocks directly)."""
    from harness.engine import Engine
    from harness.models.loading import prompt_ids
    from harness.analysis.steering import find_decoder_layers, steer

    torch.manual_seed(1)
    v = torch.randn(tiny_lm.hidden_size)
    coef, layer, new = 3.0, 2, 4
    prompts = [prompt_ids(tiny_lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    block = find_decoder_layers(tiny_lm.model)[0][layer - 1]
    before, after = [], []
    with steer(tiny_lm, v, coef, layers=layer, positions=positions) as hd:
        h0 = block.register_forward_hook(lambda m, a, o: before.append(o[0].clone() if isinstance(o, tuple)
                                                                       else o.clone()), prepend=True)
        h1 = block.register_forward_hook(lambda m, a, o: after.append(o[0].clone() if isinstance(o, tuple)
                                                                      else o.clone()))
        try:
            Engine(tiny_lm).generate(prompts, new, temperature=0.0, stop_ids=[], pad_id=tiny_lm.tokenizer.pad_token_id,
                                     ignore_eos=True)
        finally:
            h0.remove()
            h1.remove()
    assert len(before) == len(after) == new  # prefill + 3 decode calls
    lengths = sorted(len(p) for p in prompts)  # the engine's batch rows: prompts sorted by length
    P = max(lengths)
    assert lengths[0] < P, "the test needs real left padding"
    assert before[0].shape[1] == P and all(b.shape[1] == 1 for b in before[1:])
    touched = 0
    for call, (b, a) in enumerate(zip(before, after)):
        B, T, _ = b.shape
        diff = a - b
        for i in range(B):
            for t in range(T):
                real = call > 0 or t >= P - lengths[i]
                want = {"all": real, "prompt": real and call == 0, "response": t == T - 1}[positions]
                if want:
                    touched += 1
                    torch.testing.assert_close(diff[i, t], coef * v, rtol=0, atol=1e-5)
                else:
                    assert torch.equal(diff[i, t], torch.zeros_like(diff[i, t])), (call, i, t)
    assert hd.calls == new and hd.steered_positions == touched
