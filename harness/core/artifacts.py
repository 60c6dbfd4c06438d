"""Run-directory files: atomic whole-file writes, flushed JSONL appends, safetensors vectors.

Every write names the path and the problem when the file system refuses it (read-only, full, no
permission, a file where a folder belongs), and never leaves a partial file behind. JSON written
here is strict JSON: a non-finite number (NaN, inf) is written as ``null``. JSON read from files
is bounded in size and nesting depth, and text that is not UTF-8 is reported with file and line.
``load_vectors`` is the one reader of vector files, with the sanity checks every command relies on.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.core.errors import HarnessError
from harness.core.records import LAYER_CONVENTION, VectorSet

#: nesting depth and size limits for JSON read from files (trait files, run.json, records, configs)
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 256 * 1024 * 1024

_OS_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free space or choose a folder on another disk"),
    getattr(errno, "EDQUOT", -1): ("the disk quota is exceeded", "free space or choose a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write, or fix its permissions"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "give a folder path, or move the file away"),
    errno.EEXIST: ("a file stands where a folder is needed", "give a folder path, or move the file away"),
    errno.EISDIR: ("it is a folder, not a file", "give a file path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EFBIG: ("the file is too large for this file system or limit", "choose another folder or raise the limit"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}


def os_error_message(path: str | Path, err: OSError, action: str = "cannot write") -> str:
    """One line naming the path, what failed, the problem and the fix."""
    problem, fix = _OS_PROBLEMS.get(err.errno or -2, (err.strerror or type(err).__name__, "check the path"))
    where = err.filename if err.filename and str(err.filename) != str(path) else None
    return f"{path}: {action}: {problem}" + (f" ({where})" if where else "") + f". Fix: {fix}"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that writes strict JSON: non-finite floats become ``null``."""
    kw.setdefault("ensure_ascii", False)
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, **kw)


