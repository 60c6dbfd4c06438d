"""Read a vector with a sparse autoencoder stored in the SAELens layout (local files only).

A folder with ``cfg.json`` (``d_in``, ``d_sae``, ``hook_name`` at the top level or under
``metadata``; older files: ``hook_point``/``hook_layer``) and ``sae_weights.safetensors`` with
``W_dec [d_sae, d_in]`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``b_dec`` are loaded when present, and
``threshold`` for the ``jumprelu`` architecture: ``cfg.json`` ``architecture``, absent = standard).
Ranking latents by decoder cosine works for any architecture; ``encode`` knows standard and JumpReLU.

Layer mapping (TransformerLens hook names): hidden_states index ``L`` is the output of block ``L-1``,
which is ``blocks.{L-1}.hook_resid_post`` and also ``blocks.{L}.hook_resid_pre``. Other hook points
(attention/MLP outputs) are not the residual stream; reading a residual vector with them is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: the SAELens architectures read here (``cfg.json`` ``architecture``; absent = standard)
ARCHITECTURES = ("standard", "jumprelu")
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def hook_for_layer(L: int) -> str:
    """hidden_states index L -> ``blocks.{L-1}.hook_resid_post`` (L >= 1)."""
    if L < 1:
        raise HarnessError(f"hidden_states index {L} is the embedding output; it has no hook_resid_post "
                           "(it is blocks.0.hook_resid_pre)")
    return f"blocks.{L - 1}.hook_resid_post"


def layer_for_hook(hook_name: str) -> int | None:
    """``blocks.k.hook_resid_post`` -> k+1, ``blocks.k.hook_resid_pre`` -> k; None for other hooks."""
    m = _HOOK.match(hook_name or "")
    if not m:
        return None
    k = int(m.group(1))
    return k + 1 if m.group(2) == "post" else k


@dataclass
class SAE:
    path: str
    cfg: dict
    W_dec: Any  # [d_sae, d_in]
    W_enc: Any = None
    b_enc: Any = None
    b_dec: Any = None
    hook_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def layer(self) -> int | None:
        """The hidden_states index this SAE reads (None when its hook is not the residual stream)."""
        return layer_for_hook(self.hook_name)


def load_sae(path: str | Path) -> SAE:
    """Load ``cfg.json`` + ``sae_weights.safetensors`` from a folder (never downloads anything)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_p, w_p = path / CFG_FILE, path / WEIGHTS_FILE
    for p in (cfg_p, w_p):
        if not p.exists():
            raise HarnessError(f"{p} is missing: an SAE folder in the SAELens layout needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_p.read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{cfg_p}: not valid JSON ({e})") from None
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = cfg.get("hook_name") or meta.get("hook_name") or cfg.get("hook_point") or ""
    if not hook and cfg.get("hook_layer") is not None:
        hook = f"blocks.{int(cfg['hook_layer'])}.hook_resid_post"
    try:
        w = load_file(str(w_p))
    except Exception as e:
        raise HarnessError(f"{w_p}: not a readable safetensors file ({e})") from None
    if "W_dec" not in w:
        raise HarnessError(f"{w_p}: no tensor 'W_dec' (has {', '.join(sorted(w))}). Fix: save the SAE with SAELens")
    W_dec = w["W_dec"].float()
    if W_dec.dim() != 2:
        raise HarnessError(f"{w_p}: W_dec has shape {tuple(W_dec.shape)}; expected [d_sae, d_in]")
    for key, dim in (("d_in", 1), ("d_sae", 0)):
        if key in cfg and int(cfg[key]) != W_dec.shape[dim]:
            if key == "d_in" and int(cfg[key]) == W_dec.shape[0] and "d_sae" in cfg and int(cfg["d_sae"]) == W_dec.shape[1]:
                raise HarnessError(f"{w_p}: W_dec is stored transposed ({tuple(W_dec.shape)}); SAELens stores "
                                   "[d_sae, d_in]. Fix: save W_dec.T")
            raise HarnessError(f"{cfg_p}: field '{key}' = {cfg[key]} but W_dec has shape {tuple(W_dec.shape)} "
                               "([d_sae, d_in])")
    # the decoder (what rank_latents reads) is the same for every architecture; encode needs to know it
    arch = str(cfg.get("architecture") or meta.get("architecture") or "standard").lower()
    extra: dict[str, Any] = {"architecture": arch}
    if arch == "jumprelu":
        if "threshold" not in w:
            raise HarnessError(f"{w_p}: a JumpReLU SAE needs the tensor 'threshold' (has {', '.join(sorted(w))})")
        extra["threshold"] = w["threshold"].float()
    return SAE(path=str(path), cfg=cfg, W_dec=W_dec, W_enc=w.get("W_enc"), b_enc=w.get("b_enc"),
               b_dec=w.get("b_dec"), hook_name=hook, extra=extra)


def encode(sae: SAE, x: Any) -> Any:
    """The SAE's latent activations of ``x`` (``[..., d_in]``), as SAELens computes them for the
    ``standard`` (ReLU) and ``jumprelu`` (pre-activation kept where it exceeds ``threshold``)
    architectures: ``pre = (x - b_dec) @ W_enc + b_enc`` (``b_dec`` subtracted when the config's
    ``apply_b_dec_to_input``, the default, says so)."""
    import torch

    arch = sae.extra.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise HarnessError(f"SAE {sae.path}: encoding the {arch!r} architecture is not supported here (only "
                           f"{', '.join(ARCHITECTURES)}); its decoder directions can still be ranked")
    if sae.W_enc is None or sae.b_enc is None:
        raise HarnessError(f"SAE {sae.path}: no W_enc/b_enc in {WEIGHTS_FILE}; only the decoder is there")
    norm = str(sae.cfg.get("normalize_activations") or "none")
    if norm != "none":
        raise HarnessError(f"SAE {sae.path}: normalize_activations={norm!r} is not supported here (only 'none')")
    x = torch.as_tensor(x).float()
    if sae.b_dec is not None and sae.cfg.get("apply_b_dec_to_input", True):
        x = x - sae.b_dec.float()
    pre = x @ sae.W_enc.float() + sae.b_enc.float()
    if arch == "jumprelu":
        return pre * (pre > sae.extra["threshold"]).to(pre.dtype)
    return torch.relu(pre)


