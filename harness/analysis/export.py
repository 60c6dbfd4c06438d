"""Vectors out of the harness and back in: llama.cpp / ollama control vectors, steering-vectors,
repeng, plain torch.

Layer indices. A vector file here is ``[num_hidden_layers + 1, hidden]``, indexed like HF
``hidden_states``: index ``L`` is the output of decoder block ``L - 1`` (0 = the embeddings). The
other tools key layers by *block index*:

* llama.cpp ``--control-vector FILE`` reads GGUF tensors ``direction.N`` (1-D, F32, N >= 1;
  ``common_control_vector_load_one`` stores ``direction.N`` at ``(N - 1) * n_embd`` and
  ``llama_adapter_cvec::apply`` gives it to layer ``N``) and adds them to the output of block ``N``
  (``build_cvec(cur, il)`` after block ``il``), at every position. So hidden_states index ``L`` is
  ``direction.{L-1}``; block 0's output (``L = 1``) cannot be steered there (``direction.0`` is refused).
* repeng's ``ControlVector.directions[k]`` and ``ControlModel(model, layer_ids=[k])`` wrap
  ``model.model.layers[k]``; its ``export_gguf`` / ``import_gguf`` use the same ``direction.k`` GGUF
  layout (with ``controlvector.model_hint`` and ``controlvector.layer_count``): ``k = L - 1``.
* steering-vectors' ``SteeringVector(layer_activations={k: tensor}, layer_type="decoder_block")``
  patches the output of decoder block ``k``: ``k = L - 1``.

Formats (``persona-harness export RUN_DIR --format ...``):

* ``gguf``: a control vector for llama.cpp / ollama (``--control-vector`` or
  ``--control-vector-scaled FILE SCALE``); ``coef * v[L]`` for each exported layer.
* ``repeng``: the same GGUF layout, the file ``repeng.ControlVector.import_gguf`` reads.
* ``steering-vectors``: a ``.pt`` dict ``{"layer_activations": {k: tensor}, "layer_type":
  "decoder_block"}`` (plain tensors, ``torch.load(..., weights_only=True)``); build the object with
  ``SteeringVector(**torch.load(path, weights_only=True))``.
* ``pt``: the whole ``[num_hidden_layers + 1, hidden]`` tensor (hidden_states index) saved with
  ``torch.save``, as other persona-vector code stores it.

``load_vector_file`` reads any of them (and the harness's own safetensors) back into the
``[num_hidden_layers + 1, hidden]`` layout for ``persona-harness steer --vector FILE``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from harness.core.errors import HarnessError

FORMATS = ("gguf", "steering-vectors", "repeng", "pt")
SUFFIX = {"gguf": ".gguf", "repeng": ".repeng.gguf", "steering-vectors": ".steering-vectors.pt", "pt": ".pt"}
GGUF_ARCH = "controlvector"  # general.architecture of a control-vector file (llama.cpp ignores it; repeng checks it)
META_PREFIX = "persona_harness."


def block_index(L: int, num_layers: int, *, fmt: str = "gguf") -> int:
    """hidden_states index ``L`` -> the decoder block whose output it is (``L - 1``), checked for ``fmt``."""
    if not 1 <= L <= num_layers:
        raise HarnessError(f"layer {L} cannot be exported: hidden_states index L is the output of block L-1, so L "
                           f"must be 1..{num_layers} (0 is the embedding output)")
    if fmt in ("gguf", "repeng") and L == 1:
        raise HarnessError("layer 1 (the output of block 0) cannot be a llama.cpp control vector: llama.cpp never "
                           "steers block 0 and refuses direction.0. Fix: export a layer from 2 up")
    return L - 1


def hidden_index(block: int) -> int:
    """Block index ``k`` (llama.cpp ``direction.k``, repeng, steering-vectors) -> hidden_states index ``k + 1``."""
    return int(block) + 1


def model_hint(model_class: str | None) -> str:
    """repeng's ``model_type`` hint from an HF class name: ``LlamaForCausalLM`` -> ``llama``."""
    name = (model_class or "").removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    return name.lower() or "unknown"


