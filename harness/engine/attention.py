"""The engine's attention function, registered with transformers' ``AttentionInterface``.

Grouped-query attention over the static cache without repeating K/V. Prefill (several query
positions) runs ``scaled_dot_product_attention`` with the engine's additive mask; decode (one query
position) is two matmuls around an fp32 softmax, the piece the fused path compiles. Attention
soft-capping (``softcap``, Gemma 2/3) runs the same matmul-softmax path at prefill too (SDPA has no
soft-capping), in HF's eager order: scale, cap, add the mask, fp32 softmax.

The softmax is chosen by name: ``attention_name(None)`` is the eager one, ``attention_name(fused)``
registers (once) a variant bound to that ``kernels.Fused``'s softmax. ``AttnSwap`` points every config
of the model at a name while the engine runs and restores the old implementation afterwards.
"""

from __future__ import annotations

import functools
from typing import Any

from harness.models.blockcall import block_call_of

ATTN_NAME = "harness_engine"
_REGISTERED: set[str] = set()


def probs_eager(s, mask, scale: float, dt, softcap: float | None = None):
    """Softmax (fp32) of the scaled, optionally soft-capped scores plus the additive mask, cast to ``dt``."""
    import torch

    s = s.float() * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1).to(dt)


def engine_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     softcap=None, probs=None, decode=None, **kwargs):
    """GQA attention over the static cache. ``attention_mask`` is additive ``[B, 1, Q, K]`` (0 / min);
    ``probs`` the softmax (``probs_eager`` or a fused version of it); ``decode`` a fused one-token attention
    (``kernels.Fused.decode``: reads each row's first ``BlockCall.kv_lengths`` slots only; returns None
    where it does not apply)."""
    import torch

    probs = probs or probs_eager
    B, Hq, Q, D = query.shape
    Hk = key.shape[1]
    g = Hq // Hk
    scale = float(scaling if scaling is not None else D ** -0.5)
    if Q == 1 and decode is not None and softcap is None:
        call = block_call_of(kwargs)
        o = decode(query, key, value, attention_mask, None if call is None else call.kv_lengths, scale)
        if o is not None:
            return o, None
    if Q == 1:
        qg = query.reshape(B, Hk, g, D)
        s = torch.matmul(qg, key.transpose(-1, -2))  # [B, Hk, g, K]
        p = probs(s, attention_mask, scale, value.dtype, softcap)  # mask [B, 1, 1, K]
        o = torch.matmul(p, value)  # [B, Hk, g, D]
        return o.reshape(B, Hq, 1, D).transpose(1, 2), None
    if softcap is not None:  # prefill with soft-capping: the same path over Q query positions
        qg = query.reshape(B, Hk, g * Q, D)  # the g query heads of one K/V head are contiguous
        s = torch.matmul(qg, key.transpose(-1, -2)).reshape(B, Hk, g, Q, -1)  # [B, Hk, g, Q, K]
        mask = None if attention_mask is None else attention_mask[:, :, None]  # [B, 1, 1, Q, K]
        p = probs(s, mask, scale, value.dtype, softcap)
        o = torch.matmul(p.reshape(B, Hk, g * Q, -1), value)  # [B, Hk, g * Q, D]
        return o.reshape(B, Hq, Q, D).transpose(1, 2), None
    o = torch.nn.functional.scaled_dot_product_attention(
        query, key, value,
        attn_mask=None if attention_mask is None else attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype),
        scale=scale, enable_gqa=g > 1, is_causal=attention_mask is None)
    return o.transpose(1, 2), None


def attention_name(fused: Any = None) -> str:
    """The registered name of the engine's attention with the eager softmax (``fused`` None) or with
    ``fused``'s compiled one (``kernels.Fused``; registered on first use)."""
    from transformers import AttentionInterface

    if fused is None:
        name, fn = ATTN_NAME, engine_attention
    else:
        name = f"{ATTN_NAME}_fused_{fused.mode}"
        fn = functools.partial(engine_attention, probs=fused.probs, decode=fused.decode if fused.triton else None)
    if name not in _REGISTERED:
        AttentionInterface.register(name, fn)
        _REGISTERED.add(name)
    return name


class AttnSwap:
    """Point every config in the model at the attention implementation ``name`` for a while."""

    def __init__(self, model, name: str = ATTN_NAME):
        self.name = name
        self.cfgs = []
        seen = set()
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
                seen.add(id(c))
                self.cfgs.append(c)

    def __enter__(self):
        self.old = [c._attn_implementation_internal for c in self.cfgs]
        for c in self.cfgs:
            c._attn_implementation_internal = self.name
        return self

    def __exit__(self, *exc):
        for c, o in zip(self.cfgs, self.old):
            c._attn_implementation_internal = o
        return False
