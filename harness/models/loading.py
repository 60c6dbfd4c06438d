"""Model helpers shared by the HF plugins: loading, the embedded model, chat prompts.

torch and transformers are imported inside functions so that ``import harness`` stays light.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError
from harness.core.model_ids import (
    EMBEDDED_ID,
    chat_template_text,
    dtype_name,
    embedded_gguf_path,
    file_sha256,
    is_embedded,
    model_fingerprint,
)

#: template variables that are switches, and the value the harness gives them. ``enable_thinking`` /
#: ``thinking`` (Qwen3-, Granite-, DeepSeek-style thinking) follow ``Settings.enable_thinking`` (judging:
#: off); ``date_string`` (Llama-3-style templates print today's date otherwise) is pinned so that a
#: prompt is the same on every day.
THINKING_SWITCHES = ("enable_thinking", "thinking")
PINNED_TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024"}


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


def models_cache_dir() -> Path:
    base = os.environ.get("PERSONA_HARNESS_MODELS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "persona-harness", "models"
    )
    return Path(base)


def embedded_model_source() -> dict[str, Any]:
    """What the converted embedded model depends on: the GGUF file (name, sha256, size) and the
    transformers version that converts it."""
    import transformers

    gguf = embedded_gguf_path()
    return {"gguf": gguf.name, "sha256": file_sha256(gguf), "size": gguf.stat().st_size,
            "transformers": transformers.__version__}


def embedded_model_path() -> Path:
    """Where ``embedded_model_dir`` keeps the conversion: a folder named after ``embedded_model_source``
    (tokenizer and config files written by one transformers version need not load under another, so a
    folder written under another version, or from another GGUF, is never reused)."""
    tag = hashlib.sha256(json.dumps(embedded_model_source(), sort_keys=True).encode()).hexdigest()[:12]
    return models_cache_dir() / f"smollm2-135m-instruct-{tag}"


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded GGUF (converted once per GGUF and transformers version;
    reloads take ~0.3 s)."""
    out = embedded_model_path()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    source = embedded_model_source()
    gguf = embedded_gguf_path()
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
    (tmp / "persona-harness-source.json").write_text(json.dumps(source, indent=1) + "\n")
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
    """The torch dtype for ``dtype`` (``harness.core.model_ids.dtype_name``: auto = bf16 on CUDA, else fp32)."""
    import torch

    return getattr(torch, dtype_name(dtype, getattr(device, "type", str(device))))


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


def load_hf_model(model_id: str, *, device: str = "auto", dtype: str = "auto", device_map: str = "",
                  revision: str = "", chat_template: str = "", thinking: bool = False) -> LoadedModel:
    """Load any HF causal LM (hub id or local path); ``smollm2`` (and its aliases) is the embedded model.

    ``device_map`` ("auto", "balanced", ...; needs accelerate) is passed to ``from_pretrained``, which
    places the layers over this host's GPUs; the model is then not moved, and ``LoadedModel.device`` is
    the device of the input embeddings. It cannot be combined with torchrun ranks (WORLD_SIZE > 1).
    ``revision``: hub branch, tag or commit. ``chat_template`` (a file path or the template text)
    replaces the tokenizer's; a model with neither is an error. ``thinking``: see ``configure_chat``.
    ``info["fingerprint"]`` is ``harness.core.model_ids.model_fingerprint`` of the files loaded.
    """
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
    embedded = is_embedded(model_id)
    canonical = EMBEDDED_ID if embedded else model_id
    path = str(embedded_model_dir()) if embedded else model_id
    rev = {} if embedded or not revision else {"revision": revision}
    tok = AutoTokenizer.from_pretrained(path, **rev)
    prepare_tokenizer(tok)
    # before the weights load: a missing or broken chat template is reported at once
    info: dict[str, Any] = {"path": path, "chat": configure_chat(tok, canonical, chat_template=chat_template,
                                                                 thinking=thinking)}
    if device_map:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=device_map, **rev)
        dev = model.get_input_embeddings().weight.device
        info.update(device_map=device_map, devices=model_devices(model))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **rev)
        model.to(dev)
    # what was loaded (a hub id: the commit now in the local hub cache); RunContext.model compares it
    # with the fingerprint the cache keys were made with
    info["fingerprint"] = model_fingerprint(canonical, revision, cache_only=True)
    model.eval()  # no autograd switch here: the passes that run the model use torch.inference_mode()
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