def _directions(vector: Any, layers: Sequence[int], coef: float, fmt: str) -> dict[int, Any]:
    import torch

    v = torch.as_tensor(vector).detach().float().cpu()
    if v.dim() != 2:
        raise HarnessError(f"a vector to export must be [num_hidden_layers + 1, hidden], got shape {tuple(v.shape)}")
    n = v.shape[0] - 1
    if not layers:
        raise HarnessError("no layers to export. Fix: give --layer L (comma list, or 'all')")
    out = {}
    for L in layers:
        k = block_index(int(L), n, fmt=fmt)
        d = v[int(L)] * float(coef)
        if not torch.isfinite(d).all():
            raise HarnessError(f"the vector at layer {L} contains NaN or inf; nothing was exported")
        out[k] = d.contiguous()
    if n in layers:
        warnings.warn(f"layer {n} = num_hidden_layers: the vector was read after the final norm, but every "
                      "tool adds it to the last block's output, before the norm", stacklevel=3)
    return out


def export_vector(vector: Any, fmt: str, path: str | Path, *, layers: Sequence[int], coef: float = 1.0,
                  model_class: str | None = None, meta: dict | None = None) -> Path:
    """Write ``coef * vector[L]`` for each hidden_states index ``L`` in ``layers`` as ``fmt``
    (``pt`` writes the whole tensor, unscaled unless ``coef`` is not 1). Returns the path."""
    import torch

    if fmt not in FORMATS:
        raise HarnessError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in (meta or {}).items() if v is not None}
    if fmt == "pt":
        v = torch.as_tensor(vector).detach().float().cpu().contiguous() * float(coef)
        if v.dim() != 2:
            raise HarnessError(f"a vector to export must be [num_hidden_layers + 1, hidden], got {tuple(v.shape)}")
        torch.save(v, _tmp(path))
        _tmp(path).replace(path)
        return path
    dirs = _directions(vector, layers, coef, fmt)
    if fmt == "steering-vectors":
        torch.save({"layer_activations": dirs, "layer_type": "decoder_block"}, _tmp(path))
        _tmp(path).replace(path)
        return path
    write_gguf_directions(path, dirs, model_hint(model_class), {**meta, "coef": float(coef),
                                                      "hidden_states_index": [hidden_index(k) for k in dirs]})
    return path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_gguf_directions(path: Path, dirs: dict[int, Any], hint: str, meta: dict) -> None:
    """Write ``{block index: 1-D tensor}`` as a GGUF control vector (``direction.k``, F32) with metadata."""
    try:
        import gguf
    except ImportError:
        raise HarnessError("writing a GGUF control vector needs the package 'gguf'. Fix: pip install gguf") from None
    tmp = _tmp(path)
    w = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
    w.add_string(f"{GGUF_ARCH}.model_hint", hint)
    w.add_uint32(f"{GGUF_ARCH}.layer_count", len(dirs))
    for key, value in meta.items():
        w.add_string(META_PREFIX + key, value if isinstance(value, str) else json.dumps(value))
    for k in sorted(dirs):
        w.add_tensor(f"direction.{k}", dirs[k].numpy().astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)


