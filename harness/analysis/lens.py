"""Logit lens of a vector: which tokens it promotes and suppresses through the unembedding.

``raw``: logits = W_U v (+ bias). ``final_norm``: logits = W_U norm(v), the model's final norm
applied to v alone. For RMSNorm that is W_U (g * v) up to a positive scale, so the two lists differ
only through the norm's per-channel gain g (and a LayerNorm's centring and bias).
Token ids beyond ``len(tokenizer)`` (padded vocabularies) are left out.
"""

from __future__ import annotations

from typing import Any

from harness.core.errors import HarnessError

_NORM_PATHS = ("model.norm", "model.final_layernorm", "model.decoder.final_layer_norm", "transformer.ln_f",
               "gpt_neox.final_layer_norm", "model.language_model.norm", "norm", "ln_f")


def find_final_norm(model: Any) -> Any:
    from harness.analysis.steering import get_path

    for p in _NORM_PATHS:
        m = get_path(model, p)
        if m is not None and callable(m) and hasattr(m, "weight"):
            return m
    raise HarnessError(f"cannot find the final norm of {type(model).__name__} (tried {', '.join(_NORM_PATHS)})")


def _token_text(tok: Any, i: int) -> str:
    s = tok.decode([i])
    return s if s.strip() else repr(s)


def logit_lens(lm: Any, v: Any, *, k: int = 10) -> dict:
    """Top and bottom ``k`` tokens of ``v`` ([hidden]) with and without the final norm.

    Returns ``{"raw": {"top": [...], "bottom": [...]}, "final_norm": {...}}``; each entry is
    ``{"id", "token", "logit"}``.
    """
    import torch

    model, tok = lm.model, lm.tokenizer
    v = torch.as_tensor(v).float()
    head = model.get_output_embeddings()
    W = head.weight
    if v.dim() != 1 or v.shape[0] != W.shape[1]:
        raise HarnessError(f"logit lens: vector has shape {tuple(v.shape)} but the unembedding expects ({W.shape[1]},)")
    n_tok = min(len(tok), W.shape[0])
    norm = find_final_norm(model)
    out = {}
    with torch.inference_mode():
        x = v.to(W.device, W.dtype)
        for name, h in (("raw", x), ("final_norm", norm(x[None, None])[0, 0])):
            logits = head(h[None])[0].float()[:n_tok]
            top = torch.topk(logits, min(k, n_tok))
            bot = torch.topk(-logits, min(k, n_tok))
            out[name] = {
                "top": [{"id": int(i), "token": _token_text(tok, int(i)), "logit": float(f"{float(s):.6g}")}
                        for s, i in zip(top.values, top.indices)],
                "bottom": [{"id": int(i), "token": _token_text(tok, int(i)), "logit": float(f"{-float(s):.6g}")}
                           for s, i in zip(bot.values, bot.indices)],
            }
    return out


def lens_layers(lm: Any, vectors: Any, layers: list[int], *, k: int = 10) -> dict[int, dict]:
    """``logit_lens`` of ``vectors[L]`` for each L (``vectors`` is ``[num_layers + 1, hidden]``)."""
    return {int(L): logit_lens(lm, vectors[int(L)], k=k) for L in layers}
