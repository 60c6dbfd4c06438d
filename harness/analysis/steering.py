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

Per-request steering: ``steer_requests(model, specs)`` takes one ``RequestSteer`` (vectors, layers,
coef, positions, scale, norms) or None per caller row, so every request of one batched generation
carries its own steering. Its hooks go on every layer any spec uses; at each call a hook gathers, for
its batch rows, each row's vector and coefficient and builds the touched positions from each row's own
position mode. ``steer`` is the case where every row shares one setting: both run the same hook, so a
request's tokens under ``steer_requests`` equal its tokens alone under ``steer`` with its settings, and a
None row's equal an unsteered run.
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


_ALL, _PROMPT, _RESPONSE = (POSITIONS.index(p) for p in ("all", "prompt", "response"))


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


@dataclass(frozen=True, eq=False)
class RequestSteer:
    """The steering of one request in a batch (see ``steer_requests``).

    ``vectors``: ``{L: tensor[H]}``, or a tensor ``[H]`` / ``[num_layers + 1, H]`` with ``layers``;
    ``coef``: a number, or ``{L: number}`` (layers left out get 0); ``positions`` one of ``POSITIONS``,
    ``scale`` one of ``SCALES``, ``norms`` the mean activation norms ``scale="mean_norm"`` needs. The
    meaning of every field is the one of the same argument of ``steer``.
    """

    vectors: Any
    coef: float | Mapping[int, float] = 1.0
    layers: int | Sequence[int] | None = None
    positions: str = "response"
    scale: str = "raw"
    norms: Any = None

    def __post_init__(self) -> None:
        import math
        import numbers

        if self.positions not in POSITIONS:
            raise HarnessError(f"RequestSteer field 'positions': {self.positions!r} is not one of "
                               f"{', '.join(POSITIONS)}. Fix: positions='response' (the paper's) or another of them")
        if self.scale not in SCALES:
            raise HarnessError(f"RequestSteer field 'scale': {self.scale!r} is not one of {', '.join(SCALES)}. "
                               "Fix: scale='raw' (units of the mean difference) or another of them")
        coefs = self.coef.values() if isinstance(self.coef, Mapping) else [self.coef]
        for c in coefs:
            if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
                raise HarnessError(f"RequestSteer field 'coef': {self.coef!r} is not a finite number (or a dict "
                                   "{layer: finite number}). Fix: give one coefficient per request, e.g. coef=2.0")
        if self.layers is not None and not isinstance(self.layers, int):
            object.__setattr__(self, "layers", tuple(int(L) for L in self.layers))


@dataclass
class RequestSteeringHandle:
    """What ``steer_requests`` yields: the steered layers, the number of requests, call counters."""

    layers: list[int]
    requests: int
    calls: int = 0  # forward calls of steered blocks
    steered_positions: int = 0  # (row, position) pairs that got a nonzero coefficient


@dataclass
class _Plan:
    """What the hook on one layer adds.

    Shared (``index`` None): every batch row gets ``coef * vectors[0]`` at the positions of mode
    ``mode``. Per row: caller row ``i`` gets ``coef[i] * vectors[index[i]]`` at the positions of mode
    ``mode[i]``; the batch rows are mapped to caller rows as the module doc says.
    """

    vectors: Any  # float32 [K, H]
    coef: Any  # float (shared) or float32 [N]
    mode: Any  # int (shared) or long [N]: index into POSITIONS
    index: Any = None  # long [N] into vectors, per-row plans only
    order_error: str = ""  # per-row plan under a loop that does not say its row order
    count_error: str = ""  # per-row plan of the wrong length: format(batch=, shape=)


def _position_weights(mode, B: int, T: int, prefill: bool | None, mask, device):
    """Bool ``[B, T]``: the (row, position) pairs each row's position mode touches in this call."""
    m = mode[:, None]
    sel = (m == _ALL).expand(B, T).clone()
    if prefill if prefill is not None else T > 1:  # a prefill call (or, not knowing, a call of several tokens)
        sel |= m == _PROMPT
    sel[:, -1] |= mode == _RESPONSE
    if mask is not None and mask.shape[0] == B and mask.shape[1] >= T:
        sel &= mask[:, -T:].to(device).bool()
    return sel


