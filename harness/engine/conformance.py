"""Architecture conformance: the equalities that put a model type on the engine's supported list.

For one model type, a tiny random model built from ``CONFIGS[model_type]`` (every non-default feature of
that architecture turned on, seeded weights, an in-memory word-level tokenizer: no download) is checked
three ways against transformers itself:

* ``greedy``: the engine's tokens equal HF ``generate``'s (temperature 0) on a left-padded batch of
  prompts of different lengths, longer than the configs' sliding windows;
* ``sampled``: the engine's tokens equal HF ``generate`` driven by the harness's seeded sampler
  (``harness.models.sampling.seeded_logits_processor``, what the ``hf`` generator runs) at temperature 1:
  logit multipliers and soft-capping change these, while greedy's argmax cannot see them;
* ``extract``: the engine's sums of per-example means equal the reference extractor's
  (``harness.models.activations.example_means``, what ``mean-diff`` runs) at every layer.

``check_architecture`` returns the measurements as a dict; tests/test_engine_architectures.py runs it on
the CPU in fp32 (the engine's eager path), benchmarks/gpu_arch_check.py on CUDA in fp32 and bf16.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

VOCAB = 384
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    initializer_range=0.1,  # larger than the default 0.02: peaked logits, so every feature moves the tokens
)
WINDOW = 5  # sliding windows in the configs: shorter than every prompt + response below

# Per model type: the config fields that turn its non-default features on (on top of BASE).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=WINDOW, tie_word_embeddings=False, head_dim=32,
                    rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "qwen3": dict(head_dim=32, tie_word_embeddings=False, attention_bias=True),
    "olmo2": dict(tie_word_embeddings=False),
    "granite": dict(embedding_multiplier=6.0, logits_scaling=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
                    tie_word_embeddings=True, initializer_range=0.2),
    "gemma": dict(head_dim=32, initializer_range=0.2),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=0.5, attn_logit_softcapping=0.2,
                   query_pre_attn_scalar=24, initializer_range=0.05),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=0.5, query_pre_attn_scalar=24,
                        initializer_range=0.05,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=WINDOW, tie_word_embeddings=False),
    "stablelm": dict(partial_rotary_factor=0.25, qk_layernorm=True, use_qkv_bias=True, use_parallel_residual=True,
                     tie_word_embeddings=False),
    "cohere": dict(logit_scale=0.4, use_qk_norm=True, tie_word_embeddings=True, initializer_range=0.2),
    "olmo": dict(clip_qkv=0.3, tie_word_embeddings=False),
    "smollm3": dict(no_rope_layer_interval=2, tie_word_embeddings=False),
    "starcoder2": dict(sliding_window=WINDOW, use_bias=True, tie_word_embeddings=False),
    "glm": dict(partial_rotary_factor=0.5, head_dim=16, attention_bias=True, tie_word_embeddings=False),
    "olmo3": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  tie_word_embeddings=False),
    # mixture-of-experts
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, tie_word_embeddings=False),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      mlp_only_layers=[0], tie_word_embeddings=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32, mlp_only_layers=[1],
                      norm_topk_prob=True, tie_word_embeddings=False),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=6.0, logits_scaling=3.0,
                       residual_multiplier=0.4, attention_multiplier=0.2, tie_word_embeddings=True,
                       initializer_range=0.2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.3, norm_topk_prob=True, tie_word_embeddings=False),
}

PROMPT_LENGTHS = (9, 3, 14, 6)
MAX_NEW = 12


def word_tokenizer(vocab: int = VOCAB):
    """A real (``tokenizers``) word-level tokenizer over ``t0 .. t{vocab-1}``, built in memory; pad t0."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", bos_token="t2")


def tiny_model(model_type: str, *, dtype: str = "float32", device: str = "cpu", seed: int = 0,
               overrides: dict | None = None, attn_implementation: str = "eager"):
    """A ``LoadedModel`` of ``model_type`` from ``CONFIGS`` (random weights, seeded).

    HF's side runs its eager attention by default: the reference implementation of every architecture
    (transformers 5.17's default SDPA path for Gemma 2, for one, drops the attention soft-capping)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.models.loading import LoadedModel

    cfg = AutoConfig.for_model(model_type, **{**BASE, **CONFIGS.get(model_type, {}), **(overrides or {})})
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation=attn_implementation).to(device).eval()
    return LoadedModel(model=model, tokenizer=word_tokenizer(cfg.vocab_size), model_id=f"tiny-{model_type}",
                       device=torch.device(device), dtype=dt, info={"class": type(model).__name__})


def workload(seed: int = 0) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
    """Prompts of different lengths (token ids >= 3: no pad / end / bos) and (prompt, response) examples."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]
    examples = [(p, [rng.randrange(3, VOCAB) for _ in range(rng.randrange(0 if i == 1 else 1, 9))])
                for i, p in enumerate(prompts)]
    return prompts, examples


