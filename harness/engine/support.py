"""Which architectures the engine runs, what its own forward adds around their decoder blocks, and why not.

The engine calls the model's decoder blocks itself (so it repeats the few lines of HF's base-model and
CausalLM forward around them: embedding multipliers, per-layer-type rotary tables and sliding windows,
logit scaling and soft-capping). An architecture is listed in ``ARCHS`` only when its test in
tests/test_engine_architectures.py passes: greedy tokens equal HF ``generate`` (fp32), sampled tokens
equal the ``hf`` generator's, and the vectors equal the reference extractor's, on a tiny random config
with every non-default feature of that architecture turned on. Anything else falls back to the ``hf``
generator / ``mean-diff`` extractor with a one-line notice naming the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """What HF's forward of one ``model_type`` does outside its decoder blocks, as config field names.

    ``embedding_multiplier``: embeddings ``* cfg.<field>``; ``logits_divisor`` / ``logits_multiplier``:
    logits ``/`` or ``*`` ``cfg.<field>``; ``final_softcap``: logits ``= tanh(logits / cap) * cap`` with
    ``cap = cfg.<field>`` (when not None). ``tested``: the features its architecture test turns on.
    """

    tested: str
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None
    logits_multiplier: str | None = None
    final_softcap: str | None = None


ARCHS: dict[str, Arch] = {  # the table of docs/engine.md (tests/test_engine_architectures.py compares them)
    "llama": Arch("attention and MLP biases, untied embeddings, llama3 rope scaling"),
    "mistral": Arch("sliding window, untied embeddings, linear rope scaling, head_dim != hidden/heads"),
    "qwen2": Arch("q/k/v biases, tied embeddings, sliding window on the upper layers, yarn rope scaling"),
    "qwen3": Arch("q/k norms, head_dim != hidden/heads, attention biases, untied embeddings"),
    "olmo2": Arch("full-width q/k norms, post-norms, untied embeddings"),
    "olmo3": Arch("sliding windows on some layers, full-width q/k norms, post-norms"),
    "granite": Arch("embedding, residual, attention and logits multipliers; tied embeddings",
         embedding_multiplier="embedding_multiplier", logits_divisor="logits_scaling"),
    "granitemoe": Arch("the same multipliers, experts",
         embedding_multiplier="embedding_multiplier", logits_divisor="logits_scaling"),
    "gemma": Arch("scaled embeddings, (1 + w) RMSNorm, GELU-tanh MLP"),
    "gemma2": Arch("attention and final logit soft-capping, alternating sliding windows, query_pre_attn_scalar",
         final_softcap="final_logit_softcapping"),
    "gemma3_text": Arch("rotary table per layer type, sliding windows, q/k norms, final soft-capping, "
         "linear rope on full layers",
         final_softcap="final_logit_softcapping"),
    "phi3": Arch("partial rotary, fused qkv / gate-up projections, sliding window"),
    "stablelm": Arch("partial rotary, q/k layer norms, qkv biases, parallel residual, LayerNorm"),
    "cohere": Arch("logit scale, parallel block, q/k norms, interleaved rotary",
         logits_multiplier="logit_scale"),
    "olmo": Arch("qkv clipping, non-parametric LayerNorm"),
    "smollm3": Arch("no-rope layers, untied embeddings"),
    "starcoder2": Arch("LayerNorm with biases, non-gated GELU MLP, sliding window"),
    "glm": Arch("partial interleaved rotary, fused gate-up projection, attention biases"),
    "mixtral": Arch("top-2 of 4 experts, sliding window"),
    "qwen2_moe": Arch("experts with a gated shared expert, a dense layer, q/k/v biases"),
    "qwen3_moe": Arch("experts with normalised top-k, a dense layer, q/k norms"),
    "olmoe": Arch("experts with normalised top-k, qkv clipping, q/k norms"),
}
SUPPORTED_MODEL_TYPES = frozenset(ARCHS)


def base_model(model):
    """The decoder stack (``model.model`` for the usual CausalLM classes)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers"):
        base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise TypeError(f"{type(model).__name__}: no decoder layers found at model.model.layers")
    return base


