"""Per-example mean activations at every layer (the hidden_states convention).

For each example (prompt ids + response ids) and every hidden_states index l:
  response_avg[l] = mean of h[l] over the response tokens
  prompt_avg[l]   = mean of h[l] over the prompt tokens
  prompt_last[l]  = h[l] at the last prompt token (the end of the assistant header)
Batches are right-padded; sums are taken in fp32 on the model's device.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from harness.core.errors import NonFiniteActivationError
from harness.models.batch import examples_batch

METHODS = ("response_avg", "prompt_avg", "prompt_last")


def example_means(lm, examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                  methods: Sequence[str] = METHODS) -> Iterator[dict[str, Any]]:
    """Yield, per batch, {method: float32 tensor [b, L+1, H]} for (prompt_ids, response_ids) pairs."""
    import torch

    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id or 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        B = len(chunk)
        b = examples_batch(chunk, pad).to(dev)
        ids, att, resp, prm, last = b.ids, b.attention, b.response, b.prompt, b.last
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=False,
                        logits_to_keep=1)
        hs = out.hidden_states  # tuple of L+1 [B, T, H]
        res: dict[str, Any] = {}
        rm = resp.to(torch.float32)[..., None]
        pm = prm.to(torch.float32)[..., None]
        rcount = rm.sum(1).clamp(min=1)
        pcount = pm.sum(1).clamp(min=1)
        if "response_avg" in methods:
            res["response_avg"] = torch.stack([(h.float() * rm).sum(1) / rcount for h in hs], 1)
        if "prompt_avg" in methods:
            res["prompt_avg"] = torch.stack([(h.float() * pm).sum(1) / pcount for h in hs], 1)
        if "prompt_last" in methods:
            ar = torch.arange(B, device=dev)
            res["prompt_last"] = torch.stack([h[ar, last].float() for h in hs], 1)
        for k, v in res.items():
            if not torch.isfinite(v).all():
                bad = [s + i for i in range(B) if not torch.isfinite(v[i]).all()]
                raise NonFiniteActivationError(
                    f"NaN or inf in {k} activations for example(s) {bad}: the model produced non-finite "
                    "hidden states. Fix: use float32/bfloat16 instead of float16, or check the model weights")
        yield res
