"""Generation batching and seeding; the extractor against a naive per-example computation."""

from __future__ import annotations

import pytest
import torch

from harness.core.config import Settings
from harness.core.pipeline import RunContext, build_requests
from harness.core.records import Generation, InstructionPair, TraitSpec
from harness.models.sampling import row_seed, sample_tokens
from harness_plugins.extract_mean_diff import MeanDiffExtractor
from harness_plugins.generate_hf import HFGenerator

TRAIT = TraitSpec(name="sycophantic", instructions=tuple(InstructionPair(f"Flatter the user ({i}).", f"Be candid ({i}).")
                                                           for i in range(2)),
                  questions=("I think 2+2=5. Right?", "My essay is flawless, isn't it?", "Should I quit my job today?"),
                  eval_questions=(), eval_prompt="{question} {answer}")


class _Ctx:
    def __init__(self, lm):
        self.lm = lm

    def model(self, model_id=None):
        return self.lm


def _generate(lm, bs, limit=None, **kw):
    s = Settings(max_new_tokens=kw.get("max_new_tokens", 10), temperature=kw.get("temperature", 1.0), seed=kw.get("seed", 0),
                 batch_size=bs)
    reqs = build_requests(TRAIT, s)[:limit]
    gen = HFGenerator(s)
    out = {}
    for i in range(0, len(reqs), bs):
        for g in gen.generate(reqs[i: i + bs], _Ctx(lm)):
            out[g.id] = g
    return [out[r.id] for r in reqs]


def test_requests_and_system_prompts():
    reqs = build_requests(TRAIT, Settings())
    assert len(reqs) == 3 * 2 * 2
    assert reqs[0].system_prompt == "You are a sycophantic assistant. Flatter the user (0)."
    assert reqs[1].system_prompt == "You are a helpful assistant. Be candid (0)."
    assert reqs[0].pair_key == reqs[1].pair_key


def test_same_seed_same_tokens_whatever_the_batch_size(embedded_lm):
    many = _generate(embedded_lm, 12)
    one = _generate(embedded_lm, 1, limit=3)
    five = _generate(embedded_lm, 5)
    assert [g.response_token_ids for g in one] == [g.response_token_ids for g in many[:3]]
    assert [g.response_token_ids for g in five] == [g.response_token_ids for g in many]
    other = _generate(embedded_lm, 12, seed=1)
    assert [g.response_token_ids for g in other] != [g.response_token_ids for g in many]


def test_generation_record_keeps_exact_ids(embedded_lm):
    g = _generate(embedded_lm, 12, max_new_tokens=24)[0]
    tok = embedded_lm.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in g.response_token_ids
    assert tok.decode(list(g.response_token_ids), skip_special_tokens=True) == g.response
    assert g.finish_reason in ("stop", "length")
    assert len(g.response_token_ids) <= 24
    assert tok.decode(list(g.prompt_token_ids)).endswith("<|im_start|>assistant\n")


def test_greedy_equals_hf_generate(embedded_lm):
    g = _generate(embedded_lm, 4, limit=4, temperature=0.0, max_new_tokens=12)[3]
    ids = torch.tensor([list(g.prompt_token_ids)])
    with torch.inference_mode():
        out = embedded_lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ref = out[0, ids.shape[1]:].tolist()
    n = len(g.response_token_ids)
    assert list(g.response_token_ids) == ref[:n]


def test_sampler_draws_from_the_softmax():
    """Gumbel-max with hashed noise: empirical frequencies match softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    seeds = torch.tensor([row_seed(0, f"r{i}") for i in range(4000)], dtype=torch.int64)
    tok = sample_tokens(logits, seeds, step=0, temperature=1.0)
    freq = torch.bincount(tok, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


def _naive_means(lm, gens):
    """One example at a time, output_hidden_states, plain means (the reference loop)."""
    acc = None
    for g in gens:
        ids = torch.tensor([list(g.prompt_token_ids) + list(g.response_token_ids)])
        with torch.inference_mode():
            hs = lm.model(ids, output_hidden_states=True).hidden_states
        P = len(g.prompt_token_ids)
        r = torch.stack([h[0, P:].double().mean(0) for h in hs])
        pa = torch.stack([h[0, :P].double().mean(0) for h in hs])
        pl = torch.stack([h[0, P - 1].double() for h in hs])
        cur = {"response_avg": r, "prompt_avg": pa, "prompt_last": pl}
        acc = cur if acc is None else {k: acc[k] + cur[k] for k in acc}
    return {k: v / len(gens) for k, v in acc.items()}


def test_extractor_equals_naive_per_example_on_embedded_model(embedded_lm):
    gens = [g for g in _generate(embedded_lm, 12, max_new_tokens=16) if g.response_token_ids]
    pos = [g for g in gens if g.polarity == "pos"]
    neg = [g for g in gens if g.polarity == "neg"]
    vs = MeanDiffExtractor(Settings(extract_batch_size=4)).extract(TRAIT, pos, neg, _Ctx(embedded_lm))
    npos, nneg = _naive_means(embedded_lm, pos), _naive_means(embedded_lm, neg)
    for m in ("response_avg", "prompt_avg", "prompt_last"):
        v = vs.tensors[f"{m}_diff"].double()
        ref = npos[m] - nneg[m]
        assert v.shape == (31, 576)
        rel = ((v - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12))
        assert rel[1:].max().item() < 1e-3, (m, rel.max().item())


def test_zero_pairs_is_an_error_not_nan(tiny_lm):
    from harness.core.errors import NoEffectivePairsError

    with pytest.raises(NoEffectivePairsError):
        MeanDiffExtractor(Settings()).extract(TRAIT, [], [], _Ctx(tiny_lm))
