"""Default model loader: any HF causal LM id or local path; ``smollm2`` is the embedded model.

``--revision`` and ``--chat-template`` apply to ``--model``; ``--enable-thinking`` to the generation
prompts of every model loaded (judge prompts always run without thinking).

Under torchrun (WORLD_SIZE > 1) each rank loads its own copy onto ``cuda:LOCAL_RANK``
(``harness.core.distributed.local_device``); ``--device cpu`` stays on the CPU, an explicit GPU such as
``--device cuda:0`` is refused (every rank would load onto that one GPU), and so is ``--device-map``.
"""

from __future__ import annotations

from harness.core.hookspecs import hookimpl


def rank_device(device: str) -> str:
    """The device this process loads onto: ``device`` alone, ``cuda:LOCAL_RANK`` under torchrun."""
    from harness.core import distributed as hd
    from harness.core.errors import HarnessError

    if not hd.is_distributed():
        return device
    if device in ("auto", "cuda"):
        return hd.local_device()
    if device == "cpu":
        return device
    raise HarnessError(
        f"--device {device} names one device, but torchrun started {hd.env_world()} ranks that would all load onto it. "
        "Fix: leave --device at auto (each rank uses cuda:LOCAL_RANK), or choose the GPUs with CUDA_VISIBLE_DEVICES")


@hookimpl(trylast=True)
def harness_load_model(model_id, settings):
    from harness.core.model_ids import canonical_model_id
    from harness.models.loading import load_hf_model

    # --revision and --chat-template describe --model; another model (a local judge's) uses its own
    main = canonical_model_id(model_id) == canonical_model_id(settings.model)
    return load_hf_model(model_id, device=rank_device(settings.device), dtype=settings.dtype,
                         device_map=getattr(settings, "device_map", ""),
                         revision=getattr(settings, "revision", "") if main else "",
                         chat_template=getattr(settings, "chat_template", "") if main else "",
                         thinking=bool(getattr(settings, "enable_thinking", False)))