def _mkdir(folder: Path) -> None:
    from harness.core.locks import make_dir

    if not folder.is_dir():
        make_dir(folder, "folder")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    _mkdir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise HarnessError(os_error_message(path, e)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise HarnessError(os_error_message(path, e)) from None
        if isinstance(e, UnicodeEncodeError):
            raise HarnessError(f"{path}: cannot write text that is not valid Unicode ({e.reason} at character "
                               f"{e.start}). Fix: remove the lone surrogate from the input") from None
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append one batch of records and flush it to disk."""
    path = Path(path)
    _mkdir(path.parent)
    data = "".join(dumps(r) + "\n" for r in records)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise HarnessError(os_error_message(path, e, "cannot append")) from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text (strings skipped), without parsing it."""
    depth = best = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
    return best


def loads(text: str, source: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a nesting limit; errors name ``source`` (a file, or file and line)."""
    if "[" in text or "{" in text:
        if len(text) > max_depth and json_depth(text) > max_depth:
            raise HarnessError(f"{source}: JSON nested deeper than {max_depth} levels. Fix: flatten the data "
                               "(no file the harness reads needs that depth)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HarnessError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}). "
                           "Fix: repair or delete it") from None
    except RecursionError:
        raise HarnessError(f"{source}: JSON nested too deep. Fix: flatten the data") from None


def read_json_file(path: str | Path, *, what: str = "file", max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file, size- and depth-bounded, UTF-8 checked; every problem one line naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise HarnessError(f"{path}: {what} is {size} bytes, over the {max_bytes} byte limit. Fix: check the file")
        raw = path.read_bytes()
    except OSError as e:
        raise HarnessError(os_error_message(path, e, f"cannot read the {what}")) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise HarnessError(f"{path}: line {line}: bytes that are not UTF-8 (byte {e.start}). "
                           "Fix: save the file as UTF-8, or delete it") from None
    return loads(text, str(path), max_depth=max_depth)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Read JSONL records. A torn last line (no newline, or not JSON) is dropped with a warning.

    Any other line that is not UTF-8 or not JSON is an error naming the file and the line."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError as e:
        raise HarnessError(os_error_message(path, e, "cannot read")) from None
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        torn = i == last  # text after the final newline: an interrupted append
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn:
                warnings.warn(f"{path}: dropped a torn last line ({len(raw)} bytes) from an interrupted write")
                continue
            raise HarnessError(f"{path}: line {i + 1}: bytes that are not UTF-8 (column {e.start + 1}). "
                               "Fix: delete the line or the file (a rerun rewrites it)") from None
        try:
            obj = loads(line, f"{path}: line {i + 1}")
        except HarnessError:
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
    _mkdir(path.parent)
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise HarnessError(os_error_message(path, e)) from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=_str_meta(meta))
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise HarnessError(os_error_message(path, e)) from None
        if type(e).__name__ == "SafetensorError" and "No space" in str(e):
            raise HarnessError(os_error_message(path, OSError(errno.ENOSPC, "No space left on device"))) from None
        raise


def run_vector_shape(run_dir: str | Path) -> tuple[int, int] | None:
    """``(num_layers + 1, hidden_size)`` of the model a run directory's ``run.json`` records, if any."""
    rj = Path(run_dir) / "run.json"
    if not rj.is_file():
        return None
    try:
        model = read_json_file(rj, what="run.json").get("model", {})
        return int(model["num_layers"]) + 1, int(model["hidden_size"])
    except (HarnessError, AttributeError, KeyError, TypeError, ValueError):
        return None


def _layers_text(idx: list[int]) -> str:
    return ", ".join(str(i) for i in idx[:12]) + (f" ... ({len(idx)} layers)" if len(idx) > 12 else "")


def check_vector_tensor(name: str, t: Any, path: str | Path, expect_shape: tuple[int, int] | None = None) -> None:
    """Refuse a vector tensor that is not ``[num_layers + 1, hidden]`` (``expect_shape`` when given),
    holds NaN or inf, or is all zeros at a layer >= 1 (index 0, the embedding output, may be zero)."""
    import torch

    shape = tuple(t.shape)
    if t.dim() != 2 or shape[0] < 2 or shape[1] < 1:
        raise HarnessError(f"{path}: tensor {name!r} has shape {shape}; a vector file holds "
                           "[num_hidden_layers + 1, hidden_size]. Fix: extract vectors with 'persona-harness run'")
    if expect_shape is not None and shape != tuple(expect_shape):
        raise HarnessError(
            f"{path}: tensor {name!r} has shape {shape} but the model needs {tuple(expect_shape)} "
            "([num_hidden_layers + 1, hidden_size]). Fix: extract vectors with this model")
    tf = t.float()
    bad = torch.nonzero(~torch.isfinite(tf).all(dim=1)).flatten().tolist()
    if bad:
        raise HarnessError(f"{path}: tensor {name!r} holds NaN or inf at layers {_layers_text(bad)}. "
                           "Fix: extract the vector again (persona-harness run), in float32 if it overflowed")
    zero = [i + 1 for i in torch.nonzero((tf[1:] == 0).all(dim=1)).flatten().tolist()]
    if zero:
        raise HarnessError(f"{path}: tensor {name!r} is all zeros at layers {_layers_text(zero)}: no direction to "
                           "use. Fix: extract the vector again (persona-harness run)")


def load_vectors(path: str | Path, *, expect_shape: tuple[int, int] | None = None) -> VectorSet:
    """Load a vector file (safetensors only, never pickle) and check every tensor
    (``check_vector_tensor``): shape ``expect_shape`` -- by default, for a file inside a run directory,
    the shape of the model its ``run.json`` records -- finite values, no all-zero layer."""
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
    if not tensors:
        raise HarnessError(f"{path}: holds no vectors. Fix: extract vectors with 'persona-harness run'")
    if expect_shape is None:
        expect_shape = run_vector_shape(path.parent)
    for k, t in tensors.items():
        check_vector_tensor(k, t, path, expect_shape)

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


def refuse_fewer(path: str | Path, new: int, old: int | None, *, force: bool = False, unit: str = "results",
                 option: str = "--force") -> None:
    """Refuse to replace ``path``, which holds ``old`` ``unit``, with a result holding fewer (or none),
    unless ``force``. ``old`` None: nothing (readable) to lose."""
    if force or old is None or old <= 0 or (new > 0 and new >= old):
        return
    raise HarnessError(f"{path} holds {old} {unit}; the new result has {new}, and writing it would replace the "
                       f"earlier results with fewer. Nothing was written. Fix: pass {option} to replace them, or "
                       "rerun with settings that produce at least as many")


def old_count(path: str | Path, count: Any) -> int | None:
    """``count(data)`` of the JSON file at ``path``; None when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return int(count(read_json_file(path)))
    except (HarnessError, AttributeError, KeyError, TypeError, ValueError):
        return None