@functools.lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """Names a Jinja chat template reads from its context (``messages``, ``enable_thinking``, ...).

    A template that plain Jinja cannot parse (tags only transformers defines) is scanned for the
    switch names instead."""
    import jinja2
    from jinja2 import meta

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateSyntaxError:
        import re

        wanted = (*THINKING_SWITCHES, *PINNED_TEMPLATE_VARIABLES)
        return frozenset(w for w in wanted if re.search(rf"(?<![.\w'\"]){w}\b", template))


def chat_switches(tok, *, thinking: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for ``apply_chat_template``: the switches this tokenizer's template reads.

    ``thinking`` None: the tokenizer's configured value (``configure_chat``; default off)."""
    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str) or not template:
        return {}
    names = template_variables(template)
    if thinking is None:
        thinking = bool((getattr(tok, "harness_chat", None) or {}).get("thinking", False))
    out: dict[str, Any] = {k: bool(thinking) for k in THINKING_SWITCHES if k in names}
    out.update({k: v for k, v in PINNED_TEMPLATE_VARIABLES.items() if k in names})
    return out


def configure_chat(tok, model_id: str, *, chat_template: str = "", thinking: bool = False) -> dict[str, Any]:
    """Set the tokenizer's chat template (``chat_template``: a file path or the text; replaces its own)
    and the thinking switch ``prompt_ids`` uses; return what was set (for run.json).

    A tokenizer without a template and no ``chat_template`` is an error naming the model and the fix."""
    text = chat_template_text(chat_template)
    if text:
        tok.chat_template = text
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one formats chat prompts
        template = template.get("default")
        tok.chat_template = template
    if not isinstance(template, str) or not template.strip():
        raise HarnessError(
            f"model {model_id!r} has no chat template, so its chat prompts cannot be built. Fix: pass "
            "--chat-template FILE (a Jinja chat template file, or the template text), or use an instruction-tuned "
            "model that ships one")
    tok.harness_chat = {"thinking": bool(thinking)}
    # a template that cannot render the harness's prompts fails here, before anything is generated
    prompt_ids(tok, [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}])
    return {"template": "given" if text else "model", "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "switches": chat_switches(tok)}


def prompt_ids(tok, messages: list[dict[str, str]], *, thinking: bool | None = None) -> list[int]:
    """Token ids of the chat prompt up to and including the assistant header.

    The one place a chat template is applied: the template's switches come from ``chat_switches``
    (``thinking=False`` for judge prompts; None: the tokenizer's configured value)."""
    template = getattr(tok, "chat_template", None)
    if not template:
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        raise HarnessError(
            f"tokenizer {name!r} has no chat template, so its chat prompts cannot be built. Fix: pass "
            "--chat-template FILE (a Jinja chat template file, or the template text), or use an instruction-tuned "
            "model that ships one")
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                      **chat_switches(tok, thinking=thinking))
    except TemplateError as e:  # a syntax error, or e.g. raise_exception('System role not supported')
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        what = f"has a syntax error on line {e.lineno}" if isinstance(e, TemplateSyntaxError) else "refused the prompt"
        raise HarnessError(
            f"the chat template of {name!r} {what}: {e}. Fix: pass --chat-template FILE with a template that "
            "renders a system and a user message (what the harness sends)") from None
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(i) for i in out]


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward`` ('cache' in newer transformers)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)
