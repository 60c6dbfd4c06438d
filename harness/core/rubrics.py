"""The project's own coherence rubric and judge-item construction (versioned)."""

from __future__ import annotations

from harness.core.records import Generation

RUBRIC_VERSION = "1"

COHERENCE_RUBRIC = """You are grading how coherent an AI assistant's reply is. Ignore whether you agree with it and whether it is factually right: judge only whether it is understandable, on topic and well formed.

Question:
<<<
{question}
>>>

Reply:
<<<
{answer}
>>>

Score the reply from 0 to 100:
0 = not language at all, or unrelated garbage;
25 = fragments, heavy repetition or mostly off topic;
50 = understandable but rambling, repetitive or partly off topic;
75 = clear and on topic with small flaws;
100 = clear, on topic, well organised and free of confusion.

Answer with the number only."""

COHERENCE = "coherence"


def fill(rubric: str, question: str, answer: str) -> str:
    """Fill a rubric's {question} and {answer} (str.format, as the reference does)."""
    return rubric.format(question=question, answer=answer)


def judge_items(trait_name: str, trait_rubric: str, gens: list[Generation], metrics: tuple[str, ...] | None = None):
    """One JudgeItem per (generation, metric): the trait rubric and the coherence rubric."""
    from harness.core.records import JudgeItem

    metrics = metrics or (trait_name, COHERENCE)
    out = []
    for g in gens:
        for m in metrics:
            rubric = COHERENCE_RUBRIC if m == COHERENCE else trait_rubric
            out.append(JudgeItem(generation_id=g.id, metric=m, question=g.question, answer=g.response,
                                 prompt=fill(rubric, g.question, g.response)))
    return out