def rank_latents(sae: SAE, v: Any, *, k: int = 20) -> dict:
    """Latents whose decoder directions align most (and most negatively) with ``v`` by cosine."""
    import torch

    v = torch.as_tensor(v).float().flatten()
    if v.shape[0] != sae.d_in:
        raise HarnessError(f"the vector has {v.shape[0]} dimensions but the SAE at {sae.path} reads d_in={sae.d_in}. "
                           "Fix: use an SAE trained on this model's residual stream")
    if float(v.norm()) == 0:
        raise HarnessError("the vector has norm 0; cosine similarity is undefined")
    rows = sae.W_dec.float()
    cos = (rows @ v) / (rows.norm(dim=1).clamp(min=1e-12) * v.norm())
    k = min(k, sae.d_sae)
    top = torch.topk(cos, k)
    bot = torch.topk(-cos, k)
    out = {"top": [{"latent": int(i), "cosine": round(float(c), 6)} for c, i in zip(top.values, top.indices)],
           "bottom": [{"latent": int(i), "cosine": round(-float(c), 6)} for c, i in zip(bot.values, bot.indices)],
           "d_sae": sae.d_sae, "hook_name": sae.hook_name, "architecture": sae.extra.get("architecture", "standard")}
    if sae.W_enc is not None and sae.b_enc is not None and out["architecture"] in ARCHITECTURES:
        acts = encode(sae, v)  # the latents the vector itself switches on, as the SAE's encoder sees it
        n = int((acts > 0).sum())
        act = torch.topk(acts, min(k, n)) if n else None
        out["encoded"] = {"active": n, "top": [] if act is None else
                          [{"latent": int(i), "activation": round(float(a), 6)} for a, i in zip(act.values, act.indices)]}
    return out


def read_vector(sae: SAE, vectors: Any, layer: int | None = None, *, k: int = 20,
                allow_layer_mismatch: bool = False, num_layers: int | None = None) -> dict:
    """Rank the SAE's latents against ``vectors[layer]`` (``vectors``: ``[num_layers + 1, d]`` or ``[d]``).

    ``layer`` defaults to the SAE's own layer. A vector from another layer than the SAE's hook is
    refused (``allow_layer_mismatch=True`` turns that into a warning). So is the last index: HF's
    ``hidden_states[num_layers]`` is read *after* the final norm, while ``blocks.{num_layers-1}.
    hook_resid_post`` is before it (their norms differ by an order of magnitude or more), so an SAE
    there does not read that vector. ``num_layers`` defaults to ``len(vectors) - 1`` for a 2-D input.
    """
    import torch

    sl = sae.layer
    if sl is None:
        msg = (f"SAE {sae.path} reads hook {sae.hook_name or '(none)'!r}, not the residual stream "
               "(blocks.k.hook_resid_post/pre); persona vectors live in the residual stream")
        if not allow_layer_mismatch:
            raise HarnessError(msg + ". Fix: use a resid_post SAE, or pass allow_layer_mismatch")
        warnings.warn(msg, stacklevel=2)
    v = torch.as_tensor(vectors).float()
    if layer is None:
        if v.dim() == 2:
            if sl is None:
                raise HarnessError("give layer=: the SAE's hook does not name a residual layer")
            layer = sl
    if v.dim() == 2:
        if num_layers is None:
            num_layers = v.shape[0] - 1
        if not 0 <= int(layer) < v.shape[0]:  # type: ignore[arg-type]
            raise HarnessError(f"layer {layer} is outside the vector file's 0..{v.shape[0] - 1}")
        v = v[int(layer)]  # type: ignore[arg-type]
    if layer is not None and sl is not None and int(layer) != sl:
        msg = (f"the vector is from hidden_states index {layer} ({hook_for_layer(int(layer)) if int(layer) >= 1 else 'embeddings'}) "
               f"but SAE {sae.path} reads {sae.hook_name} = hidden_states index {sl}")
        if not allow_layer_mismatch:
            raise HarnessError(msg + f". Fix: read vectors[{sl}] or use an SAE for {hook_for_layer(int(layer))}")
        warnings.warn(msg, stacklevel=2)
    res = rank_latents(sae, v, k=k)
    if num_layers is not None and layer is not None and int(layer) == num_layers and sl == num_layers:
        msg = (f"SAE {sae.path} reads {sae.hook_name}, the last block's output before the final norm, but the "
               f"vector at hidden_states index {num_layers} is read after the final norm (HF applies it to the last "
               "hidden state), so they are not the same activation")
        if not allow_layer_mismatch:
            raise HarnessError(msg + f". Fix: use an SAE at an inner layer (blocks.k.hook_resid_post, k < "
                               f"{num_layers - 1}) and its vector, or pass --allow-layer-mismatch to compare anyway")
        warnings.warn(msg, stacklevel=2)
    res.update({"layer": layer, "sae_layer": sl, "sae_path": sae.path})
    return res
