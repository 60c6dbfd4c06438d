"""Mean-difference extractor: vector[l] = mean_pos(x[l]) - mean_neg(x[l]) for every layer.

Three methods, each ``[num_hidden_layers + 1, hidden_size]`` in the hidden_states convention:
``response_avg_diff`` (the paper's), ``prompt_avg_diff`` and ``prompt_last_diff``. Examples are
the exact (prompt_token_ids, response_token_ids) recorded by the generator; per-example means
are summed in fp32 on the device, then divided by the number of examples.
"""

from __future__ import annotations

from typing import Any, Sequence

from harness.models.activations import METHODS, example_means
from harness.core.batching import run_with_oom_halving
from harness.core.errors import NoEffectivePairsError
from harness.core.hookspecs import hookimpl
from harness.core.protocols import BaseExtractor
from harness.core.records import Generation, VectorSet


def mean_activations(lm, gens: Sequence[Generation], batch_size: int) -> tuple[dict[str, Any], int]:
    """Sum of per-example means over ``gens`` ({method: [L+1, H] fp32}) and the count."""
    examples = [(g.prompt_token_ids, g.response_token_ids) for g in gens]
    sums: dict[str, Any] = {}
    # a batch that runs out of memory is halved and retried (harness.core.batching)
    for batch in run_with_oom_halving(lambda chunk: list(example_means(lm, chunk, len(chunk))), examples, batch_size):
        for k, v in batch.items():
            s = v.sum(0)
            sums[k] = s if k not in sums else sums[k] + s
    return sums, len(examples)


def require_pairs(trait, pos: Sequence[Generation], neg: Sequence[Generation]) -> None:
    if not pos or not neg:
        raise NoEffectivePairsError(f"{trait.name}: no effective pairs to extract from (pos={len(pos)}, neg={len(neg)})")


def mean_diff_vectors(trait, lm, psum: dict[str, Any], npos: int, nsum: dict[str, Any], nneg: int,
                      extractor: str) -> VectorSet:
    """VectorSet of ``{method}_diff = psum/npos - nsum/nneg`` (on the CPU) for every method in METHODS."""
    tensors = {f"{m}_diff": (psum[m] / npos - nsum[m] / nneg).cpu() for m in METHODS}
    return VectorSet(trait=trait.name, model_id=lm.model_id, tensors=tensors, n_pos=npos, n_neg=nneg,
                     extractor=extractor)


class MeanDiffExtractor(BaseExtractor):
    name = "mean-diff"

    def extract(self, trait, pos: Sequence[Generation], neg: Sequence[Generation], ctx) -> VectorSet:
        require_pairs(trait, pos, neg)
        lm = ctx.model()
        bs = self.settings.extract_batch_size
        psum, npos = mean_activations(lm, pos, bs)
        nsum, nneg = mean_activations(lm, neg, bs)
        return mean_diff_vectors(trait, lm, psum, npos, nsum, nneg, self.name)


@hookimpl
def harness_register_extractors(register):
    register("mean-diff", MeanDiffExtractor, description="per-layer mean difference (response/prompt avg, prompt last)")
