"""Fast generation and extraction engine (static KV cache, CUDA graphs, hooked extraction).

Generation
  * prompts are left-padded into one shared slot layout, so every row writes the same KV-cache
    slot at each step: the cache is a fixed ``[B, kv_heads, C, head_dim]`` buffer per layer;
  * the model's own decoder layers are called as modules (forward hooks fire), with a small
    attention function (grouped-query attention without repeating K/V; fp32 softmax);
  * logits are computed for the last position only; sampling is ``harness.models.sampling``'s
    batch-invariant Gumbel-max (no vocabulary sort) on the device, with the step as a tensor;
  * on CUDA each decode step is captured once per KV-length bucket in a CUDA graph and replayed;
    graphs are kept between calls of the same batch shape and dropped when the model's hooks change;
    with hooks on the model (steering) the engine runs the same step eagerly unless
    ``graphs="always"`` (graph replay freezes what a hook does at capture time);
  * per-row stop at end-of-turn (finished rows emit padding; the loop ends once all rows stop);
  * batch size from free device memory, halved and retried on out-of-memory.
  At temperature 0 its tokens equal HF greedy ``generate`` (tests/test_engine.py).

Extraction
  * one forward of ``model.model`` per length-sorted, right-padded batch (no mask needed: real
    tokens never attend to right padding), no lm_head, no ``output_hidden_states``: forward
    hooks on the decoder layers (and the final norm) fold each layer's output into fp32 sums of
    per-example means with one matrix-vector product per layer and method.
  Vectors equal ``plugins/extract_mean_diff.py``'s within bf16 tolerance.

Fused kernels (CUDA only, ``fused="auto"``; never on CPU)
  * sampling at temperature > 0, top_p == 1: one Triton kernel (hash noise + Gumbel + block argmax),
    bit-identical to ``harness.models.sampling`` on the same device;
  * RMSNorm, SwiGLU, rotary and the decode softmax via ``torch.compile`` (``emulate_precision_casts``),
    swapped in only while the engine runs (``_FusedSwap``); extraction keeps torch's own mean-of-squares
    reduction, so its sums equal the unfused ones. Compile failures fall back to eager.

torch is imported inside functions so ``import harness`` stays light.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from harness.models.activations import METHODS, NonFiniteActivationError
from harness.analysis.steering import direct_call

ATTN_NAME = "harness_engine"
SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "olmo2", "granite"}
_ENGINES: "weakref.WeakKeyDictionary[Any, Engine]" = weakref.WeakKeyDictionary()


def out_of_memory_error():
    import torch

    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def base_model(model):
    """The decoder stack (``model.model`` for the usual CausalLM classes)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers"):
        base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise TypeError(f"{type(model).__name__}: no decoder layers found at model.model.layers")
    return base


