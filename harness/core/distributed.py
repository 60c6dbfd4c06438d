"""Data-parallel runs under torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR).

One process per GPU. ``run_trait`` shards the generation requests across ranks and gathers the
records on every rank (rank 0 alone writes the run directory); judging runs on rank 0 only with
its usual bounded concurrency, and the judgments and the selection are broadcast; distributed-aware
extractors (``fast``) shard the examples and all-reduce the per-layer sums and counts, so the
vectors equal the single-process result. Other extractors run on rank 0 and are broadcast.

Backend: NCCL when CUDA is available, gloo otherwise (``PERSONA_HARNESS_DIST_BACKEND`` overrides).
Collective timeout: ``PERSONA_HARNESS_DIST_TIMEOUT`` seconds (default 6 h): ranks 1.. wait in a
broadcast while rank 0 judges, and NCCL's own default (10 min) would end a long judge stage.
Models too big for one GPU: run one plain process per host with ``--device-map auto`` (see
README.md, "Several GPUs: torchrun"), not torchrun ranks per GPU; the two cannot be combined.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Sequence, TypeVar

from harness.core.errors import HarnessError

T = TypeVar("T")

TIMEOUT_ENV = "PERSONA_HARNESS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600.0


def env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True when a launcher asked for several processes (or a process group is already up)."""
    if env_world() > 1:
        return True
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except Exception:  # pragma: no cover
        return False


def rank_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), env_world()


def timeout_seconds(value: float | str | None = None) -> float:
    """The collective timeout: ``value``, else ``PERSONA_HARNESS_DIST_TIMEOUT``, else 6 h."""
    raw = os.environ.get(TIMEOUT_ENV, "") if value is None else value
    if raw in ("", None):
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise HarnessError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds, > 0 (default 21600 = 6 h)")
    return t


def init(timeout: float | str | None = None) -> tuple[int, int]:
    """Initialise the process group from the environment once; returns (rank, world).

    ``timeout`` (seconds; default ``PERSONA_HARNESS_DIST_TIMEOUT``, else 6 h) bounds every collective,
    including the broadcast in which ranks 1.. wait while rank 0 judges.
    """
    if not is_distributed():
        return 0, 1
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = os.environ.get("PERSONA_HARNESS_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds(timeout)))
    return dist.get_rank(), dist.get_world_size()


def local_device() -> str:
    """'cuda:<LOCAL_RANK>' under a multi-GPU launch, else 'auto'."""
    import torch

    if is_distributed() and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "auto"


def shard(items: Sequence[T]) -> list[T]:
    """This rank's round-robin share (items[rank::world])."""
    r, w = rank_world()
    return list(items)[r::w]


def all_gather_list(items: Sequence[T]) -> list[T]:
    """Concatenate every rank's list in rank order (every rank gets the result)."""
    r, w = rank_world()
    if w == 1:
        return list(items)
    import torch.distributed as dist

    out: list[Any] = [None] * w
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast(obj: T, src: int = 0) -> T:
    r, w = rank_world()
    if w == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t):
    """Sum a tensor over ranks (in place on a copy; fp32 stays fp32)."""
    r, w = rank_world()
    if w == 1:
        return t
    import torch
    import torch.distributed as dist

    backend = dist.get_backend()
    x = t.detach().clone()
    if backend == "gloo" and x.device.type != "cpu":
        y = x.cpu()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(t.device)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    torch.cuda.synchronize() if x.device.type == "cuda" else None
    return x


# ----------------------------------------------------------------------- pipeline helpers
_PRIVATE_DIRS: list[str] = []


def cleanup_private_run_dirs() -> None:
    """Delete the throwaway run folders ``private_run_dir`` made on this rank (also done at exit)."""
    import shutil

    while _PRIVATE_DIRS:
        shutil.rmtree(_PRIVATE_DIRS.pop(), ignore_errors=True)


def private_run_dir(run_dir):
    """Rank 0 writes ``run_dir``; other ranks write into a throwaway folder of their own.

    A rank's throwaway folder lives until its next run starts (the previous one is deleted then)
    or the process exits, whichever comes first.
    """
    from pathlib import Path

    r, w = rank_world()
    if r == 0:
        return Path(run_dir)
    import tempfile

    cleanup_private_run_dirs()
    d = tempfile.mkdtemp(prefix=f"persona-harness-rank{r}-")
    _PRIVATE_DIRS.append(d)
    return Path(d)


atexit.register(cleanup_private_run_dirs)


def generate_sharded(ctx, requests, generator, run_generate):
    """Each rank generates ``requests[rank::world]``; every rank gets all records, in request order."""
    r, w = rank_world()
    if w == 1:
        return run_generate(ctx, requests, generator)
    mine = run_generate(ctx, shard(requests), generator)
    byid = {g.id: g for g in all_gather_list(mine)}
    return [byid[q.id] for q in requests]


def on_main(fn):
    """Run ``fn`` on rank 0 only and broadcast its result (or its error) to every rank."""
    r, w = rank_world()
    if w == 1:
        return fn()
    if r == 0:
        try:
            out = ("ok", fn())
        except BaseException as e:  # tell the other ranks, then raise here
            broadcast(("error", f"{type(e).__name__}: {e}"))
            raise
        return broadcast(out)[1]
    status, value = broadcast(None)
    if status == "error":
        raise HarnessError(f"rank 0 failed: {value}")
    return value


def extract(extractor, trait, pos, neg, ctx):
    """Distributed-aware extractors (``distributed = True``) run on every rank; others on rank 0."""
    if rank_world()[1] == 1 or getattr(extractor, "distributed", False):
        return extractor.extract(trait, pos, neg, ctx)
    return on_main(lambda: extractor.extract(trait, pos, neg, ctx))