@contextlib.contextmanager
def _steering_hooks(model: Any, plans: Mapping[int, _Plan], handle: Any, skip_padding: bool) -> Iterator[None]:
    """Install the steering hook of every plan's layer (and the owner hooks that read mask and cache)."""
    import torch

    blocks, owner = find_decoder_layers(model)
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

    def on_device(L: int, plan: _Plan, device, dtype):
        key = (L, device, dtype)
        if key not in cache:
            t = {"vectors": plan.vectors.to(device=device, dtype=dtype)}
            if plan.index is not None:
                t.update(index=plan.index.to(device), coef=plan.coef.to(device), mode=plan.mode.to(device))
            cache[key] = t
        return cache[key]

    def caller_rows(rows, n: int, device):
        key = ("rows", device, n)
        hit = cache.get(key)
        if hit is None or (hit[0] is not rows and hit[0] != rows):
            r = torch.as_tensor(rows, dtype=torch.long, device=device)
            if len(rows) and int(r.max()) >= n:
                raise HarnessError(f"the generation loop says a batch row is caller row {int(r.max())}, but the "
                                   f"steering has values for {n} rows")
            hit = cache[key] = (rows, r, r >= 0, r.clamp(min=0))  # row -1: an empty row (no request)
        return hit[1:]

    def make_hook(L: int):
        plan = plans[L]

        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(h) or h.dim() != 3:
                raise HarnessError(f"model.layers[{L - 1}] returned {type(h).__name__} of shape "
                                   f"{getattr(h, 'shape', None)}; expected [batch, seq, hidden]")
            B, T, _ = h.shape
            dev = h.device
            handle.calls += 1
            direct = block_call_of(kwargs)  # set when a loop calls the blocks itself (the engine)
            t = on_device(L, plan, dev, h.dtype)
            if plan.index is None:
                if plan.coef == 0.0:
                    return None
                coef = torch.full((B,), plan.coef, dtype=torch.float32, device=dev)
                mode = torch.full((B,), plan.mode, dtype=torch.long, device=dev)
                v = t["vectors"][0]
            elif direct is not None and direct.rows is None:
                raise HarnessError(plan.order_error)
            else:
                N = plan.coef.numel()
                rows = direct.rows if direct is not None else None
                n = (direct.n if direct.n is not None else N) if direct is not None else B
                if N != n or (rows is not None and len(rows) != B):
                    raise HarnessError(plan.count_error.format(batch=n, shape=tuple(h.shape)))
                if rows is None:  # HF's own forward: batch row i is caller row i
                    coef, mode, idx = t["coef"], t["mode"], t["index"]
                else:
                    _, real, r0 = caller_rows(rows, N, dev)
                    coef = torch.where(real, t["coef"][r0], 0.0)
                    mode, idx = t["mode"][r0], t["index"][r0]
                v = t["vectors"][idx][:, None, :]
            if direct is not None:
                prefill = direct.prefill
                mask = direct.mask if skip_padding else None
            else:
                prefill = state["past"] == 0 if state["past"] is not None else None
                mask = state["mask"]
            w = _position_weights(mode, B, T, prefill, mask, dev).to(torch.float32) * coef[:, None]
            touched = int((w != 0).sum())
            handle.steered_positions += touched
            if not touched:
                return None
            new = h + w.to(h.dtype)[..., None] * v
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = []
    try:
        handles.append(owner.register_forward_pre_hook(owner_pre, with_kwargs=True))
        handles.append(owner.register_forward_hook(owner_post, with_kwargs=True))
        for L in sorted(plans):
            # prepend: run before every other forward hook on the block, so hooks that read the block
            # output (HF's output_hidden_states recorders, monitors) see the steered stream
            # with_kwargs: a loop that calls the blocks itself passes its BlockCall as a keyword argument
            handles.append(blocks[L - 1].register_forward_hook(make_hook(L), prepend=True, with_kwargs=True))
        yield
    finally:
        for hd in handles:
            hd.remove()


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
    mode = POSITIONS.index(positions)
    plans = {}
    for L, v in vecs.items():
        c = coefs[L]
        if isinstance(c, float):
            plans[L] = _Plan(v[None], c, mode)
        else:
            N = c.numel()
            plans[L] = _Plan(
                v[None], c, torch.full((N,), mode, dtype=torch.long), index=torch.zeros(N, dtype=torch.long),
                order_error=(f"coef for layer {L} has per-row values, but this generation loop calls the blocks itself "
                             "without telling which request each batch row is (its row order is not the caller's). "
                             "Fix: give one coefficient per call (one steering cell per generate call), or pass rows= "
                             "in the loop's harness.models.blockcall.BlockCall"),
                count_error=(f"coef for layer {L} has {N} per-row values but the batch has {{batch}} rows "
                             "(hidden states {shape})"))
    handle = SteeringHandle(layers=sorted(vecs), positions=positions, scale=scale, directions=vecs)
    with _steering_hooks(model, plans, handle, skip_padding):
        yield handle