def fast_generation_supported(model) -> tuple[bool, str]:
    """Whether the engine's own decode loop can run this architecture (else use HF generate)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if mt not in SUPPORTED_MODEL_TYPES:
        return False, f"model_type {mt!r} not in {sorted(SUPPORTED_MODEL_TYPES)}"
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return False, "sliding-window layers"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False, "sliding-window attention"
    try:
        base_model(model)
    except TypeError as e:
        return False, str(e)
    from harness.models.loading import model_devices

    devices = model_devices(model)
    if len(devices) > 1:  # device_map placement: the static cache and graphs live on one device
        return False, f"model spans {len(devices)} devices ({', '.join(devices)}; device_map)"
    return True, ""


# ----------------------------------------------------------------------------------- attention
def _engine_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """GQA attention over the static cache. ``attention_mask`` is additive [B, 1, Q, K] (0 / min)."""
    import torch

    B, Hq, Q, D = query.shape
    Hk = key.shape[1]
    g = Hq // Hk
    scale = scaling if scaling is not None else D ** -0.5
    if Q == 1:
        qg = query.reshape(B, Hk, g, D)
        s = torch.matmul(qg, key.transpose(-1, -2))  # [B, Hk, g, K]
        if _PROBS is not None:  # fused (one kernel) while the engine's _FusedSwap is active
            p = _PROBS(s, attention_mask, float(scale), value.dtype)
        else:
            p = _probs_eager(s, attention_mask, float(scale), value.dtype)  # mask [B, 1, 1, K]
        o = torch.matmul(p, value)  # [B, Hk, g, D]
        return o.reshape(B, Hq, 1, D).transpose(1, 2), None
    o = torch.nn.functional.scaled_dot_product_attention(
        query, key, value,
        attn_mask=None if attention_mask is None else attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype),
        scale=scale, enable_gqa=g > 1, is_causal=attention_mask is None)
    return o.transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _engine_attention)


class _AttnSwap:
    """Point every config in the model at the engine's attention function for a while."""

    def __init__(self, model):
        self.cfgs = []
        seen = set()
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
                seen.add(id(c))
                self.cfgs.append(c)

    def __enter__(self):
        _register_attention()
        self.old = [c._attn_implementation_internal for c in self.cfgs]
        for c in self.cfgs:
            c._attn_implementation_internal = ATTN_NAME
        return self

    def __exit__(self, *exc):
        for c, o in zip(self.cfgs, self.old):
            c._attn_implementation_internal = o
        return False


