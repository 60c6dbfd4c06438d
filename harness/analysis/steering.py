"""Activation steering: add ``coef * v`` to the residual stream during forward passes and ``generate``.

Layer convention (the same as every vector file, see ``harness.core.records.LAYER_CONVENTION``):
vector index ``L`` is ``hidden_states[L]``, the output of decoder block ``L - 1``, so steering at
``L`` puts a forward hook on ``model.layers[L - 1]`` and adds to that block's output. Index 0 (the
embeddings) cannot be steered. Index ``num_hidden_layers`` is read *after* the final norm by HF but
is steered *before* it (on the last block's output); a warning says so.

``positions`` (per forward call; under KV-cached ``generate`` the first call is the prefill and
each later call sees one new token):

* ``"all"``: every position of every call (prompt and every generated token).
* ``"prompt"``: every position of the prefill call only (a call with no cached tokens; when the
  cache is not visible, a call with more than one token, as in the reference), nothing at decode.
* ``"response"``: only the last position of every call: the last prompt token at prefill, then each
  generated token. This is the paper's (reference ``ActivationSteerer``) meaning.

Hook order: the steering hook is *prepended* to the block's forward hooks, so every other hook on
the block (transformers 5 records ``output_hidden_states`` with forward hooks) sees the steered
output, whatever the order the hooks were installed in.

Padding: the reference adds to left-padding positions too ("all" and "prompt"). Pads never
influence real tokens (attention masks them), but to make the touched positions exact we skip
positions whose ``attention_mask`` is 0 whenever the model gets a 2-D mask (``generate`` always
passes one). Without a mask every position counts as real.

``scale`` fixes what ``coef`` means:

* ``"raw"``: ``coef * v``; coef is in units of the mean difference (the paper, ``--coef 2.0``).
* ``"unit"``: ``coef * v / ||v||``; coef is an L2 length in activation space (repeng, EasySteer).
* ``"mean_norm"``: ``coef * norms[L] * v / ||v||`` where ``norms[L]`` is the layer's mean token
  activation norm (``mean_activation_norms``, or ``activation_norms.json`` in a run directory);
  coef 0.1 adds 10 % of a typical activation's length.

``coef`` may be a number, one number per batch row (rows in the order of the batch), or a dict
``{layer: number or per-row numbers}``; per-row coefficients let one batched ``generate`` run
several steering strengths at once (a coefficient of 0 leaves its row bit-identical).

Loops that call the decoder blocks themselves (``harness.engine``) bypass the block owner's
``forward``, where the mask and the cache length are read; they pass the same with every block call
as a ``harness.models.blockcall.BlockCall`` (``mask``, ``prefill``, ``rows``, ``n``), which the steering
hook reads from the call's keyword arguments, so every position mode is exact there too. ``rows`` maps
the loop's batch rows to its callers' rows (the engine sorts prompts by length and splits the batch),
so per-row coefficients are given in the caller's order; under a ``BlockCall`` without ``rows`` they
are refused.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from harness.core.errors import HarnessError
from harness.models.blockcall import block_call_of

POSITIONS = ("all", "prompt", "response")
SCALES = ("raw", "unit", "mean_norm")
NORMS_FILE = "activation_norms.json"

_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "language_model.model.layers",
                "transformer.h", "transformer.layers", "gpt_neox.layers", "model.h", "layers", "h", "blocks")


def _model_of(target: Any) -> Any:
    """The torch module from a ``LoadedModel`` or a module."""
    return getattr(target, "model", target) if not hasattr(target, "named_modules") else target


def get_path(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``path = "a.b.c"`` (None when a part is missing)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: Any) -> tuple[Any, Any]:
    """Return (the decoder block ModuleList, the module that owns it).

    Tries the usual attribute paths (``model.layers``, ``transformer.h``, ``gpt_neox.layers`` ...),
    then any ModuleList whose length is ``config.num_hidden_layers``.
    """
    import torch

    model = _model_of(model)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in _LAYER_PATHS:
        obj = get_path(model, path)
        if isinstance(obj, torch.nn.ModuleList) and (n is None or len(obj) == n):
            parent = get_path(model, path.rsplit(".", 1)[0]) if "." in path else model
            return obj, parent
    mods = dict(model.named_modules())
    for name, mod in mods.items():
        if isinstance(mod, torch.nn.ModuleList) and n is not None and len(mod) == n:
            parent = mods.get(name.rsplit(".", 1)[0], model) if "." in name else model
            return mod, parent
    raise HarnessError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList at "
                       f"{', '.join(_LAYER_PATHS)} nor one of length num_hidden_layers={n}. "
                       "Fix: steer a standard HF causal LM, or pass a model whose blocks are at model.layers")


def _num_layers(model: Any) -> int:
    layers, _ = find_decoder_layers(model)
    return len(layers)


def _hidden_size(model: Any) -> int:
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    if h is None:
        raise HarnessError(f"{type(model).__name__}.config has no hidden_size")
    return int(h)


def normalize_vectors(vectors: Any, layers: int | Sequence[int] | None, model: Any) -> dict[int, Any]:
    """Turn the accepted vector forms into ``{hidden_states index: float32 tensor [hidden]}``.

    Accepted: ``{L: tensor[H]}``; a tensor ``[H]`` with ``layers``; a per-layer tensor
    ``[num_layers + 1, H]`` (a vector file's tensor) with ``layers``.
    """
    import torch

    n, hidden = _num_layers(model), _hidden_size(model)
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(vectors, Mapping):
        if layers is not None:
            missing = [L for L in layers if L not in vectors]
            if missing:
                raise HarnessError(f"layers {missing} are not keys of the vector dict (keys: {sorted(vectors)})")
            vectors = {L: vectors[L] for L in layers}
        out = {int(L): torch.as_tensor(v) for L, v in vectors.items()}
    else:
        v = torch.as_tensor(vectors)
        if layers is None:
            raise HarnessError("give layers=... with a single vector (or pass a dict {layer: vector})")
        if v.dim() == 1:
            out = {int(L): v for L in layers}
        elif v.dim() == 2:
            if v.shape[0] != n + 1 or v.shape[1] != hidden:
                raise HarnessError(
                    f"per-layer vector tensor has shape {tuple(v.shape)} but this model needs "
                    f"({n + 1}, {hidden}) = (num_hidden_layers + 1, hidden_size). Fix: use vectors extracted "
                    "with this model")
            out = {int(L): v[int(L)] for L in layers}
        else:
            raise HarnessError(f"a steering vector must be 1-D [hidden] or 2-D [layers+1, hidden], got shape {tuple(v.shape)}")
    if not out:
        raise HarnessError("no layers to steer")
    for L, v in out.items():
        if v.dim() != 1 or v.shape[0] != hidden:
            raise HarnessError(
                f"steering vector for layer {L} has shape {tuple(v.shape)} but the model's residual stream is "
                f"({hidden},) (hidden_size of {type(model).__name__}). Fix: use a vector extracted with this model")
        if not 1 <= L <= n:
            raise HarnessError(
                f"layer {L} cannot be steered: vector index L is hidden_states[L] = output of model.layers[L-1], "
                f"so L must be 1..{n} (0 is the embedding output)")
        if not torch.isfinite(v).all():
            raise HarnessError(f"steering vector for layer {L} contains NaN or inf")
        if L == n:
            warnings.warn(f"layer {L} = num_hidden_layers: the vector was read after the final norm but steering "
                          "adds it before the norm (to the last block's output); prefer a layer below "
                          f"{n}", stacklevel=3)
    return {L: v.detach().float().cpu() for L, v in out.items()}


def _scaled(vectors: dict[int, Any], scale: str, norms: Any) -> dict[int, Any]:
    if scale not in SCALES:
        raise HarnessError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
    if scale == "raw":
        return vectors
    out = {}
    for L, v in vectors.items():
        nv = float(v.norm())
        if nv == 0:
            raise HarnessError(f"the vector at layer {L} has norm 0: scale={scale!r} needs a direction")
        u = v / nv
        if scale == "unit":
            out[L] = u
        else:
            if norms is None:
                raise HarnessError(
                    "scale='mean_norm' needs norms=: the mean activation norm per layer. Fix: pass "
                    f"norms=mean_activation_norms(lm, examples) or load_norms(run_dir) ({NORMS_FILE})")
            try:
                m = float(norms[L])
            except (KeyError, IndexError, TypeError):
                raise HarnessError(f"norms has no entry for layer {L} (got {len(norms)} entries)") from None
            out[L] = u * m
    return out


@dataclass
class SteeringHandle:
    """What ``steer`` yields: the applied per-layer deltas (for coef 1) and call counters."""

    layers: list[int]
    positions: str
    scale: str
    directions: dict = field(default_factory=dict)  # layer -> tensor added per unit coef
    calls: int = 0  # forward calls of steered blocks
    steered_positions: int = 0  # (row, position) pairs that got a nonzero coefficient

    def delta(self, layer: int, coef: float = 1.0):
        return self.directions[layer] * coef


@contextlib.contextmanager
def steer(model_or_lm: Any, vectors: Any, coef: Any = 1.0, *, layers: int | Sequence[int] | None = None,
          positions: str = "response", scale: str = "raw", norms: Any = None,
          skip_padding: bool = True) -> Iterator[SteeringHandle]:
    """Add ``coef * v`` at the given layer(s) while the ``with`` block runs; hooks always removed.

    ``vectors``: ``{L: tensor[H]}``, or a tensor ``[H]`` / ``[num_layers + 1, H]`` with ``layers``.
    ``coef``: number, per-row numbers, or ``{L: number | per-row numbers}``. See the module doc for
    ``positions``, ``scale``, ``norms`` and padding.
    """
    import torch

    if positions not in POSITIONS:
        raise HarnessError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
    model = _model_of(model_or_lm)
    blocks, owner = find_decoder_layers(model)
    vecs = _scaled(normalize_vectors(vectors, layers, model), scale, norms)
    coefs: dict[int, Any] = {}
    for L in vecs:
        c = coef.get(L, 0.0) if isinstance(coef, Mapping) else coef
        if isinstance(c, (int, float)):
            coefs[L] = float(c)
        else:
            t = torch.as_tensor(c, dtype=torch.float32).flatten()
            if not torch.isfinite(t).all():
                raise HarnessError("coefficients must be finite")
            coefs[L] = t
    if isinstance(coef, Mapping):
        extra = set(coef) - set(vecs)
        if extra:
            raise HarnessError(f"coef has layers {sorted(extra)} that have no vector (layers: {sorted(vecs)})")
    handle = SteeringHandle(layers=sorted(vecs), positions=positions, scale=scale, directions=vecs)
    state: dict[str, Any] = {"mask": None, "past": None}
    cache: dict[tuple, Any] = {}

    def owner_pre(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state["mask"] = mask if (skip_padding and torch.is_tensor(mask) and mask.dim() == 2) else None
        past = None
        for key in ("cache", "past_key_values"):
            c = kwargs.get(key)
            if c is not None and hasattr(c, "get_seq_length"):
                try:
                    past = int(c.get_seq_length())
                except Exception:  # pragma: no cover - exotic caches
                    past = None
                break
        state["past"] = past

    def owner_post(module, args, kwargs, output):
        state["mask"], state["past"] = None, None

    def make_hook(L: int):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(h) or h.dim() != 3:
                raise HarnessError(f"model.layers[{L - 1}] returned {type(h).__name__} of shape "
                                   f"{getattr(h, 'shape', None)}; expected [batch, seq, hidden]")
            B, T, _ = h.shape
            key = (L, h.device, h.dtype)
            if key not in cache:
                cache[key] = vecs[L].to(device=h.device, dtype=h.dtype)
            v = cache[key]
            c = coefs[L]
            handle.calls += 1
            direct = block_call_of(kwargs)  # set when a loop calls the blocks itself (the engine)
            if isinstance(c, float):
                if c == 0.0:
                    return None
                row = torch.full((B,), c, dtype=torch.float32, device=h.device)
            elif direct is not None and direct.rows is None:
                raise HarnessError(f"coef for layer {L} has per-row values, but this generation loop calls the "
                                   "blocks itself without telling which request each batch row is (its row order is "
                                   "not the caller's). Fix: give one coefficient per call (one steering cell per "
                                   "generate call), or pass rows= in the loop's harness.models.blockcall.BlockCall")
            else:
                rows = direct.rows if direct is not None else None
                n = (direct.n if direct.n is not None else c.numel()) if direct is not None else B
                if c.numel() != n or (rows is not None and len(rows) != B):
                    raise HarnessError(f"coef for layer {L} has {c.numel()} per-row values but the batch has "
                                       f"{n} rows (hidden states {tuple(h.shape)})")
                row = (c if rows is None else c[torch.as_tensor(rows, dtype=torch.long)]).to(h.device)
            # which (row, position) pairs to touch
            sel = torch.zeros((B, T), dtype=torch.bool, device=h.device)
            if direct is not None:
                prefill = direct.prefill
                mask = direct.mask if skip_padding else None
            else:
                prefill = state["past"] == 0 if state["past"] is not None else None
                mask = state["mask"]
            if positions == "all":
                sel[:] = True
            elif positions == "prompt":
                if prefill if prefill is not None else T > 1:
                    sel[:] = True
            else:  # response: last position of each call
                sel[:, -1] = True
            if mask is not None and mask.shape[0] == B and mask.shape[1] >= T:
                sel &= mask[:, -T:].to(h.device).bool()
            w = sel.to(torch.float32) * row[:, None]
            handle.steered_positions += int((w != 0).sum())
            if not bool((w != 0).any()):
                return None
            new = h + w.to(h.dtype)[..., None] * v
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = []
    try:
        handles.append(owner.register_forward_pre_hook(owner_pre, with_kwargs=True))
        handles.append(owner.register_forward_hook(owner_post, with_kwargs=True))
        for L in handle.layers:
            # prepend: run before every other forward hook on the block, so hooks that read the block
            # output (HF's output_hidden_states recorders, monitors) see the steered stream
            # with_kwargs: a loop that calls the blocks itself passes its BlockCall as a keyword argument
            handles.append(blocks[L - 1].register_forward_hook(make_hook(L), prepend=True, with_kwargs=True))
        yield handle
    finally:
        for hd in handles:
            hd.remove()


# -- mean activation norms (for scale="mean_norm") ------------------------------------------------
def mean_activation_norms(lm: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 8, tokens: str = "response") -> list[float]:
    """Mean L2 norm of single-token activations at every hidden_states index.

    ``examples`` are (prompt_ids, response_ids); ``tokens`` = "response" (default), "prompt" or "all"
    picks which tokens are averaged. Returns ``num_hidden_layers + 1`` floats.
    """
    import torch

    from harness.models.batch import examples_batch

    if tokens not in ("response", "prompt", "all"):
        raise HarnessError(f"tokens {tokens!r} is not one of response, prompt, all")
    examples = [(list(p), list(r)) for p, r in examples if (r or tokens != "response")]
    if not examples:
        raise HarnessError("no examples (with response tokens) to measure activation norms on")
    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id or 0
    sums = None
    count = 0.0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        b = examples_batch(chunk, pad)
        ids, att = b.ids, b.attention
        sel = b.response if tokens == "response" else b.prompt if tokens == "prompt" else b.attention.bool()
        with torch.inference_mode():
            out = model(input_ids=ids.to(dev), attention_mask=att.to(dev), output_hidden_states=True,
                        use_cache=False, logits_to_keep=1)
        m = sel.to(dev).float()
        per = torch.stack([(h.float().norm(dim=-1) * m).sum() for h in out.hidden_states]).cpu().double()
        sums = per if sums is None else sums + per
        count += float(m.sum())
    assert sums is not None
    return [float(x) / max(count, 1.0) for x in sums]


def load_norms(run_dir: str | Path) -> list[float] | None:
    """The mean activation norms stored in ``RUN_DIR/activation_norms.json``, or None."""
    p = Path(run_dir) / NORMS_FILE
    if not p.exists():
        return None
    try:
        return [float(x) for x in json.loads(p.read_text())["norms"]]
    except (ValueError, KeyError, TypeError) as e:
        raise HarnessError(f"{p}: field 'norms' is not a list of numbers ({e}). Fix: delete the file to recompute") from None


def norms_for_run(run_dir: str | Path, lm: Any, *, split: str = "extract", max_examples: int = 64,
                  batch_size: int = 8) -> list[float]:
    """Load ``activation_norms.json`` or measure it on the run's generations and store it."""
    from harness.core.artifacts import atomic_write_json, read_jsonl

    norms = load_norms(run_dir)
    if norms is not None and len(norms) == lm.num_layers + 1:
        return norms
    gens_path = Path(run_dir) / "generations.jsonl"
    if not gens_path.exists():
        raise HarnessError(f"{gens_path} is missing: cannot measure activation norms for scale='mean_norm'")
    gens = [g for g in read_jsonl(gens_path) if g.get("split") == split and g.get("response_token_ids")]
    if not gens:
        gens = [g for g in read_jsonl(gens_path) if g.get("response_token_ids")]
    gens = gens[:max_examples]
    norms = mean_activation_norms(lm, [(g["prompt_token_ids"], g["response_token_ids"]) for g in gens],
                                  batch_size=batch_size)
    atomic_write_json(Path(run_dir) / NORMS_FILE, {
        "norms": norms, "examples": len(gens), "tokens": "response", "split": split, "model": lm.model_id,
        "meaning": "mean L2 norm of single-token activations at each hidden_states index"})
    return norms