def _request_vectors(i: int, spec: RequestSteer, model: Any, done: dict) -> dict[int, Any]:
    """The scaled vectors of ``specs[i]``, shared by specs with the same vectors, layers, scale and norms."""
    key = (id(spec.vectors), spec.layers, spec.scale, id(spec.norms))
    if key not in done:
        try:
            done[key] = _scaled(normalize_vectors(spec.vectors, spec.layers, model), spec.scale, spec.norms)
        except HarnessError as e:
            raise HarnessError(f"steer_requests specs[{i}]: {e}") from None
    vecs = done[key]
    if isinstance(spec.coef, Mapping):
        extra = set(spec.coef) - set(vecs)
        if extra:
            raise HarnessError(f"steer_requests specs[{i}]: field 'coef' has layers {sorted(extra)} that have no "
                               f"vector (layers: {sorted(vecs)})")
    return vecs


@contextlib.contextmanager
def steer_requests(model_or_lm: Any, specs: Sequence[RequestSteer | None], *,
                   skip_padding: bool = True) -> Iterator[RequestSteeringHandle]:
    """Steer each request of a batched generation with its own ``RequestSteer`` (None: unsteered).

    ``specs[i]`` belongs to the caller's row ``i``: the ``i``-th row of the batch under HF ``generate``,
    the ``i``-th prompt given to a loop that calls the blocks itself and says which caller row each of
    its batch rows is (``BlockCall.rows``, as ``harness.engine`` does). Each row gets its own vectors,
    layers, coefficient, position mode and scale, with the rule ``steer`` applies, so its tokens equal a
    run of that request alone under ``steer`` with its settings, and a None row's equal an unsteered
    run. Hooks go on every layer any spec uses and are always removed.
    """
    import torch

    model = _model_of(model_or_lm)
    specs = list(specs)
    N = len(specs)
    done: dict = {}
    per_request: list[tuple[dict[int, Any], RequestSteer] | None] = []
    for i, spec in enumerate(specs):
        if spec is None:
            per_request.append(None)
        elif not isinstance(spec, RequestSteer):
            raise HarnessError(f"steer_requests specs[{i}] is a {type(spec).__name__}. Fix: give one RequestSteer "
                               "(or None: unsteered) per request")
        else:
            per_request.append((_request_vectors(i, spec, model, done), spec))
    layers = sorted({L for pr in per_request if pr is not None for L in pr[0]})
    plans = {}
    for L in layers:
        table: dict[int, int] = {}  # id(vector) -> row of the layer's vector table
        vectors = []
        index = torch.zeros(N, dtype=torch.long)
        coef = torch.zeros(N, dtype=torch.float32)
        mode = torch.full((N,), _RESPONSE, dtype=torch.long)
        for i, pr in enumerate(per_request):
            if pr is None or L not in pr[0]:
                continue
            v, spec = pr[0][L], pr[1]
            if id(v) not in table:
                table[id(v)] = len(vectors)
                vectors.append(v)
            index[i] = table[id(v)]
            coef[i] = float(spec.coef.get(L, 0.0) if isinstance(spec.coef, Mapping) else spec.coef)
            mode[i] = POSITIONS.index(spec.positions)
        plans[L] = _Plan(
            torch.stack(vectors), coef, mode, index=index,
            order_error=("steer_requests steers each request on its own, but this generation loop calls the blocks "
                         "itself without telling which request each batch row is (its row order is not the caller's). "
                         "Fix: pass rows= in the loop's harness.models.blockcall.BlockCall, or steer one setting per "
                         "generate call with steer(...)"),
            count_error=(f"steer_requests got {N} specs (one per request) but the batch has {{batch}} rows (hidden "
                         "states {shape}). Fix: give one RequestSteer or None per request, in the order of the requests"))
    handle = RequestSteeringHandle(layers=layers, requests=N)
    with _steering_hooks(model, plans, handle, skip_padding):
        yield handle


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
