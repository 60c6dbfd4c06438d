"""Steering hooks on a tiny random Llama: exact positions, layer convention, coef 0, cleanup, errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from harness.core.errors import HarnessError  # noqa: E402
from harness.analysis.steering import find_decoder_layers, mean_activation_norms, steer  # noqa: E402


def _batch(lm, prompts):
    """Left-padded batch of chat prompts of different lengths."""
    from harness.models.loading import prompt_ids

    ids = [prompt_ids(lm.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    P = max(len(x) for x in ids)
    pad = lm.tokenizer.pad_token_id
    inp = torch.full((len(ids), P), pad, dtype=torch.long)
    att = torch.zeros((len(ids), P), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, P - len(x):] = torch.tensor(x)
        att[i, P - len(x):] = 1
    assert att.sum(1).min() < P, "the test needs real left padding"
    return inp, att


PROMPTS = ["Hi", "Tell me a long story about a dragon and a knight please"]


def _record_generate(lm, layer, vec, coef, positions, new_tokens=4):
    """Generate greedily with steering; return per-call (before, after, mask) at block layer-1."""
    block = find_decoder_layers(lm.model)[0][layer - 1]
    inp, att = _batch(lm, PROMPTS)
    before, after, masks = [], [], []
    state = {}

    def pre_owner(m, args, kwargs):
        state["mask"] = kwargs.get("attention_mask")

    def rec_before(m, a, o):
        before.append((o[0] if isinstance(o, tuple) else o).clone())

    owner = find_decoder_layers(lm.model)[1]
    h1 = owner.register_forward_pre_hook(pre_owner, with_kwargs=True)
    try:
        with steer(lm, vec, coef, layers=layer, positions=positions) as hd:
            # prepended after the steering hook: runs before it, sees the unsteered output
            h0 = block.register_forward_hook(rec_before, prepend=True)
            # registered after the steering hook: sees the steered output
            def rec_after(m, a, o):
                h = o[0] if isinstance(o, tuple) else o
                after.append(h.clone())
                masks.append(state["mask"][:, -h.shape[1]:].clone())

            h2 = block.register_forward_hook(rec_after)
            try:
                with torch.inference_mode():
                    lm.model.generate(input_ids=inp, attention_mask=att, max_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=None,
                                      min_new_tokens=new_tokens)
            finally:
                h2.remove()
                h0.remove()
    finally:
        h1.remove()
    return before, after, masks, hd


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_each_position_mode_touches_exactly_the_intended_positions(tiny_lm, positions):
    torch.manual_seed(1)
    v = torch.randn(tiny_lm.hidden_size)
    coef = 3.0
    before, after, masks, hd = _record_generate(tiny_lm, 2, v, coef, positions)
    assert len(before) == len(after) == 4  # prefill + 3 decode calls
    assert before[0].shape[1] > 1 and all(b.shape[1] == 1 for b in before[1:]), "KV cache not used"
    for call, (b, a, m) in enumerate(zip(before, after, masks)):
        B, T, _ = b.shape
        diff = a - b
        for i in range(B):
            for t in range(T):
                real = bool(m[i, t])
                if positions == "all":
                    want = real
                elif positions == "prompt":
                    want = real and call == 0
                else:
                    want = t == T - 1
                if want:
                    torch.testing.assert_close(diff[i, t], coef * v, rtol=0, atol=1e-5)
                else:
                    assert torch.equal(diff[i, t], torch.zeros_like(diff[i, t])), (call, i, t)
    # the left pads of the short prompt were never touched
    assert masks[0][0].min() == 0
    assert hd.calls == 4


def test_vector_index_L_steers_hidden_states_L(tiny_lm):
    """Site identity: steering vector index L shifts hidden_states[L] by exactly coef*v (all positions)."""
    inp, att = _batch(tiny_lm, PROMPTS)
    v = torch.randn(tiny_lm.hidden_size)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=inp, attention_mask=att, output_hidden_states=True).hidden_states
    for L in (1, 2):
        with steer(tiny_lm, v, 2.0, layers=L, positions="all"), torch.inference_mode():
            hs = tiny_lm.model(input_ids=inp, attention_mask=att, output_hidden_states=True).hidden_states
        for j in range(L):
            assert torch.equal(hs[j], base[j])
        d = (hs[L] - base[L])[att.bool()]
        torch.testing.assert_close(d, (2.0 * v).expand_as(d), rtol=0, atol=1e-5)
        assert torch.equal((hs[L] - base[L])[~att.bool()], torch.zeros_like((hs[L] - base[L])[~att.bool()]))


@pytest.mark.parametrize("scale", ["raw", "unit"])
def test_coef_zero_leaves_logits_unchanged(tiny_lm, scale):
    inp, att = _batch(tiny_lm, PROMPTS)
    v = torch.randn(tiny_lm.hidden_size)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=inp, attention_mask=att).logits
        with steer(tiny_lm, {1: v, 2: v}, 0.0, positions="all", scale=scale):
            same = tiny_lm.model(input_ids=inp, attention_mask=att).logits
        with steer(tiny_lm, v, [0.0, 0.0], layers=[1, 2], positions="all", scale=scale):
            same_rows = tiny_lm.model(input_ids=inp, attention_mask=att).logits
        with steer(tiny_lm, v, 1.0, layers=1, positions="all", scale=scale):
            moved = tiny_lm.model(input_ids=inp, attention_mask=att).logits
    assert torch.equal(base, same) and torch.equal(base, same_rows)
    assert not torch.allclose(base, moved)


def test_hook_removed_after_exception(tiny_lm):
    blocks, owner = find_decoder_layers(tiny_lm.model)
    n_before = [len(b._forward_hooks) for b in blocks], len(owner._forward_pre_hooks), len(owner._forward_hooks)
    inp, att = _batch(tiny_lm, PROMPTS)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=inp, attention_mask=att).logits
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_lm, torch.randn(tiny_lm.hidden_size), 5.0, layers=[1, 2], positions="all"):
            assert len(blocks[0]._forward_hooks) == n_before[0][0] + 1
            raise RuntimeError("boom")
    assert ([len(b._forward_hooks) for b in blocks], len(owner._forward_pre_hooks), len(owner._forward_hooks)) == n_before
    with torch.inference_mode():
        assert torch.equal(tiny_lm.model(input_ids=inp, attention_mask=att).logits, base)


def test_per_row_coefficients_match_separate_runs(tiny_lm):
    """One batch with per-row coefs equals running each coefficient on its own (batched generate)."""
    inp, att = _batch(tiny_lm, PROMPTS)
    v = torch.randn(tiny_lm.hidden_size) * 2
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        with steer(tiny_lm, v, [4.0, -4.0], layers=2, positions="response"):
            both = tiny_lm.model.generate(input_ids=inp, attention_mask=att, **kw)
        with steer(tiny_lm, v, 4.0, layers=2, positions="response"):
            a = tiny_lm.model.generate(input_ids=inp, attention_mask=att, **kw)
        with steer(tiny_lm, v, -4.0, layers=2, positions="response"):
            b = tiny_lm.model.generate(input_ids=inp, attention_mask=att, **kw)
    assert torch.equal(both[0], a[0]) and torch.equal(both[1], b[1])


def test_shape_mismatch_error_names_both_shapes(tiny_lm):
    with pytest.raises(HarnessError, match=r"\(65,\).*\(64,\)"):
        with steer(tiny_lm, torch.zeros(65), 1.0, layers=1):
            pass
    with pytest.raises(HarnessError, match=r"\(5, 64\).*\(4, 64\)"):
        with steer(tiny_lm, torch.zeros(5, 64), 1.0, layers=1):
            pass
    with pytest.raises(HarnessError, match="L must be 1..3"):
        with steer(tiny_lm, torch.ones(64), 1.0, layers=0):
            pass
    with pytest.raises(HarnessError, match="2 per-row values but the batch has 3"):
        with steer(tiny_lm, torch.ones(64), [1.0, 2.0], layers=1), torch.inference_mode():
            tiny_lm.model(input_ids=torch.ones((3, 4), dtype=torch.long))
    with pytest.raises(HarnessError, match="positions"):
        with steer(tiny_lm, torch.ones(64), 1.0, layers=1, positions="last"):
            pass


def test_scale_modes_set_the_added_length(tiny_lm):
    inp, att = _batch(tiny_lm, PROMPTS)
    v = torch.randn(tiny_lm.hidden_size) * 7
    ex = [(inp[1].tolist(), [10, 11, 12])]
    norms = mean_activation_norms(tiny_lm, ex)
    assert len(norms) == tiny_lm.num_layers + 1 and all(n > 0 for n in norms)
    with torch.inference_mode():
        base = tiny_lm.model(input_ids=inp, attention_mask=att, output_hidden_states=True).hidden_states[2]
        for scale, want in (("raw", 0.5 * float(v.norm())), ("unit", 0.5), ("mean_norm", 0.5 * norms[2])):
            with steer(tiny_lm, v, 0.5, layers=2, positions="all", scale=scale, norms=norms):
                hs = tiny_lm.model(input_ids=inp, attention_mask=att, output_hidden_states=True).hidden_states[2]
            got = float((hs - base)[1, -1].norm())
            assert got == pytest.approx(want, rel=1e-4), scale
    with pytest.raises(HarnessError, match="norms="):
        with steer(tiny_lm, v, 0.5, layers=2, scale="mean_norm"):
            pass


def test_mean_activation_norms_matches_hidden_states(tiny_lm):
    p, r = [1, 2, 3, 4], [5, 6]
    norms = mean_activation_norms(tiny_lm, [(p, r)])
    with torch.inference_mode():
        hs = tiny_lm.model(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states
    for L, h in enumerate(hs):
        assert norms[L] == pytest.approx(float(h[0, 4:].norm(dim=-1).mean()), rel=1e-5)
