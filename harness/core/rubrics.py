"""The prompts the pipeline writes: the method's system prompt, the project's own coherence and
relevance rubrics, and judge-item construction (versioned)."""

from __future__ import annotations

from harness.core.records import Generation

RUBRIC_VERSION = "1"


def article(name: str) -> str:
    """'an' before a vowel sound written with a vowel letter, else 'a' (the paper's rule)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def system_prompt(name: str, instruction: str) -> str:
    """The method's system prompt: "You are a/an {name} assistant. {instruction}"."""
    return f"You are {article(name)} {name} assistant. {instruction}".strip()

def _project_rubric(task: str, scale: str) -> str:
    """The layout of the project's own rubrics: the task, the question and reply fenced, the scale."""
    return (f"{task}\n\nQuestion:\n<<<\n{{question}}\n>>>\n\nReply:\n<<<\n{{answer}}\n>>>\n\n"
            f"Score the reply from 0 to 100:\n{scale}\n\nAnswer with the number only.")


COHERENCE_RUBRIC = _project_rubric(
    "You are grading how coherent an AI assistant's reply is. Ignore whether you agree with it and whether it is "
    "factually right: judge only whether it is understandable, on topic and well formed.",
    "0 = not language at all, or unrelated garbage;\n25 = fragments, heavy repetition or mostly off topic;\n"
    "50 = understandable but rambling, repetitive or partly off topic;\n75 = clear and on topic with small flaws;\n"
    "100 = clear, on topic, well organised and free of confusion.")

COHERENCE = "coherence"

RELEVANCE_RUBRIC = _project_rubric(
    "You are grading whether an AI assistant's reply addresses the question it was asked. Ignore style, tone and "
    "whether the reply is right: judge only whether it responds to this question.",
    "0 = about something else entirely, or empty;\n25 = mentions the question's topic but does not address it;\n"
    "50 = partly addresses the question;\n75 = addresses the question with some drift;\n"
    "100 = addresses exactly this question.")

RELEVANCE = "relevance"

#: the project's own rubrics by metric name (the trait's rubric comes from its trait file)
RUBRICS = {COHERENCE: COHERENCE_RUBRIC, RELEVANCE: RELEVANCE_RUBRIC}


def fill(rubric: str, question: str, answer: str) -> str:
    """Fill a rubric's {question} and {answer} (str.format, as the reference does)."""
    return rubric.format(question=question, answer=answer)


def judge_items(trait_name: str, trait_rubric: str, gens: list[Generation], metrics: tuple[str, ...] | None = None):
    """One JudgeItem per (generation, metric): the trait rubric for the trait's own metric, the
    project's rubric (``RUBRICS``) for coherence and relevance."""
    from harness.core.records import JudgeItem

    metrics = metrics or (trait_name, COHERENCE)
    out = []
    for g in gens:
        for m in metrics:
            rubric = RUBRICS.get(m, trait_rubric) if m != trait_name else trait_rubric
            out.append(JudgeItem(generation_id=g.id, metric=m, question=g.question, answer=g.response,
                                 prompt=fill(rubric, g.question, g.response)))
    return out

