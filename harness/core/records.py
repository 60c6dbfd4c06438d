"""Records passed between stages. Plain frozen dataclasses that round-trip through JSON.

Stages never share anything but these records (and the loaded model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

Polarity = Literal["pos", "neg"]
Split = Literal["extract", "eval"]

#: hidden_states index convention used by every vector file.
LAYER_CONVENTION = (
    "hidden_states: index 0 = embedding output, index L (1..num_hidden_layers) = output of "
    "model.layers[L-1]; HF applies the final norm to the last index"
)


def inner_layers(n_indices: int) -> range:
    """The inner ``hidden_states`` indices 1..L-1 of a model with ``n_indices = L + 1``: index 0 (the
    embeddings) and index L (after the final norm) are never picked (all indices when L < 2)."""
    L = n_indices - 1
    return range(1, L) if L > 1 else range(0, n_indices)


def peak_layer(values: Sequence[float]) -> int:
    """The inner index of the largest value (the norm-peak rule); the first one on ties."""
    return max(inner_layers(len(values)), key=lambda i: values[i])


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


class _Record:
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: v for k, v in d.items() if k in names}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
                kwargs[f.name] = tuple(
                    tuple(x) if isinstance(x, list) else x for x in kwargs[f.name]
                )
        return cls(**kwargs)


@dataclass(frozen=True)
class InstructionPair(_Record):
    pos: str
    neg: str


@dataclass(frozen=True)
class TraitSpec(_Record):
    """A trait: instruction pairs, disjoint extraction/evaluation questions, judge rubric."""

    name: str
    instructions: tuple[InstructionPair, ...]
    questions: tuple[str, ...]  # extraction split
    eval_questions: tuple[str, ...]  # evaluation split (may be empty)
    eval_prompt: str
    source: str = ""
    eval_source: str = ""
    description: str = ""
    checks: dict = field(default_factory=dict)  # acceptance thresholds (traits/<name>/checks.json)

    def questions_for(self, split: Split) -> tuple[str, ...]:
        return self.questions if split == "extract" else self.eval_questions

    @property
    def hash(self) -> str:
        return content_hash(
            {
                "name": self.name,
                "instructions": [[p.pos, p.neg] for p in self.instructions],
                "questions": list(self.questions),
                "eval_questions": list(self.eval_questions),
                "eval_prompt": self.eval_prompt,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["instructions"] = [{"pos": p.pos, "neg": p.neg} for p in self.instructions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraitSpec:
        d = dict(d)
        d["instructions"] = tuple(InstructionPair(**p) for p in d["instructions"])
        d["questions"] = tuple(d["questions"])
        d["eval_questions"] = tuple(d.get("eval_questions", ()))
        return super().from_dict(d)


@dataclass(frozen=True)
class GenerationRequest(_Record):
    id: str  # "{trait}_{split}_{question_index}_{polarity}_{instruction_index}_{sample_index}"
    trait: str
    split: str
    polarity: str
    question_index: int
    question: str
    instruction_index: int
    sample_index: int
    system_prompt: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @property
    def messages(self) -> list[dict[str, str]]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": self.question})
        return msgs

    @property
    def pair_key(self) -> tuple:
        """Requests with the same pair_key and opposite polarity form a pos/neg pair."""
        return (self.split, self.question_index, self.instruction_index, self.sample_index)


@dataclass(frozen=True)
class Generation(_Record):
    id: str
    trait: str
    split: str
    polarity: str
    question_index: int
    question: str
    instruction_index: int
    sample_index: int
    system_prompt: str
    response: str
    response_token_ids: tuple[int, ...]  # generated ids, end-of-turn token excluded
    prompt_token_ids: tuple[int, ...]  # the exact rendered prompt the model saw
    finish_reason: str  # "stop" | "length"
    model_id: str
    generator: str
    cache_key: str = ""

    @property
    def pair_key(self) -> tuple:
        return (self.split, self.question_index, self.instruction_index, self.sample_index)


@dataclass(frozen=True)
class JudgeItem(_Record):
    """What a judge scores: one metric of one generation, with the filled rubric."""

    generation_id: str
    metric: str
    question: str
    answer: str
    prompt: str  # the rubric with {question} and {answer} filled in


@dataclass(frozen=True)
class Judgment(_Record):
    """One metric of one generation. An unscored judgment has ``score=None`` and a reason."""

    generation_id: str
    metric: str  # the trait name, or "coherence"
    score: float | None
    reason: str | None = None  # why unscored (refusal, low_mass, timeout, http_429, ...)
    judge: str = ""
    judge_model: str = ""
    detail: dict = field(default_factory=dict)
    cache_key: str = ""

    def __post_init__(self) -> None:
        if self.score is None and not self.reason:
            raise ValueError("an unscored Judgment needs a reason")
        if self.score is not None and not (0.0 <= float(self.score) <= 100.0):
            raise ValueError(f"score {self.score!r} outside 0..100")


@dataclass(frozen=True)
class Selection(_Record):
    """Effective pos/neg pairs kept by a filter, with counts of what each rule dropped."""

    trait: str
    pairs: tuple[tuple[str, str], ...]  # (pos generation id, neg generation id)
    candidates: int
    dropped: dict = field(default_factory=dict)  # rule -> count (first failing rule)
    params: dict = field(default_factory=dict)
    filter: str = ""

    @property
    def pos_ids(self) -> list[str]:
        return [p for p, _ in self.pairs]

    @property
    def neg_ids(self) -> list[str]:
        return [n for _, n in self.pairs]


@dataclass
class VectorSet:
    """Per-layer vectors, each tensor ``[num_hidden_layers + 1, hidden_size]``."""

    trait: str
    model_id: str
    tensors: dict  # method name -> torch.Tensor
    n_pos: int
    n_neg: int
    layer_convention: str = LAYER_CONVENTION
    metadata: dict = field(default_factory=dict)
    extractor: str = ""

    def __getitem__(self, method: str):
        return self.tensors[method]
