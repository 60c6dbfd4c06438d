"""The engine's extraction: sums of per-example mean activations at every hidden_states index.

One forward of the base model (``model.model``) per length-sorted, right-padded batch (no mask needed:
real tokens never attend to right padding), no lm_head, no ``output_hidden_states``: forward hooks on the
decoder layers (and the final norm) fold each layer's output into fp32 sums of per-example means with one
matrix-vector product per layer and method. Batches are sized by tokens from free memory; a batch that
runs out of memory halves the token budget and is redone. Vectors equal the reference extractor's
(``harness.models.activations``) within bf16 tolerance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from harness.core.batching import is_oom
from harness.models.activations import METHODS, NonFiniteActivationError
from harness.models.batch import examples_batch

if TYPE_CHECKING:  # pragma: no cover
    from harness.engine.engine import Engine


def extract_row_bytes(engine: "Engine") -> int:
    """Device bytes one token of an extraction batch needs (activations and temporaries)."""
    e = engine
    item = e.dtype.itemsize
    return (e.inter * 3 + e.hidden * 10 + e.n_heads * 64) * item + e.hidden * 8


def extract_sums(engine: "Engine", examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                 methods: Sequence[str] = METHODS, token_budget: int | None = None) -> tuple[dict[str, Any], int]:
    """Sum over examples of per-example means at every hidden_states index: {method: [L+1, H] fp32}.

    Each batch runs through ``engine._extract_batch`` (one forward with the hooks folding into ``state``)."""
    import torch

    e = engine
    dev = e.device
    L1 = e.n_layers + 1
    sums = {m: torch.zeros(L1, e.hidden, dtype=torch.float32, device=dev) for m in methods}
    n = len(examples)
    if n == 0:
        return sums, 0
    if token_budget is None:
        token_budget = int(max(512, min(65536, e.free_memory() * 0.5 // extract_row_bytes(e))))
    order = sorted(range(n), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    tok = getattr(e.lm, "tokenizer", None)
    pad = (tok.pad_token_id or 0) if tok is not None else 0
    state: dict[str, Any] = {}
    avg = [m for m in methods if m != "prompt_last"]
    state["avg"] = avg

    def fold(idx: int, h):
        h = h[0] if isinstance(h, tuple) else h
        acc = state["acc"]
        if avg:  # one fp32 pass over the layer's output for all averaged methods
            got = state["W"] @ h.reshape(-1, h.shape[-1]).float()
            for r, m in enumerate(avg):
                acc[m][idx] += got[r]
        if "prompt_last" in methods:
            acc["prompt_last"][idx] += h[state["ar"], state["last"]].float().sum(0)

    handles = [e.base.layers[0].register_forward_pre_hook(lambda mod, args: fold(0, args[0]))]
    for li, layer in enumerate(e.base.layers[:-1]):
        handles.append(layer.register_forward_hook(lambda mod, a, out, i=li + 1: fold(i, out)))
    handles.append(e.base.norm.register_forward_hook(lambda mod, a, out: fold(e.n_layers, out)))
    try:
        i = 0
        while i < n:
            T = len(examples[order[min(n - 1, i)]][0]) + len(examples[order[min(n - 1, i)]][1])
            j = i
            while j < n:
                Tj = len(examples[order[j]][0]) + len(examples[order[j]][1])
                if (j - i + 1) * Tj > token_budget and j > i:
                    break
                T = Tj
                j += 1
            idx = order[i:j]
            state["acc"] = {m: torch.zeros_like(v) for m, v in sums.items()}
            try:
                e._extract_batch([examples[k] for k in idx], T, pad, methods, state)
            except Exception as ex:
                if not is_oom(ex) or token_budget <= 64:
                    raise
                token_budget //= 2
                e.stats["extract_oom_halvings"] = e.stats.get("extract_oom_halvings", 0) + 1
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue  # the batch's partial sums are dropped; it is redone with smaller batches
            for m in methods:
                sums[m] += state["acc"][m]
            i = j
    finally:
        for h in handles:
            h.remove()
    for k, v in sums.items():
        if not torch.isfinite(v).all():
            raise NonFiniteActivationError(
                f"NaN or inf in {k} activations: the model produced non-finite hidden states. "
                "Fix: use float32/bfloat16 instead of float16, or check the model weights")
    e.stats["token_budget"] = token_budget
    return sums, n


def extract_batch(engine: "Engine", chunk, T: int, pad: int, methods, state) -> None:
    """One right-padded forward of the base model; the hooks of ``extract_sums`` fold it into ``state``."""
    import torch

    e = engine
    dev = e.device
    b = examples_batch(chunk, pad)  # T wide: the chunk's longest example
    # per-example mean weights: 1 / (number of the example's prompt or response tokens) on those tokens
    w = {"response_avg": b.response.float() / b.response.sum(1, keepdim=True).clamp(min=1),
         "prompt_avg": b.prompt.float() / b.prompt.sum(1, keepdim=True).clamp(min=1)}
    state["W"] = torch.stack([w[m].reshape(-1) for m in state["avg"]]).to(dev) if state["avg"] else None
    state["ar"] = torch.arange(len(chunk), device=dev)
    state["last"] = b.last.to(dev)
    with torch.inference_mode(), e.fused_ctx(exact_norm=True):  # vectors: eager's values
        e.base(input_ids=b.ids.to(dev), use_cache=False)
    e.note_fused()