def hf_tokens(lm, prompts: Sequence[Sequence[int]], max_new: int, temperature: float = 0.0,
              seeds: Sequence[int] | None = None) -> list[list[int]]:
    """HF ``generate`` on the left-padded prompts, every row ``max_new`` tokens (no end-of-turn stop);
    temperature > 0: the harness's seeded sampler as a logits processor."""
    import torch
    from transformers import GenerationConfig

    from harness.models.batch import left_padded
    from harness.models.sampling import seeded_logits_processor

    ids, mask = left_padded(prompts, 0)
    P = ids.shape[1]
    gc = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, num_beams=1,
                          eos_token_id=None, pad_token_id=0)
    procs = []
    if temperature > 0:
        s = torch.tensor(list(seeds or range(len(prompts))), dtype=torch.int64, device=lm.device)
        procs.append(seeded_logits_processor(s, P, temperature))
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), generation_config=gc,
                                logits_processor=procs)
    return out[:, P:].tolist()


def engine_tokens(lm, prompts: Sequence[Sequence[int]], max_new: int, temperature: float = 0.0,
                  seeds: Sequence[int] | None = None, engine=None, **engine_kw) -> list[list[int]]:
    from harness.engine.engine import Engine

    eng = engine or Engine(lm, **engine_kw)
    outs = eng.generate(prompts, max_new, temperature=temperature, seeds=list(seeds or range(len(prompts))),
                        stop_ids=[], pad_id=0, ignore_eos=True)
    return [o.ids for o in outs]


def reference_sums(lm, examples) -> dict[str, Any]:
    """The reference extractor's sums of per-example means ({method: [L+1, H] fp32})."""
    from harness.models.activations import example_means

    sums: dict[str, Any] = {}
    for batch in example_means(lm, examples, batch_size=len(examples)):
        for k, v in batch.items():
            sums[k] = v.sum(0) if k not in sums else sums[k] + v.sum(0)
    return sums


def _token_stats(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    total = sum(len(r) for r in ref)
    first = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None) for r, g in zip(ref, got)]
    return {"equal": ref == got, "match": same / max(total, 1), "first_diff": first}


def divergence(lm, prompts, ref, got, first) -> list[dict[str, Any]]:
    """Where greedy tokens part: HF's own full-forward logits there (one unpadded row, teacher-forced on
    HF generate's tokens): ``gap`` = logit of HF's token - logit of the engine's (negative: HF generate
    picked a token its own forward ranks lower), ``top_gap`` = top-1 - top-2, ``std`` of the logits."""
    import torch

    out = []
    for row, k in enumerate(first):
        if k is None:
            continue
        ids = torch.tensor([list(prompts[row]) + ref[row][:k]], device=lm.device)
        with torch.inference_mode():
            lg = lm.model(ids).logits[0, -1].float()
        top = lg.topk(2).values
        out.append({"row": row, "pos": k, "gap": float(lg[ref[row][k]] - lg[got[row][k]]),
                    "top_gap": float(top[0] - top[1]), "std": float(lg.std())})
    return out


def compare(lm, engine=None, *, seed: int = 0, max_new: int = MAX_NEW, token_budget: int | None = 24,
            **engine_kw) -> dict[str, Any]:
    """The three equalities on one model: {"greedy": ..., "sampled": ..., "extract": ...}.

    ``extract["max_rel_err"]``: the largest ``|engine - reference| / (|reference| + 1e-3 * max|reference|)``
    over methods, layers and units; ``token_budget``: the engine's extraction batches (small: several)."""
    import torch

    from harness.engine.engine import Engine

    eng = engine or Engine(lm, **engine_kw)
    prompts, examples = workload(seed)
    out: dict[str, Any] = {}
    ref = hf_tokens(lm, prompts, max_new)
    got = engine_tokens(lm, prompts, max_new, engine=eng)
    out["greedy"] = {**_token_stats(ref, got), "distinct": len({t for r in ref for t in r})}
    if not out["greedy"]["equal"]:
        out["greedy"]["divergence"] = divergence(lm, prompts, ref, got, out["greedy"]["first_diff"])
    ref = hf_tokens(lm, prompts, max_new, temperature=1.0)
    out["sampled"] = _token_stats(ref, engine_tokens(lm, prompts, max_new, temperature=1.0, engine=eng))
    r = reference_sums(lm, examples)
    g, n = eng.extract_sums(examples, token_budget=token_budget)
    errs, norm_errs = {}, {}
    for k in r:
        a, b = g[k].float().cpu(), r[k].float().cpu()
        errs[k] = float(((a - b).abs() / (b.abs() + 1e-3 * b.abs().max())).max())
        norm_errs[k] = float((a - b).norm() / b.norm())
    out["extract"] = {"n": n, "max_rel_err": max(errs.values()), "per_method": errs,
                      "rel_norm_err": max(norm_errs.values()),  # ||engine - reference|| / ||reference||, worst method
                      "finite": all(bool(torch.isfinite(v).all()) for v in g.values())}
    out["stats"] = {k: v for k, v in eng.stats.items() if k in ("graphs", "graph_error", "fused_errors", "batch_size")}
    return out


def check_architecture(model_type: str, *, dtype: str = "float32", device: str = "cpu", **engine_kw) -> dict[str, Any]:
    """``compare`` on the tiny model of ``model_type``, with the engine's own support verdict."""
    from harness.engine.support import (
        fast_extraction_supported,
        fast_generation_supported,
    )

    lm = tiny_model(model_type, dtype=dtype, device=device)
    res = compare(lm, **engine_kw)
    res["supported"] = {"generate": fast_generation_supported(lm.model), "extract": fast_extraction_supported(lm.model)}
    return res
