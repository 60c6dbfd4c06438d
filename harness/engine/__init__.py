"""Fast generation and extraction engine (static KV cache, CUDA graphs, hooked extraction).

Generation (``decode``): prompts left-padded into one shared slot layout of a static cache
(``kv_cache``); the model's own decoder layers called as modules (forward hooks fire, and each call
tells them its real positions and rows through ``harness.models.blockcall.BlockCall``) with the engine's
grouped-query attention (``attention``); logits for the last position only; batch-invariant Gumbel-max
sampling on the device; on CUDA one graph per KV-length bucket, replayed; per-row stop at end-of-turn;
batch size from free memory, halved on out-of-memory. At temperature 0 its tokens equal HF greedy
``generate``.

Extraction (``extract``): one forward of the base model per length-sorted, right-padded batch, forward
hooks fold every layer into fp32 sums of per-example means. Vectors equal the reference extractor's.

Fused kernels (``kernels``; CUDA only, ``fused="auto"``): a Triton Gumbel-max sampler and compiled
RMSNorm / SwiGLU / rotary / decode softmax, swapped in only while the engine runs.

Architectures (``support``): the engine runs exactly the model types its architecture tests prove
(``SUPPORTED_MODEL_TYPES``); ``fast_generation_supported`` / ``fast_extraction_supported`` say why not.

torch is imported inside functions so ``import harness`` stays light.
"""

from __future__ import annotations

from harness.engine.decode import GenOutput
from harness.engine.engine import Engine, out_of_memory_error
from harness.engine.kernels import fused_impl, gumbel_argmax_cuda, sample_step
from harness.engine.kv_cache import StaticKVCache
from harness.engine.support import (
    ARCHS,
    AUTO_FALLBACK,
    SUPPORTED_MODEL_TYPES,
    auto_component,
    base_model,
    fast_extraction_supported,
    fast_generation_supported,
)

__all__ = [
    "ARCHS",
    "AUTO_FALLBACK",
    "SUPPORTED_MODEL_TYPES",
    "Engine",
    "GenOutput",
    "StaticKVCache",
    "auto_component",
    "base_model",
    "fast_extraction_supported",
    "fast_generation_supported",
    "fused_impl",
    "gumbel_argmax_cuda",
    "out_of_memory_error",
    "sample_step",
]
