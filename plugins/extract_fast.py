"""Fast mean-difference extractor: ``harness.engine.Engine.extract_sums``.

Same vectors as ``mean-diff`` (within bf16 tolerance on GPU, fp32 rounding on CPU): per-example
means at every hidden_states index, summed in fp32, divided by the counts. Hooks on the decoder
layers replace ``output_hidden_states``; no lm_head; batches sized by tokens from free memory.
Under torch.distributed each rank extracts its shard of the examples and the sums and counts
are all-reduced, so every rank holds the single-process vectors.
"""

from __future__ import annotations

from typing import Any, Sequence

from harness.activations import METHODS
from harness.errors import NoEffectivePairsError
from harness.hookspecs import hookimpl
from harness.records import Generation, VectorSet


def sharded_sums(lm, gens: Sequence[Generation], methods=METHODS) -> tuple[dict[str, Any], int]:
    """This rank's share of the sums, all-reduced over ranks (plain sums when not distributed)."""
    from harness import distributed as hd
    from harness.engine import Engine

    rank, world = hd.rank_world()
    mine = list(gens)[rank::world] if world > 1 else list(gens)
    sums, n = Engine.for_model(lm).extract_sums([(g.prompt_token_ids, g.response_token_ids) for g in mine], methods)
    if world > 1:
        sums = {k: hd.all_reduce_sum(v) for k, v in sums.items()}
        n = len(gens)
    return sums, n


class FastExtractor:
    name = "fast"
    distributed = True  # shards examples itself and all-reduces

    def __init__(self, settings: Any):
        self.settings = settings

    def extract(self, trait, pos: Sequence[Generation], neg: Sequence[Generation], ctx) -> VectorSet:
        if not pos or not neg:
            raise NoEffectivePairsError(f"{trait.name}: no effective pairs to extract from (pos={len(pos)}, neg={len(neg)})")
        lm = ctx.model()
        psum, npos = sharded_sums(lm, pos)
        nsum, nneg = sharded_sums(lm, neg)
        tensors = {f"{m}_diff": (psum[m] / npos - nsum[m] / nneg).cpu() for m in METHODS}
        return VectorSet(trait=trait.name, model_id=lm.model_id, tensors=tensors, n_pos=npos, n_neg=nneg,
                         extractor=self.name)


@hookimpl
def harness_register_extractors(register):
    register("fast", FastExtractor, description="hooked batched forward, fp32 sums, no lm_head; torchrun-aware")
