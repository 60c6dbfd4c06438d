"""Fast mean-difference extractor: ``harness.engine.Engine.extract_sums``.

Same vectors as ``mean-diff`` (within bf16 tolerance on GPU, fp32 rounding on CPU): per-example
means at every hidden_states index, summed in fp32, divided by the counts. Hooks on the decoder
layers replace ``output_hidden_states``; no lm_head; batches sized by tokens from free memory.
Under torch.distributed each rank extracts its shard of the examples and the sums and counts
are all-reduced, so every rank holds the single-process vectors. Architectures the engine is not
tested on (``harness.engine.SUPPORTED_MODEL_TYPES``) and models that ``device_map`` placed on several
devices (the engine's hooks would sum each layer on its own device) fall back to the ``mean-diff``
extractor, with a one-line notice naming the reason (and ``choice`` says so, which run.json records).

``auto`` (the default extractor) is ``fast`` on a CUDA device, else ``mean-diff``
(``harness.engine.auto_component``); its product is that component, with ``choice`` saying why.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from harness.models.activations import METHODS
from harness.core.hookspecs import hookimpl
from harness.core.protocols import BaseExtractor
from harness.core.records import Generation, VectorSet
from harness_plugins.extract_mean_diff import MeanDiffExtractor, mean_diff_vectors, require_pairs


def sharded_sums(lm, gens: Sequence[Generation], methods=METHODS) -> tuple[dict[str, Any], int]:
    """This rank's share of the sums, all-reduced over ranks (plain sums when not distributed)."""
    from harness.core import distributed as hd
    from harness.engine import Engine

    rank, world = hd.rank_world()
    mine = list(gens)[rank::world] if world > 1 else list(gens)
    sums, n = Engine.for_model(lm).extract_sums([(g.prompt_token_ids, g.response_token_ids) for g in mine], methods)
    if world > 1:
        sums = {k: hd.all_reduce_sum(v) for k, v in sums.items()}
        n = len(gens)
    return sums, n


class FastExtractor(BaseExtractor):
    name = "fast"
    distributed = True  # shards examples itself and all-reduces

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.choice: dict | None = None  # set by ``auto``, or when the loaded model falls back to mean-diff

    def extract(self, trait, pos: Sequence[Generation], neg: Sequence[Generation], ctx) -> VectorSet:
        require_pairs(trait, pos, neg)
        lm = ctx.model()
        from harness.engine import fast_extraction_supported

        ok, why = fast_extraction_supported(lm.model)
        if not ok:
            from harness.core import distributed as hd

            warnings.warn(f"extractor 'fast': {why}; using the 'mean-diff' extractor", stacklevel=2)
            self.choice = {"setting": (self.choice or {}).get("setting", "fast"), "chosen": "mean-diff", "reason": why}
            vs = hd.on_main(lambda: MeanDiffExtractor(self.settings).extract(trait, pos, neg, ctx))
            vs.extractor = self.name
            vs.metadata["fallback"] = "mean-diff"
            return vs
        psum, npos = sharded_sums(lm, pos)
        nsum, nneg = sharded_sums(lm, neg)
        return mean_diff_vectors(trait, lm, psum, npos, nsum, nneg, self.name)


def auto_extractor(settings: Any):
    """``fast`` on a CUDA device, else ``mean-diff``; the product's ``choice`` says which and why."""
    from harness.engine import auto_component

    name, why = auto_component("extractor", getattr(settings, "device", "auto"), getattr(settings, "device_map", ""))
    ex = FastExtractor(settings) if name == "fast" else MeanDiffExtractor(settings)
    ex.choice = {"setting": "auto", "chosen": name, "reason": why}
    return ex


@hookimpl
def harness_register_extractors(register):
    register("auto", auto_extractor, description="fast on a CUDA device, else mean-diff (run.json says which and why)")
    register("fast", FastExtractor, description="hooked batched forward, fp32 sums, no lm_head; torchrun-aware")
