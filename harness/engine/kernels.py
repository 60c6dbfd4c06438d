"""Sampling on the device and the fused-kernel swaps (CUDA only; ``fused="auto"``, never on CPU).

* ``sample_step``: ``harness.models.sampling.sample_tokens`` with the step as a 1-element tensor
  (graph-safe), same integer hash and float ops, so the same tokens;
* ``gumbel_argmax_cuda``: temperature > 0, top_p == 1 as one Triton kernel (hash noise + Gumbel +
  block argmax), bit-identical to ``harness.models.sampling`` on the same device;
* ``Fused``: RMSNorm, SwiGLU, rotary and the decode softmax via ``torch.compile``
  (``emulate_precision_casts``); a function whose compile or first run fails is eager from then on;
* ``FusedSwap``: swaps those in only while the engine runs (norm / MLP ``forward`` as instance
  attributes, the attention modules' ``apply_rotary_pos_emb``); the decode softmax is picked by the
  attention name (``attention.attention_name(fused)``). Extraction keeps torch's own mean-of-squares
  reduction (``exact_norm``), so its sums equal the unfused ones.
"""

from __future__ import annotations

from harness.engine.attention import probs_eager


# ------------------------------------------------------------------------------------ sampling
def sample_step(logits, seeds, step_t, temperature: float, top_p: float = 1.0):
    """``harness.models.sampling.sample_tokens`` with the step as a 1-element int64 tensor (graph-safe),
    or one step per row (``[B]``: continuous batching, each row at its own step).

    Same integer hash and float ops, so tokens equal ``sample_tokens(logits, seeds, step, ...)``.
    """
    import torch

    from harness.models.sampling import HASH_CONSTANTS, hash_uniform, scaled_logits

    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = scaled_logits(logits, temperature, top_p)
    st = step_t if step_t.numel() == 1 else step_t.reshape(-1, 1)
    u = hash_uniform(seeds, (st + 1) * HASH_CONSTANTS["STEP"], logits.shape[-1])
    return (scaled - torch.log(-torch.log(u))).argmax(dim=-1)


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
                         BLOCK: tl.constexpr, STEP_STRIDE: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + offs, mask=m, other=0.0).to(tl.float32)
        x = x * inv_t
        seed = tl.load(seeds_ptr + row)
        step = tl.load(step_ptr + row * STEP_STRIDE)  # one step for all rows, or one per row
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

    from harness.models.sampling import HASH_CONSTANTS as H

    k = _gumbel_kernel()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    nblk = (V + block - 1) // block
    pv = torch.empty(B, nblk, dtype=torch.float32, device=logits.device)
    pi = torch.empty(B, nblk, dtype=torch.int64, device=logits.device)
    inv_t = float(np.float32(1.0) / np.float32(temperature))  # CUDA's x / scalar == x * (1/scalar) in fp32
    k[(B, nblk)](logits, logits.stride(0), seeds, step_t, inv_t, V, pv, pi, nblk,
                 C0=H["C0"], C1=H["C1"], C2=H["C2"], STEP=H["STEP"], M30=(1 << 34) - 1, M27=(1 << 37) - 1,
                 M31=(1 << 33) - 1, M11=(1 << 53) - 1, BLOCK=block, STEP_STRIDE=int(step_t.numel() > 1),
                 num_warps=8, enable_fp_fusion=False)
    return pi.gather(1, pv.argmax(dim=1, keepdim=True)).squeeze(1)


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


class Fused:
    """torch.compile'd (Inductor/Triton) versions of the small elementwise pieces, made once per process
    (``fused_impl``). ``compile=False``: the same functions uncompiled (CPU tests of the swapping itself).

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
        except Exception as e:
            self.errors[key] = repr(e)[:400]
            return eager(*args)

    def probs(self, s, mask, scale: float, dt, softcap: float | None = None):
        """The decode attention's softmax (``attention.probs_eager``), fused."""
        args = (s, mask, scale, dt) if softcap is None else (s, mask, scale, dt, softcap)
        return self.call("probs", probs_eager, *args)


_FUSED: dict[bool, Fused] = {}


def fused_impl(compile: bool) -> Fused:
    """The process's ``Fused`` (compiled functions are made once and shared by every engine)."""
    f = _FUSED.get(compile)
    if f is None:
        f = _FUSED[compile] = Fused(compile)
    return f


class FusedSwap:
    """While active, RMSNorm / SwiGLU MLP / rotary of the supported architectures run as fused kernels
    (``compile=True``, CUDA) or as the same functions uncompiled (``compile=False``: CPU tests of the
    swapping itself). Module hooks keep firing: only the ``forward`` of norms and MLPs is replaced
    (instance attribute), and modules with hooks on the parts it bypasses are left alone."""

    def __init__(self, model, compile: bool, enabled: bool = True, exact_norm: bool = False):
        # exact_norm: the RMSNorm's mean of squares stays torch's own reduction (same summation order as
        # eager, so the same values); the elementwise parts before and after it are fused
        self.model, self.enabled, self.exact_norm = model, enabled, exact_norm
        self.f = fused_impl(compile)
        self.swapped: list = []
        self.globals: list = []

    def __enter__(self):
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
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        for m in self.swapped:
            m.__dict__.pop("forward", None)
        for mod, orig in reversed(self.globals):
            mod.apply_rotary_pos_emb = orig
        return False