class StaticKVCache:
    """Per-layer K/V buffers ``[B, kv_heads, C, head_dim]``; ``update`` writes slots ``write_pos``."""

    def __init__(self, n_layers: int, B: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        import torch

        self.k = [torch.zeros(B, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_len = capacity
        self.capacity = capacity
        self.batch = B

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        k.index_copy_(2, self.write_pos, key.to(k.dtype))
        v.index_copy_(2, self.write_pos, value.to(v.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ------------------------------------------------------------------------------------ sampling
def sample_step(logits, seeds, step_t, temperature: float, top_p: float = 1.0):
    """``harness.models.sampling.sample_tokens`` with the step as a 1-element int64 tensor (graph-safe).

    Same integer hash and float ops, so tokens equal ``sample_tokens(logits, seeds, step, ...)``.
    """
    import torch

    from harness.models.sampling import _STEP, hash_uniform, scaled_logits

    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = scaled_logits(logits, temperature, top_p)
    u = hash_uniform(seeds, (step_t + 1) * _STEP, logits.shape[-1])
    return (scaled - torch.log(-torch.log(u))).argmax(dim=-1)


# --------------------------------------------------------------------------- fused GPU kernels
_RMS_CLASSES = {"Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen3RMSNorm"}
_MLP_CLASSES = {"Qwen2MLP", "LlamaMLP", "MistralMLP", "Qwen3MLP"}
_ATTN_CLASSES = {"Qwen2Attention", "LlamaAttention", "MistralAttention", "Qwen3Attention"}


def _rms_eager(x, w, eps: float):
    """Qwen2/Llama/Mistral/Qwen3 RMSNorm.forward, as a function (same ops in the same order)."""
    import torch

    dt = x.dtype
    h = x.to(torch.float32)
    v = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(v + eps)
    return w * h.to(dt)


def _rms_sq_eager(x):
    import torch

    return x.to(torch.float32).pow(2)


def _rms_apply_eager(x, v, w, eps: float):
    import torch

    h = x.to(torch.float32) * torch.rsqrt(v + eps)
    return w * h.to(x.dtype)


def _silu_mul_eager(g, u):
    import torch

    return torch.nn.functional.silu(g) * u


def _probs_eager(s, mask, scale: float, dt):
    """The decode attention's fp32 softmax of scaled scores plus the additive mask, cast to ``dt``."""
    import torch

    s = s.float() * scale
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1).to(dt)


class _Fused:
    """torch.compile'd (Inductor/Triton) versions of the small elementwise pieces, made once per process.

    A function whose compile or first run fails is switched back to eager for good (``errors``)."""

    def __init__(self, compile: bool):
        self.compile = compile
        self.fns: dict = {}
        self.errors: dict[str, str] = {}

    def fn(self, key: str, eager):
        if not self.compile or key in self.errors:
            return eager
        f = self.fns.get(key)
        if f is None:
            import torch

            # emulate_precision_casts: round intermediates to bf16 where eager does, so the fused kernels
            # give eager's values (up to fp32 reduction order / exp ulps), not a more precise variant
            f = self.fns[key] = torch.compile(eager, dynamic=None, fullgraph=True,
                                              options={"emulate_precision_casts": True})
        return f

    def call(self, key: str, eager, *args):
        f = self.fn(key, eager)
        if f is eager:
            return eager(*args)
        try:
            return f(*args)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure: eager from now on
            self.errors[key] = repr(e)[:400]
            return eager(*args)


_FUSED: dict[bool, _Fused] = {}
_PROBS = None  # set by _FusedSwap while active: the decode attention's softmax


def fused_impl(compile: bool) -> _Fused:
    f = _FUSED.get(compile)
    if f is None:
        f = _FUSED[compile] = _Fused(compile)
    return f


class _FusedSwap:
    """While active, RMSNorm / SwiGLU MLP / rotary / the decode softmax of the supported architectures
    run as fused kernels (``compile=True``, CUDA) or as the same functions uncompiled (``compile=False``:
    CPU tests of the swapping itself). Module hooks keep firing: only the ``forward`` of norms and MLPs
    is replaced (instance attribute), and modules with hooks on the parts it bypasses are left alone."""

    def __init__(self, model, compile: bool, enabled: bool = True, exact_norm: bool = False):
        # exact_norm: the RMSNorm's mean of squares stays torch's own reduction (same summation order as
        # eager, so the same values); the elementwise parts before and after it are fused
        self.model, self.enabled, self.exact_norm = model, enabled, exact_norm
        self.f = fused_impl(compile)
        self.swapped: list = []
        self.globals: list = []

    def __enter__(self):
        global _PROBS
        if not self.enabled:
            return self
        import sys

        f = self.f
        for m in self.model.modules():
            cls = type(m).__name__
            if "forward" in m.__dict__:
                continue
            if cls in _RMS_CLASSES and isinstance(getattr(m, "variance_epsilon", None), float):
                if self.exact_norm:
                    def rms(x, m=m):
                        v = f.call("rms_sq", _rms_sq_eager, x).mean(-1, keepdim=True)
                        return f.call("rms_apply", _rms_apply_eager, x, v, m.weight, m.variance_epsilon)
                else:
                    def rms(x, m=m):
                        return f.call("rms", _rms_eager, x, m.weight, m.variance_epsilon)
                m.forward = rms
                self.swapped.append(m)
            elif cls in _MLP_CLASSES and type(getattr(m, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU") \
                    and not (m.act_fn._forward_hooks or m.act_fn._forward_pre_hooks):
                def mlp(x, m=m):
                    return m.down_proj(f.call("silu_mul", _silu_mul_eager, m.gate_proj(x), m.up_proj(x)))
                m.forward = mlp
                self.swapped.append(m)
            elif cls in _ATTN_CLASSES:
                mod = sys.modules.get(type(m).__module__)
                orig = getattr(mod, "apply_rotary_pos_emb", None)
                if orig is not None and not getattr(orig, "_harness_fused", False):
                    key = "rope:" + mod.__name__

                    def rope(q, k, cos, sin, unsqueeze_dim=1, orig=orig, key=key):
                        return f.call(key, orig, q, k, cos, sin, unsqueeze_dim)
                    rope._harness_fused = True
                    mod.apply_rotary_pos_emb = rope
                    self.globals.append((mod, orig))
        self.old_probs = _PROBS
        _PROBS = lambda s, mask, scale, dt: f.call("probs", _probs_eager, s, mask, scale, dt)  # noqa: E731
        return self

    def __exit__(self, *exc):
        global _PROBS
        if not self.enabled:
            return False
        for m in self.swapped:
            m.__dict__.pop("forward", None)
        for mod, orig in reversed(self.globals):
            mod.apply_rotary_pos_emb = orig
        _PROBS = self.old_probs
        return False


_GUMBEL: dict = {}


def _gumbel_kernel():
    """Triton kernel: per (row, vocabulary block) the max of ``logits * inv_t + Gumbel(seed, step, index)`` and
    its first index. Same integer hash, fp64 uniform, libdevice log and fp32 rounding steps as
    ``harness.models.sampling`` on CUDA (where ``x / T`` runs as ``x * (1/T)``; FMA contraction off)."""
    if "k" in _GUMBEL:
        return _GUMBEL["k"]
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def gumbel_block_max(logits_ptr, row_stride, seeds_ptr, step_ptr, inv_t, V, pv_ptr, pi_ptr, nblk,
                         C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, STEP: tl.constexpr,
                         M30: tl.constexpr, M27: tl.constexpr, M31: tl.constexpr, M11: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + offs, mask=m, other=0.0).to(tl.float32)
        x = x * inv_t
        seed = tl.load(seeds_ptr + row)
        step = tl.load(step_ptr)
        z = seed + (step + 1) * STEP + offs.to(tl.int64) * C0
        z = (z ^ ((z >> 30) & M30)) * C1
        z = (z ^ ((z >> 27) & M27)) * C2
        z = z ^ ((z >> 31) & M31)
        u = (((z >> 11) & M11).to(tl.float64) + 0.5) * 1.1102230246251565e-16
        u32 = u.to(tl.float32)
        g = -libdevice.log(-libdevice.log(u32))
        val = x + g
        val = tl.where(m, val, float("-inf"))
        best = tl.max(val, axis=0)
        idx = tl.argmax(val, axis=0, tie_break_left=True)
        tl.store(pv_ptr + row * nblk + blk, best)
        tl.store(pi_ptr + row * nblk + blk, blk * BLOCK + idx.to(tl.int64))

    _GUMBEL["k"] = gumbel_block_max
    return gumbel_block_max


def gumbel_argmax_cuda(logits, seeds, step_t, temperature: float, block: int = 2048):
    """Fused ``sample_step`` for temperature > 0 and top_p == 1 on CUDA (graph-safe; bit-identical to
    ``harness.models.sampling.sample_tokens`` on the same device: checked by benchmarks/gpu_check.py)."""
    import numpy as np
    import torch

    from harness.models.sampling import _C0, _C1, _C2, _STEP

    k = _gumbel_kernel()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    nblk = (V + block - 1) // block
    pv = torch.empty(B, nblk, dtype=torch.float32, device=logits.device)
    pi = torch.empty(B, nblk, dtype=torch.int64, device=logits.device)
    inv_t = float(np.float32(1.0) / np.float32(temperature))  # CUDA's x / scalar == x * (1/scalar) in fp32
    k[(B, nblk)](logits, logits.stride(0), seeds, step_t, inv_t, V, pv, pi, nblk,
                 C0=_C0, C1=_C1, C2=_C2, STEP=_STEP, M30=(1 << 34) - 1, M27=(1 << 37) - 1, M31=(1 << 33) - 1,
                 M11=(1 << 53) - 1, BLOCK=block, num_warps=8, enable_fp_fusion=False)
    return pi.gather(1, pv.argmax(dim=1, keepdim=True)).squeeze(1)


# -------------------------------------------------------------------------------------- engine
@dataclass
class GenOutput:
    ids: list[int]  # generated ids, end-of-turn token excluded
    finish_reason: str  # "stop" | "length"


def _hook_signature(model) -> tuple:
    """Forward hooks on the model's modules, ignoring transformers' own (inactive) output-capturing hooks."""
    sig = []
    for name, m in model.named_modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            keys = tuple(k for k, f in d.items() if not getattr(f, "__module__", "").startswith("transformers."))
            if keys:
                sig.append((name, keys))
    return tuple(sig)


class _Slot:
    """Cache, state tensors and captured graphs for one (batch, capacity) shape."""

    def __init__(self, engine: "Engine", B: int, capacity: int, max_new: int):
        import torch

        e = engine
        dev = e.device
        self.B, self.capacity, self.max_new = B, capacity, max_new
        self.cache = StaticKVCache(e.n_layers, B, e.kv_heads, capacity, e.head_dim, e.dtype, dev)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(B, capacity, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(B, dtype=torch.long, device=dev)
        self.wpos = torch.zeros(1, dtype=torch.long, device=dev)
        self.stops = None
        self.out = torch.zeros(B, max_new, dtype=torch.long, device=dev)
        self.graphs: dict = {}
        self.pool = None
        self.hook_sig = None


class Engine:
    """Generation and extraction for one loaded model (``Engine.for_model(lm)`` caches it)."""

    def __init__(self, lm, *, graphs: str = "auto", kv_bucket: int = 64, max_batch: int = 512, fused: str = "auto"):
        import torch

        self.lm = lm
        self.model = lm.model
        self.base = base_model(lm.model)
        cfg = self.model.config
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_layers = len(self.base.layers)
        self.hidden = int(cfg.hidden_size)
        self.n_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.n_heads)
        self.vocab = int(cfg.vocab_size)
        self.inter = int(getattr(cfg, "intermediate_size", 4 * self.hidden))
        self.graphs = graphs
        # fused: "auto" (compiled kernels + fused Gumbel sampling on CUDA, nothing on CPU), "compile" (same),
        # "eager" (swap in the same functions uncompiled: CPU tests of the swap), "off"
        if fused not in ("auto", "compile", "eager", "off"):
            raise ValueError(f"Engine(fused={fused!r}): use 'auto', 'compile', 'eager' or 'off'")
        self.fused = fused
        self.fused_compile = fused in ("auto", "compile") and self.device.type == "cuda"
        self.fused_swap = self.fused == "eager" or self.fused_compile
        self.kv_bucket = kv_bucket
        self.max_batch = max_batch
        self._slot: _Slot | None = None
        params = inspect.signature(self.base.layers[0].forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.min_val = torch.finfo(torch.float32).min
        self.stats: dict[str, Any] = {}

    @classmethod
    def for_model(cls, lm, **kw) -> "Engine":
        kw = {"graphs": "auto", "kv_bucket": 64, "max_batch": 512, "fused": "auto", **kw}
        e = _ENGINES.get(lm.model)
        if e is None or any(getattr(e, k) != v for k, v in kw.items()):
            e = cls(lm, **kw)
            _ENGINES[lm.model] = e
        return e

    # ---------------------------------------------------------------- memory / batch size
    def free_memory(self) -> int:
        import torch

        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free) + (self._slot.cache.nbytes() if self._slot is not None else 0)
        return 8 << 30

    def gen_row_bytes(self, prompt_len: int, capacity: int) -> int:
        item = 2 if self.dtype.is_floating_point and self.dtype.itemsize == 2 else 4
        kv = self.n_layers * 2 * self.kv_heads * self.head_dim * capacity * item
        logits = self.vocab * 48  # fp32 logits, scaled copy, int64 noise temporaries
        prefill = prompt_len * (self.inter * 3 + self.hidden * 8 + self.n_heads * prompt_len * 2) * item
        return kv + logits + prefill

    def gen_batch_size(self, n: int, prompt_len: int, capacity: int) -> int:
        per = self.gen_row_bytes(prompt_len, capacity)
        b = int(self.free_memory() * 0.7 // max(per, 1))
        return max(1, min(n, self.max_batch, b))

    # ------------------------------------------------------------------------ forward bits
    def _layers_forward(self, ids, pos, mask, cache):
        h = self.base.embed_tokens(ids)
        pe = self.base.rotary_emb(h, pos)
        kw = {self.cache_kw: cache}
        for layer in self.base.layers:
            out = layer(h, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=pe, **kw)
            h = out[0] if isinstance(out, tuple) else out
        h = self.base.norm(h[:, -1])
        return self.model.lm_head(h)  # model dtype: argmax of bf16 equals argmax of its fp32 copy

    def _fused_ctx(self, exact_norm: bool = False):
        return _FusedSwap(self.model, compile=self.fused_compile, enabled=self.fused_swap, exact_norm=exact_norm)

    def _sample(self, logits, seeds, step_t, temperature: float, top_p: float):
        if self.fused_compile and temperature > 0 and top_p >= 1.0 and "gumbel" not in self.stats.get("fused_errors", {}):
            try:
                return gumbel_argmax_cuda(logits, seeds, step_t, temperature)
            except Exception as e:  # noqa: BLE001 - no Triton / compile failure: the torch ops
                self.stats.setdefault("fused_errors", {})["gumbel"] = repr(e)[:400]
        return sample_step(logits, seeds, step_t, temperature, top_p)

    def _decode_step(self, s: _Slot, temperature: float, top_p: float, pad: int, stop_ids) -> None:
        """One decode step, all in place on the slot's state (so it can be captured in a graph)."""
        import torch

        kv = s.cache.kv_len
        mask = torch.where(s.valid[:, :kv], 0.0, self.min_val)[:, None, None, :]
        logits = self._layers_forward(s.ids, s.pos, mask, s.cache)
        nxt = self._sample(logits, s.seeds, s.step, temperature, top_p)
        nxt = torch.where(s.done, torch.full_like(nxt, pad), nxt)
        s.out.index_copy_(1, s.step, nxt[:, None])
        if stop_ids is not None:
            s.done |= torch.isin(nxt, stop_ids)
        s.ids.copy_(nxt[:, None])
        s.pos.add_(1)
        s.cache.write_pos.add_(1)
        s.valid.index_fill_(1, s.cache.write_pos, True)
        s.step.add_(1)

    def _use_graphs(self) -> bool:
        if self.device.type != "cuda" or self.graphs == "never":
            return False
        if self.graphs == "always":
            return True
        return not _hook_signature(self.model)

    # --------------------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seeds: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
                 pad_id: int = 0, ignore_eos: bool = False, batch_size: int | None = None) -> list[GenOutput]:
        """Generate for every prompt (token ids); batches chosen from free memory, halved on OOM."""
        import torch

        n = len(prompts)
        if n == 0:
            return []
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        seeds = list(seeds) if seeds is not None else [0] * n
        P_all = max(len(p) for p in prompts)
        cap = self._capacity(P_all, max_new_tokens)
        bs = batch_size or self.gen_batch_size(n, P_all, cap)
        results: dict[int, GenOutput] = {}
        i = 0
        oom = out_of_memory_error()
        while i < n:
            nb = math.ceil((n - i) / bs)
            b = math.ceil((n - i) / nb)
            idx = order[i: i + b]
            try:
                with direct_call(rows=idx, n=n):  # steering hooks: batch row r is prompt idx[r]
                    outs = self._generate_batch([prompts[j] for j in idx], max_new_tokens, temperature, top_p,
                                                [seeds[j] for j in idx], stop_ids, pad_id, ignore_eos, cap)
            except oom:
                if bs == 1:
                    raise
                self._slot = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                bs = max(1, bs // 2)
                self.stats["oom_halvings"] = self.stats.get("oom_halvings", 0) + 1
                continue
            for j, o in zip(idx, outs):
                results[j] = o
            i += len(idx)
        self.stats["batch_size"] = bs
        return [results[j] for j in range(n)]

    def _capacity(self, P: int, max_new: int) -> int:
        need = P + max_new
        return int(math.ceil(need / self.kv_bucket) * self.kv_bucket)

    def _get_slot(self, B: int, cap: int, max_new: int) -> _Slot:
        s = self._slot
        if s is None or s.B != B or s.capacity < cap or s.max_new < max_new:
            self._slot = None
            s = self._slot = _Slot(self, B, max(cap, s.capacity if s is not None and s.B == B else 0),
                                   max(max_new, s.max_new if s is not None and s.B == B else 0))
        return s

    def _generate_batch(self, prompts, max_new, temperature, top_p, seeds, stop_ids, pad, ignore_eos, cap):
        import torch

        dev = self.device
        B = len(prompts)
        P = max(len(p) for p in prompts)
        s = self._get_slot(B, cap, max_new)
        cache = s.cache
        # ---- reset state and prefill (eager; prompt lengths vary between calls)
        ids = torch.full((B, P), pad, dtype=torch.long)
        att = torch.zeros((B, P), dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
            att[r, P - len(p):] = True
        ids, att = ids.to(dev), att.to(dev)
        pos = (att.long().cumsum(-1) - 1).masked_fill(~att, 1)
        s.valid.zero_()
        s.valid[:, :P] = att
        s.done.zero_()
        s.out.fill_(pad)
        s.step.zero_()
        s.seeds.copy_(torch.tensor(seeds, dtype=torch.long))
        stop_key = None if ignore_eos or not stop_ids else tuple(sorted(set(int(x) for x in stop_ids)))
        if stop_key is None:
            s.stops = None
        elif s.stops is None or tuple(s.stops.tolist()) != stop_key:
            s.stops = torch.tensor(stop_key, dtype=torch.long, device=dev)
        stops = s.stops
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        mask = torch.where(causal[None] & att[:, None, :], 0.0, self.min_val)[:, None]
        cache.write_pos = torch.arange(P, device=dev)
        cache.kv_len = P
        # steering hooks see the blocks called directly: tell them the real positions and prefill vs decode
        with torch.inference_mode(), _AttnSwap(self.model), self._fused_ctx(), direct_call(mask=att, prefill=True) as call:
            logits = self._layers_forward(ids, pos, mask, cache)
            call.update(mask=None, prefill=False)  # decode: one new, real token per row
            tok = self._sample(logits, s.seeds, s.step, temperature, top_p)
            s.out[:, 0] = tok
            if stops is not None:
                s.done |= torch.isin(tok, stops)
            s.ids.copy_(tok[:, None])
            s.pos.copy_(pos[:, -1:] + 1)
            s.wpos.fill_(P)
            cache.write_pos = s.wpos
            s.valid[:, P] = True
            s.step.fill_(1)
            use_graphs = self._use_graphs()
            if use_graphs:
                sig = (_hook_signature(self.model), float(temperature), float(top_p), stop_key, pad)
                if s.hook_sig != sig:
                    # new graphs get a new private pool: capturing into the pool of the graphs just
                    # destroyed trips the caching allocator (use_count assert, torch 2.11) and every
                    # later step then ran eagerly (4x slower decode)
                    s.graphs.clear()
                    s.pool = None
                    s.hook_sig = sig
            t = 1
            while t < max_new:
                kv = min(s.capacity, int(math.ceil((P + t) / self.kv_bucket) * self.kv_bucket))
                cache.kv_len = kv
                g = s.graphs.get(kv) if use_graphs else None
                if g is not None:
                    g.replay()
                elif use_graphs:
                    g = self._capture(s, kv, temperature, top_p, pad, stops)
                    if g is None:
                        use_graphs = False
                else:
                    self._decode_step(s, temperature, top_p, pad, stops)
                t += 1
                if stops is not None and t % 16 == 0 and bool(s.done.all()):
                    break
            out = s.out[:, :max_new].tolist()
        self._note_fused()
        stopset = set(stop_ids)
        res = []
        for r in range(B):
            row = out[r][:t] if stops is not None else out[r]
            cut = next((k for k, x in enumerate(row) if x in stopset), None) if not ignore_eos else None
            res.append(GenOutput(row[:cut], "stop") if cut is not None else GenOutput(row[:max_new], "length"))
        return res

    def _capture(self, s: _Slot, kv: int, temperature, top_p, pad, stops):
        """Run this step eagerly on a side stream (warm-up), then capture it for later replays."""
        import torch

        st = torch.cuda.Stream(self.device)
        st.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(st):
            self._decode_step(s, temperature, top_p, pad, stops)
        torch.cuda.current_stream(self.device).wait_stream(st)
        if s.pool is None:
            s.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=s.pool):
                self._decode_step(s, temperature, top_p, pad, stops)
        except Exception as e:  # a hook that syncs or allocates on the host: run eagerly instead
            self.stats["graph_error"] = repr(e)[:300]
            s.pool = None  # a failed capture leaves its pool unusable for the next one
            return None
        s.graphs[kv] = g
        self.stats["graphs"] = len(s.graphs)
        return g

    # ---------------------------------------------------------------------------- extract
    def extract_row_bytes(self) -> int:
        item = self.dtype.itemsize
        return (self.inter * 3 + self.hidden * 10 + self.n_heads * 64) * item + self.hidden * 8

    def extract_sums(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], methods: Sequence[str] = METHODS,
                     token_budget: int | None = None) -> tuple[dict[str, Any], int]:
        """Sum over examples of per-example means at every hidden_states index: {method: [L+1, H] fp32}."""
        import torch

        dev = self.device
        L1 = self.n_layers + 1
        sums = {m: torch.zeros(L1, self.hidden, dtype=torch.float32, device=dev) for m in methods}
        n = len(examples)
        if n == 0:
            return sums, 0
        if token_budget is None:
            token_budget = int(max(512, min(65536, self.free_memory() * 0.5 // self.extract_row_bytes())))
        order = sorted(range(n), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        tok = getattr(self.lm, "tokenizer", None)
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

        handles = [self.base.layers[0].register_forward_pre_hook(lambda mod, args: fold(0, args[0]))]
        for li, layer in enumerate(self.base.layers[:-1]):
            handles.append(layer.register_forward_hook(lambda mod, a, out, i=li + 1: fold(i, out)))
        handles.append(self.base.norm.register_forward_hook(lambda mod, a, out: fold(self.n_layers, out)))
        oom = out_of_memory_error()
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
                    self._extract_batch([examples[k] for k in idx], T, pad, methods, state)
                except oom:
                    if token_budget <= 64:
                        raise
                    token_budget //= 2
                    self.stats["extract_oom_halvings"] = self.stats.get("extract_oom_halvings", 0) + 1
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
        self.stats["token_budget"] = token_budget
        return sums, n

    def _extract_batch(self, chunk, T, pad, methods, state) -> None:
        import torch

        dev = self.device
        B = len(chunk)
        ids = torch.full((B, T), pad, dtype=torch.long)
        resp = torch.zeros((B, T), dtype=torch.float32)
        prm = torch.zeros((B, T), dtype=torch.float32)
        last = torch.zeros(B, dtype=torch.long)
        for r, (p, q) in enumerate(chunk):
            ln = len(p) + len(q)
            ids[r, :ln] = torch.tensor(list(p) + list(q), dtype=torch.long)
            prm[r, : len(p)] = 1.0 / max(1, len(p))
            resp[r, len(p): ln] = 1.0 / max(1, len(q))
            last[r] = len(p) - 1
        w = {"response_avg": resp, "prompt_avg": prm}
        state["W"] = torch.stack([w[m].reshape(-1) for m in state["avg"]]).to(dev) if state["avg"] else None
        state["ar"] = torch.arange(B, device=dev)
        state["last"] = last.to(dev)
        with torch.inference_mode(), self._fused_ctx(exact_norm=True):  # vectors: eager's values
            self.base(input_ids=ids.to(dev), use_cache=False)
        self._note_fused()

    def _note_fused(self) -> None:
        errs = fused_impl(self.fused_compile).errors
        if errs:
            self.stats.setdefault("fused_errors", {}).update(errs)


def engine_for(lm, **kw) -> Engine:
    return Engine.for_model(lm, **kw)
