"""Default model loader: any HF causal LM id or local path; ``smollm2`` is the embedded model."""

from __future__ import annotations

from harness.hookspecs import hookimpl


@hookimpl(trylast=True)
def harness_load_model(model_id, settings):
    from harness.modeling import load_hf_model

    return load_hf_model(model_id, device=settings.device, dtype=settings.dtype)
