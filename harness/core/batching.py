"""Batches that run out of accelerator memory are halved and retried until they fit.

``run_with_oom_halving(fn, items, batch_size)`` calls ``fn(chunk)`` on consecutive chunks of
``items``; ``fn`` returns a list, and the lists are concatenated in order. When ``fn`` raises an
out-of-memory error the chunk is retried at half the size (the smaller size is kept for the rest);
at size 1 the error is re-raised with a clear message. ``fn`` must have no side effects on a
failed call (it raises before recording anything), so a retried chunk is processed exactly once.
torch is never imported here.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Sequence, TypeVar

from harness.core.errors import HarnessError

T = TypeVar("T")
R = TypeVar("R")


class OutOfMemoryBatchError(HarnessError):
    """Even a batch of one item does not fit in memory."""


def is_oom(e: BaseException) -> bool:
    """True for torch.OutOfMemoryError (CUDA, XPU, MPS) and the older RuntimeError form."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _free_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_halving(fn: Callable[[list[T]], list[R]], items: Sequence[T], batch_size: int,
                         *, on_halve: Callable[[int, int], None] | None = None) -> list[R]:
    """Apply ``fn`` to chunks of at most ``batch_size`` items, halving the size on OOM.

    ``on_halve(old, new)`` is called on each halving (default: a warning).
    """
    bs = max(1, int(batch_size))
    out: list[R] = []
    i = 0
    items = list(items)
    while i < len(items):
        chunk = items[i: i + bs]
        try:
            res = fn(chunk)
        except Exception as e:
            if not is_oom(e):
                raise
            _free_memory()
            if len(chunk) <= 1:
                raise OutOfMemoryBatchError(
                    "out of memory on a batch of one item. Fix: use a smaller model or dtype "
                    "(--dtype bfloat16), shorter --max-new-tokens, or a device with more memory") from None
            new = max(1, len(chunk) // 2)
            if on_halve is not None:
                on_halve(len(chunk), new)
            else:
                warnings.warn(f"out of memory at batch size {len(chunk)}; retrying at {new}", stacklevel=2)
            bs = new
            continue
        out.extend(res)
        i += len(chunk)
    return out
