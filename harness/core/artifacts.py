"""Run-directory files: atomic whole-file writes, flushed JSONL appends, safetensors vectors."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.core.errors import HarnessError
from harness.core.records import LAYER_CONVENTION, VectorSet


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append one batch of records and flush it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Read JSONL records. A torn last line (no newline, or not JSON) is dropped with a warning."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        torn = i == last  # text after the final newline: an interrupted append
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if torn:
                warnings.warn(f"{path}: dropped a torn last line ({len(line)} chars) from an interrupted write")
                continue
            raise HarnessError(f"{path}: line {i + 1} is not valid JSON. Fix: delete the line or the file") from None
        if torn:
            warnings.warn(f"{path}: dropped a torn last line without newline from an interrupted write")
            continue
        yield obj


def _str_meta(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def save_vectors(path: str | Path, vs: VectorSet) -> None:
    """Save a VectorSet as safetensors with string metadata (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "trait": vs.trait,
        "model": vs.model_id,
        "methods": ",".join(sorted(vs.tensors)),
        "layer_convention": vs.layer_convention,
        "n_pos": vs.n_pos,
        "n_neg": vs.n_neg,
        "extractor": vs.extractor,
        "format": "persona-harness/1",
        **vs.metadata,
    }
    tensors = {k: v.detach().to("cpu").float().contiguous() for k, v in vs.tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=_str_meta(meta))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_vectors(path: str | Path, *, expect_shape: tuple[int, int] | None = None) -> VectorSet:
    """Load a vector file (safetensors only, never pickle); optionally check its shape."""
    from safetensors import safe_open

    path = Path(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    except Exception as e:  # safetensors raises several types
        raise HarnessError(f"{path}: not a readable safetensors vector file ({e})") from None
    if expect_shape is not None:
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(expect_shape):
                raise HarnessError(
                    f"{path}: tensor {k!r} has shape {tuple(t.shape)} but the model needs {tuple(expect_shape)} "
                    "([num_hidden_layers + 1, hidden_size]). Fix: extract vectors with this model"
                )
    def _int(x: str) -> int:
        try:
            return int(json.loads(x))
        except Exception:
            return 0
    known = {"trait", "model", "methods", "layer_convention", "n_pos", "n_neg", "extractor"}
    return VectorSet(
        trait=meta.get("trait", ""),
        model_id=meta.get("model", ""),
        tensors=tensors,
        n_pos=_int(meta.get("n_pos", "0")),
        n_neg=_int(meta.get("n_neg", "0")),
        layer_convention=meta.get("layer_convention", LAYER_CONVENTION),
        extractor=meta.get("extractor", ""),
        metadata={k: v for k, v in meta.items() if k not in known},
    )