def read_gguf_directions(path: str | Path) -> tuple[dict[int, Any], dict[str, str]]:
    """``{block index: float32 tensor}`` and the string metadata of a GGUF control vector, read with the
    rules of llama.cpp's loader: tensor names ``direction.N`` with N >= 1, F32, 1-D, one length; a
    direction given twice is summed."""
    import numpy as np
    import torch

    try:
        import gguf
    except ImportError:
        raise HarnessError("reading a GGUF control vector needs the package 'gguf'. Fix: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises several types for a file that is not GGUF
        raise HarnessError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for name, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            meta[name] = bytes(f.parts[-1]).decode("utf-8", errors="replace")
    out: dict[int, Any] = {}
    n_embd = None
    for t in reader.tensors:
        head, _, idx = t.name.partition(".")
        if head != "direction" or not idx.isdigit():
            raise HarnessError(f"{path}: tensor {t.name!r} is not 'direction.N'; llama.cpp would refuse the file")
        k = int(idx)
        if k == 0:
            raise HarnessError(f"{path}: tensor direction.0 (llama.cpp refuses layer index 0)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len([d for d in t.shape if d != 1]) > 1:
            raise HarnessError(f"{path}: tensor {t.name} must be a 1-D F32 tensor (llama.cpp's rule)")
        data = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        if n_embd is not None and data.numel() != n_embd:
            raise HarnessError(f"{path}: tensor {t.name} has {data.numel()} values, the others {n_embd}")
        n_embd = data.numel()
        out[k] = out[k] + data if k in out else data
    if not out:
        raise HarnessError(f"{path}: no direction.N tensors: not a control vector")
    return out, meta


def load_vector_file(path: str | Path, *, num_layers: int, hidden_size: int,
                     method: str = "response_avg_diff") -> tuple[Any, list[int]]:
    """A vector file of any supported kind as ``([num_layers + 1, hidden_size] tensor, layers it sets)``.

    ``.gguf`` (llama.cpp / repeng control vector: ``direction.k`` -> index ``k + 1``), ``.pt`` (a
    ``[num_layers + 1, hidden]`` tensor in hidden_states order, or a steering-vectors dict whose
    ``layer_activations`` are keyed by block index), ``.safetensors`` (the harness's vector files:
    tensor ``method``). Layers the file does not set are zero."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"--vector {path}: no such file")
    full = torch.zeros(num_layers + 1, hidden_size)
    blocks: dict[int, Any] | None = None
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        blocks, _ = read_gguf_directions(path)
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise HarnessError(f"--vector {path}: not a tensor file torch.load(weights_only=True) reads "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if isinstance(obj, dict) and isinstance(obj.get("layer_activations"), dict):
            if obj.get("layer_type", "decoder_block") != "decoder_block":
                raise HarnessError(f"--vector {path}: steering-vectors layer_type {obj.get('layer_type')!r}; only "
                                   "'decoder_block' (the residual stream) can be steered here")
            blocks = {int(k): torch.as_tensor(v).float().flatten() for k, v in obj["layer_activations"].items()}
        elif torch.is_tensor(obj) and obj.dim() == 2:
            if tuple(obj.shape) != (num_layers + 1, hidden_size):
                raise HarnessError(f"--vector {path}: tensor of shape {tuple(obj.shape)}, but the model needs "
                                   f"({num_layers + 1}, {hidden_size}) = (num_hidden_layers + 1, hidden_size)")
            full = obj.float().clone()
            return full, [L for L in range(1, num_layers + 1) if bool(full[L].abs().sum() > 0)]
        else:
            raise HarnessError(f"--vector {path}: expected a [num_hidden_layers + 1, hidden] tensor or a "
                               "steering-vectors dict with 'layer_activations'")
    elif suffix == ".safetensors":
        from harness.core.artifacts import load_vectors

        vs = load_vectors(path, expect_shape=(num_layers + 1, hidden_size))
        if method not in vs.tensors:
            raise HarnessError(f"--vector {path} has no {method!r} (has {', '.join(sorted(vs.tensors))})")
        full = vs.tensors[method].float().clone()
        return full, [L for L in range(1, num_layers + 1) if bool(full[L].abs().sum() > 0)]
    else:
        raise HarnessError(f"--vector {path}: unknown file kind {suffix!r}; give a .gguf, .pt or .safetensors file")
    for k, d in sorted(blocks.items()):
        L = hidden_index(k)
        if not 1 <= L <= num_layers:
            raise HarnessError(f"--vector {path}: block index {k} is outside this model's 0..{num_layers - 1}")
        if d.numel() != hidden_size:
            raise HarnessError(f"--vector {path}: the direction for block {k} has {d.numel()} values but the model's "
                               f"hidden size is {hidden_size}. Fix: use a vector made for this model")
        full[L] = d
    return full, sorted(hidden_index(k) for k in blocks)
