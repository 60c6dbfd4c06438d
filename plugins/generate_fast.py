"""Fast generator: ``harness.engine`` (static KV cache, CUDA graphs on GPU, on-device sampling).

Same records and seeds as the ``hf`` generator: ``Generation`` fields, ``row_seed(seed, id)``,
the same Gumbel-max noise, so at temperature 0 the tokens equal HF greedy ``generate``. On CPU
the engine runs the same loop eagerly. Architectures the engine is not tested on
(``harness.engine.SUPPORTED_MODEL_TYPES``) and models that ``device_map`` placed on several devices
fall back to the ``hf`` generator, with a one-line notice naming the reason (and ``choice`` says so,
which run.json records).

``auto`` (the default generator) is ``fast`` on a CUDA device, else ``hf``
(``harness.engine.auto_component``); its product is that component, with ``choice`` saying why.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

from harness.core.hookspecs import hookimpl
from harness.core.protocols import BaseGenerator
from harness.models.loading import end_token_ids, prompt_ids
from harness.core.records import Generation, GenerationRequest
from harness.models.sampling import row_seed


class FastGenerator(BaseGenerator):
    name = "fast"

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.choice: dict | None = None  # set by ``auto``, or when the loaded model falls back to hf
        self.ignore_eos = bool((getattr(settings, "plugin_config", {}) or {}).get("fast", {}).get("ignore_eos", False))

    def batch_size(self, ctx) -> int:
        # the pipeline hands over this many requests at once; the engine splits them by free memory
        return self.settings.batch_size or (64 if ctx.model().device.type == "cpu" else 4096)

    def generate(self, requests: Sequence[GenerationRequest], ctx) -> list[Generation]:
        from harness.engine import Engine, fast_generation_supported

        lm = ctx.model()
        ok, why = fast_generation_supported(lm.model)
        if not ok:
            from harness_plugins.generate_hf import HFGenerator

            warnings.warn(f"generator 'fast': {why}; using the 'hf' generator", stacklevel=2)
            self.choice = {"setting": (self.choice or {}).get("setting", "fast"), "chosen": "hf", "reason": why}

            gens = HFGenerator(self.settings).generate(requests, ctx)
            return [Generation.from_dict({**g.to_dict(), "generator": self.name}) for g in gens]
        tok = lm.tokenizer
        ends = end_token_ids(tok, lm.model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else ends[0]
        temps = {(r.temperature, r.top_p) for r in requests}
        if len(temps) != 1:
            raise ValueError("one generate() call needs one temperature and top_p")
        temperature, top_p = temps.pop()
        prompts = [prompt_ids(tok, r.messages) for r in requests]
        engine = Engine.for_model(lm)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, max(r.max_new_tokens for r in requests), temperature=temperature,
                               top_p=top_p, seeds=[row_seed(r.seed, r.id) for r in requests], stop_ids=ends,
                               pad_id=pad, ignore_eos=self.ignore_eos,
                               batch_size=self.settings.batch_size or None)
        self.last_seconds = time.perf_counter() - t0
        result = []
        for r, p, o in zip(requests, prompts, outs):
            ids = o.ids[: r.max_new_tokens]
            result.append(Generation(
                id=r.id, trait=r.trait, split=r.split, polarity=r.polarity, question_index=r.question_index,
                question=r.question, instruction_index=r.instruction_index, sample_index=r.sample_index,
                system_prompt=r.system_prompt, response=tok.decode(ids, skip_special_tokens=True),
                response_token_ids=tuple(ids), prompt_token_ids=tuple(p),
                finish_reason=o.finish_reason if len(o.ids) <= r.max_new_tokens else "length",
                model_id=lm.model_id, generator=self.name,
            ))
        return result


def auto_generator(settings: Any):
    """``fast`` on a CUDA device, else ``hf``; the product's ``choice`` says which and why."""
    from harness.engine import auto_component
    from harness_plugins.generate_hf import HFGenerator

    name, why = auto_component("generator", getattr(settings, "device", "auto"), getattr(settings, "device_map", ""))
    gen = FastGenerator(settings) if name == "fast" else HFGenerator(settings)
    gen.choice = {"setting": "auto", "chosen": name, "reason": why}
    return gen


@hookimpl
def harness_register_generators(register):
    register("auto", auto_generator, description="fast on a CUDA device, else hf (run.json says which and why)")
    register("fast", FastGenerator,
             description="static KV cache + CUDA graphs (GPU), on-device seeded sampling; greedy equals HF generate")