def layer_windows(config, n_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as HF's base model picks its masks: by
    ``config.layer_types`` when the config has them, else ``config.sliding_window`` for every layer."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in list(types)[:n_layers]]
    return [window] * n_layers


def _unsupported_layers(model, base) -> str:
    """Why the engine's own decode loop cannot call these blocks (empty: it can)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or []
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        return f"layer types {odd} (only full and sliding-window attention)"
    if not all(hasattr(base, a) for a in ("embed_tokens", "rotary_emb", "norm")) or not hasattr(model, "lm_head"):
        return "no embed_tokens / rotary_emb / norm / lm_head to call"
    params = inspect.signature(base.layers[0].forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return f"{type(base.layers[0]).__name__}.forward takes no **kwargs"
    windows = layer_windows(cfg, len(base.layers))
    for i, layer in enumerate(base.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "sliding_window") and attn.sliding_window != windows[i]:
            return (f"layer {i}: its attention's sliding window {attn.sliding_window} is not the "
                    f"config's {windows[i]}")
    return ""


# rotary tables recomputed from the longest position of each call: HF's results depend on the batch and on
# earlier calls (and HF generate re-runs the whole prefix once longrope switches factors)
_STATEFUL_ROPE = ("dynamic", "longrope")


def _rope_types(base) -> list[str]:
    rt = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    return sorted(set(rt.values())) if isinstance(rt, dict) else [rt] if isinstance(rt, str) else []


def _common(model) -> tuple[bool, str]:
    mt = getattr(model.config, "model_type", "")
    if mt not in ARCHS:
        return False, f"model_type {mt!r} is not among the architectures the engine is tested on ({', '.join(sorted(ARCHS))})"
    try:
        base = base_model(model)
    except TypeError as e:
        return False, str(e)
    bad = [t for t in _rope_types(base) if any(k in t for k in _STATEFUL_ROPE)]
    if bad:
        return False, (f"rope_type {bad[0]!r} recomputes its rotary tables from the longest position of each call "
                       "(HF's results depend on the batch)")
    from harness.models.loading import model_devices

    devices = model_devices(model)
    if len(devices) > 1:  # device_map placement: the static cache, the graphs and the sums live on one device
        return False, f"model spans {len(devices)} devices ({', '.join(devices)}; device_map)"
    return True, ""


def fast_generation_supported(model) -> tuple[bool, str]:
    """Whether the engine's own decode loop can run this model (else use HF generate), and why not."""
    ok, why = _common(model)
    if not ok:
        return ok, why
    why = _unsupported_layers(model, base_model(model))
    return (not why), why


def fast_extraction_supported(model) -> tuple[bool, str]:
    """Whether the engine's hooked extraction can run this model (else the reference extractor), and why not."""
    ok, why = _common(model)
    if ok and not hasattr(base_model(model), "norm"):
        return False, "no final norm at model.model.norm to read the last hidden state from"
    return ok, why


#: what ``auto`` runs where the engine does not: the reference component of each kind
AUTO_FALLBACK = {"generator": "hf", "extractor": "mean-diff"}


def auto_component(kind: str, device: str = "auto", device_map: str = "", *,
                   cuda_available: bool | None = None) -> tuple[str, str]:
    """What the ``auto`` generator / extractor runs, and why: ``fast`` on a CUDA device, else the
    reference component (``hf`` / ``mean-diff``). Decided from the settings before the model loads; the
    fast component checks the loaded model's architecture itself (``fast_generation_supported`` /
    ``fast_extraction_supported``) and falls back, recording why. ``cuda_available`` defaults to
    ``torch.cuda.is_available()`` when ``device`` is ``auto``."""
    ref = AUTO_FALLBACK[kind]
    device = str(device or "auto")
    if device_map:
        return ref, f"device_map {device_map!r} may place the model on several devices (the engine runs on one)"
    if device == "auto":
        if cuda_available is None:
            import torch

            cuda_available = bool(torch.cuda.is_available())
        device = "cuda" if cuda_available else "cpu"
    if device.startswith("cuda"):
        return "fast", f"device {device}: the engine runs the model there (its architecture is checked when it loads)"
    return ref, f"device {device}: the engine's speed-up needs CUDA"
