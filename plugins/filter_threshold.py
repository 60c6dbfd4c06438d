"""Effective-pair filter (persona vectors): pos >= T, neg < 100 - T, both coherence >= C.

A pair is the pos and neg generation with the same split, question, instruction and sample
index. Each dropped pair is counted under the first rule it fails; an unscored judgment fails
its rule (it is never read as 0 or as a pass).
"""

from __future__ import annotations

from typing import Any, Sequence

from harness.core.hookspecs import hookimpl
from harness.core.protocols import BaseFilter
from harness.core.records import Generation, Judgment, Selection
from harness.core.rubrics import COHERENCE

RULES = ("missing_pair", "pos_trait_unscored", "pos_trait_low", "neg_trait_unscored", "neg_trait_high",
         "pos_incoherent", "neg_incoherent", "empty_response")


def _score(j: dict[tuple[str, str], Judgment], gid: str, metric: str) -> float | None:
    x = j.get((gid, metric))
    return None if x is None else x.score


class ThresholdFilter(BaseFilter):
    name = "effective-pairs"

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.T = float(settings.trait_threshold)
        self.C = float(settings.coherence_threshold)

    def config(self) -> dict:
        return {"trait_threshold": self.T, "coherence_threshold": self.C}

    def select(self, trait, generations: Sequence[Generation], judgments: Sequence[Judgment]) -> Selection:
        by_key: dict[tuple, dict[str, Generation]] = {}
        for g in generations:
            by_key.setdefault(g.pair_key, {})[g.polarity] = g
        jm = {(j.generation_id, j.metric): j for j in judgments}
        dropped = {r: 0 for r in RULES}
        pairs = []
        for key in sorted(by_key):
            d = by_key[key]
            if "pos" not in d or "neg" not in d:
                dropped["missing_pair"] += 1
                continue
            pos, neg = d["pos"], d["neg"]
            ps, ns = _score(jm, pos.id, trait.name), _score(jm, neg.id, trait.name)
            pc, nc = _score(jm, pos.id, COHERENCE), _score(jm, neg.id, COHERENCE)
            if not pos.response_token_ids or not neg.response_token_ids:
                rule = "empty_response"
            elif ps is None:
                rule = "pos_trait_unscored"
            elif ps < self.T:
                rule = "pos_trait_low"
            elif ns is None:
                rule = "neg_trait_unscored"
            elif ns >= 100 - self.T:
                rule = "neg_trait_high"
            elif pc is None or pc < self.C:
                rule = "pos_incoherent"
            elif nc is None or nc < self.C:
                rule = "neg_incoherent"
            else:
                pairs.append((pos.id, neg.id))
                continue
            dropped[rule] += 1
        return Selection(trait=trait.name, pairs=tuple(pairs), candidates=len(by_key),
                         dropped={k: v for k, v in dropped.items() if v},
                         params={"trait_threshold": self.T, "coherence_threshold": self.C}, filter=self.name)


@hookimpl
def harness_register_filters(register):
    register("effective-pairs", ThresholdFilter, description="pos >= T, neg < 100-T, coherence >= C on both")
