"""Batch-invariant seeded sampling.

Each row has its own seed; the noise for (row seed, step, vocabulary index) comes from a
counter-based integer hash (splitmix64 finaliser), so a row's tokens do not depend on which
other rows share its batch, nor on the batch size, nor on the device (integer arithmetic is
exact). Sampling is Gumbel-max: ``argmax(logits / T + G)``, which draws exactly from
``softmax(logits / T)`` without sorting the vocabulary.
"""

from __future__ import annotations

import hashlib

_MASK53 = (1 << 53) - 1


def _s64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


_C0 = _s64(0x9E3779B97F4A7C15)
_C1 = _s64(0xBF58476D1CE4E5B9)
_C2 = _s64(0x94D049BB133111EB)
_STEP = _s64(0xD1B54A32D192ED03)
# the hash's constants, for kernels that compute the same noise on the device (harness.engine.kernels)
HASH_CONSTANTS = {"C0": _C0, "C1": _C1, "C2": _C2, "STEP": _STEP}


def row_seed(seed: int, request_id: str) -> int:
    """A 62-bit seed for one request, from the run seed and the request id."""
    h = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 2


def _lsr(z, k: int):
    import torch

    return torch.bitwise_and(torch.bitwise_right_shift(z, k), (1 << (64 - k)) - 1)


def hash_uniform(seeds, step_term, vocab: int):
    """U(0,1) noise [len(seeds), vocab]; ``step_term`` = (step + 1) * _STEP as an int64 value or tensor."""
    import torch

    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = seeds[:, None] + step_term + idx[None, :] * _C0
    z = torch.bitwise_xor(z, _lsr(z, 30)) * _C1
    z = torch.bitwise_xor(z, _lsr(z, 27)) * _C2
    z = torch.bitwise_xor(z, _lsr(z, 31))
    u = (_lsr(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))
    return u.to(torch.float32)


def uniform_noise(seeds, step: int, vocab: int):
    """U(0,1) noise of shape [len(seeds), vocab] from (seed, step, index); float32."""
    return hash_uniform(seeds, _s64((step + 1) * _STEP), vocab)


def scaled_logits(logits, temperature: float, top_p: float = 1.0):
    """float32 logits / temperature, with everything outside the top-p nucleus set to -inf."""
    import torch

    scaled = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        cut = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    return scaled


def sample_tokens(logits, seeds, step: int, temperature: float, top_p: float = 1.0):
    """Next token per row. ``logits`` [B, V]; ``seeds`` int64 [B]; greedy when temperature == 0."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = scaled_logits(logits, temperature, top_p)
    u = uniform_noise(seeds.to(logits.device), step, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (scaled + gumbel).argmax(dim=-1)


def seeded_logits_processor(seeds, prompt_len: int, temperature: float, top_p: float = 1.0):
    """A transformers ``LogitsProcessor`` that makes greedy ``generate`` emit ``sample_tokens``' choice at
    every step (``seeds`` int64 ``[B]`` on the model's device; the step counts from ``prompt_len``)."""
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            tok = sample_tokens(scores, seeds, step, temperature, top_p)
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, tok[:, None], 0.0)
            return out

    return SeededSampler()
