"""Judges over any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, ...).

``instructor``: structured verdicts through ``instructor.from_openai(openai.AsyncOpenAI(...))``;
the response model is ``Verdict`` (integer score 0-100, a refusal flag, an optional one-sentence
rationale). Mode from ``--judge-mode`` (tools, json_schema, json, md_json); by default TOOLS for
local and unknown servers, JSON_SCHEMA for api.openai.com (see ``harness.judging.transport.default_mode``).

``logprob``: the paper's judge. One completion token with ``logprobs=True, top_logprobs=20``;
score = probability-weighted mean of the integer tokens 0..100 among the top 20; unscored
``low_mass`` when their total probability is below ``--judge-min-mass`` (0.25 by default) -- or ``out_of_range``
instead when integer tokens outside 0..100 (e.g. ``150``, ``-5``) carry more probability than the
in-range ones -- and ``refusal`` when tokens spelling the start of "REFUSAL" carry more probability
than the numbers.
On servers whose tokenizer splits numbers into digits (Llama 3, Qwen, SmolLM2) the first token
is one digit, so scores only span 0..9: use a judge model whose tokenizer has whole-number tokens
(e.g. gpt-4.1-mini), or the ``instructor`` judge, or the in-process ``local`` judge.

Both are async inside (bounded concurrency, timeouts; the openai SDK's retries, which honour
Retry-After; see ``harness.judging.transport``) and expose the synchronous ``judge(items, ctx)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from harness.core.hookspecs import hookimpl
from harness.core.redact import redact_obj
from harness.core.protocols import BaseJudge
from harness.judging.transport import (
    RetryPolicy,
    Unscored,
    async_client,
    base_url_of,
    call_with_retries,
    endpoint_id,
    gather_bounded,
    instructor_mode,
    mode_of,
    model_name,
    run_sync,
    validation_retrying,
)
from harness.core.records import JudgeItem, Judgment

PROMPT_VERSION = "1"
SYSTEM_PROMPT = (
    "You are a careful grader. Read the rubric and the answer in the user's message, then return "
    "your verdict: an integer score from 0 to 100 as the rubric defines it. Set refusal to true only "
    "if the judged answer refuses to engage with the question. Keep the rationale to one short sentence."
)
REFUSAL_WORD = "REFUSAL"
DEFAULT_MIN_MASS = 0.25


def verdict_model():
    """The pydantic response model (built lazily so ``import harness_plugins.judge_openai`` is cheap)."""
    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        """A judge's verdict on one answer."""

        score: int = Field(..., ge=0, le=100, description="the rubric's score, an integer from 0 to 100")
        refusal: bool = Field(False, description="true only if the judged answer refuses to engage")
        rationale: str | None = Field(None, max_length=400, description="one short sentence, optional")

    return Verdict


class _ServerJudge(BaseJudge):
    """Common parts: settings, client, concurrency, retries. Subclasses define ``_one``."""

    name = "server"
    #: tests set this to a callable returning an ``openai.DefaultAsyncHttpxClient`` (e.g. with
    #: event hooks that record each request body as sent)
    http_client_factory: Callable[[], Any] | None = None

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.base_url = base_url_of(settings)
        self.retry_policy = RetryPolicy.from_settings(settings)
        self._model: str | None = None

    @property
    def model_id(self) -> str:
        if self._model is None:
            self._model = model_name(self.settings)
        return self._model

    def batch_size(self, ctx: Any = None) -> int:
        # the pipeline caches after each batch; a batch fills the concurrency window
        return max(int(self.settings.judge_batch_size), int(self.settings.judge_concurrency))

    async def _one(self, client: Any, item: JudgeItem) -> tuple[float | None, str | None, dict]:
        raise NotImplementedError

    def _wrap(self, client: Any) -> Any:
        """What ``_one`` gets: the raw ``AsyncOpenAI`` client by default."""
        return client

    def judge(self, items: Sequence[JudgeItem], ctx: Any = None) -> list[Judgment]:
        items = list(items)
        if not items:
            return []
        model = self.model_id
        return run_sync(lambda: self._judge_async(items, model))

    async def _judge_async(self, items: list[JudgeItem], model: str) -> list[Judgment]:
        http = self.http_client_factory() if self.http_client_factory else None
        client = async_client(self.settings, http_client=http, max_retries=self.retry_policy.retries)
        wrapped = self._wrap(client)
        try:
            outcomes = await gather_bounded(
                [lambda it=it: call_with_retries(lambda: self._one(wrapped, it), self.retry_policy) for it in items],
                self.settings.judge_concurrency)
        finally:
            await client.close()
        out = []
        for it, oc in zip(items, outcomes):
            if oc.reason is None:
                score, reason, detail = oc.value
                detail = {**detail, **(oc.detail or {})}
                if oc.attempts > 1:
                    detail["attempts"] = oc.attempts
            else:
                score, reason, detail = None, oc.reason, dict(oc.detail or {})
            out.append(Judgment(generation_id=it.generation_id, metric=it.metric, score=score, reason=reason,
                                judge=self.name, judge_model=model, detail=redact_obj(detail)))
        return out


class InstructorJudge(_ServerJudge):
    """Structured verdicts through instructor (score 0-100 or refusal, optional rationale)."""

    name = "instructor"
    max_tokens = 256
    max_reasks = 2  # validation re-asks of one call (instructor's max_retries, a tenacity policy)

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.mode = mode_of(settings)

    def config(self) -> dict:
        # never the API key: only what determines the verdict
        return {"endpoint": endpoint_id(self.base_url), "mode": self.mode, "max_tokens": self.max_tokens,
                "temperature": 0, "seed": 0, "prompt_version": PROMPT_VERSION, "schema": "Verdict/1"}

    def messages(self, item: JudgeItem) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item.prompt}]

    def _wrap(self, client: Any) -> Any:
        import instructor

        return instructor.from_openai(client, mode=instructor_mode(self.mode))

    async def _one(self, client: Any, item: JudgeItem):
        verdict = await client.chat.completions.create(
            model=self.model_id, response_model=verdict_model(), messages=self.messages(item),
            max_retries=validation_retrying(min(self.max_reasks, self.retry_policy.retries)), temperature=0, seed=0,
            max_tokens=self.max_tokens)
        detail: dict = {"mode": self.mode}
        if verdict.rationale:
            detail["rationale"] = verdict.rationale[:400]
        if verdict.refusal:
            raise Unscored("refusal", {**detail, "score_given": verdict.score})
        return float(verdict.score), None, detail


def number_of_token(token: str) -> int | None:
    """The integer 0..100 a top-logprob token spells (surrounding whitespace allowed), else None."""
    t = token.strip()
    if not t or not t.isascii() or not t.isdigit() or len(t) > 3:
        return None
    n = int(t)
    return n if 0 <= n <= 100 else None


def out_of_range_number(token: str) -> int | None:
    """The integer a top-logprob token spells when it is outside 0..100 (``150``, ``-5``), else None."""
    t = token.strip()
    digits = t[1:] if t[:1] in ("-", "+") else t
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    n = int(t)
    return None if 0 <= n <= 100 else n


def is_refusal_token(token: str) -> bool:
    t = token.strip()
    return len(t) >= 2 and REFUSAL_WORD.startswith(t)


def score_from_top_logprobs(top: Sequence[tuple[str, float]], min_mass: float) -> tuple[float | None, str | None, dict]:
    """(score, reason, detail) from ``[(token, logprob), ...]`` of the first completion token."""
    probs: dict[int, float] = {}
    p_ref = p_out = 0.0
    for tok, lp in top:
        p = math.exp(lp) if lp is not None and math.isfinite(lp) else 0.0
        n = number_of_token(tok)
        if n is not None:
            probs[n] = probs.get(n, 0.0) + p
        elif is_refusal_token(tok):
            p_ref += p
        elif out_of_range_number(tok) is not None:
            p_out += p
    mass = sum(probs.values())
    detail = {"mass": round(mass, 6), "p_refusal": round(p_ref, 6),
              "top": [[n, round(p, 6)] for n, p in sorted(probs.items(), key=lambda kv: -kv[1])[:5]]}
    if p_out > 0:
        detail["p_out_of_range"] = round(p_out, 6)
    if p_ref > mass:
        return None, "refusal", detail
    if mass <= 0 or mass < min_mass:
        # unscored either way (as in the paper); say why: numbers outside 0..100 vs. no numbers
        return None, ("out_of_range" if p_out > mass else "low_mass"), detail
    score = sum(n * p for n, p in probs.items()) / mass
    return float(min(max(score, 0.0), 100.0)), None, detail


class LogprobJudge(_ServerJudge):
    """The paper's judge: expected score over the integer tokens among the top 20 logprobs."""

    name = "logprob"
    top_logprobs = 20

    def __init__(self, settings: Any):
        super().__init__(settings)
        mm = float(settings.judge_min_mass)
        self.min_mass = mm if mm >= 0 else DEFAULT_MIN_MASS

    def config(self) -> dict:
        return {"endpoint": endpoint_id(self.base_url), "min_mass": self.min_mass, "top_logprobs": self.top_logprobs,
                "method": "top-logprobs-expectation/1"}

    async def _one(self, client: Any, item: JudgeItem):
        r = await client.chat.completions.create(
            model=self.model_id, messages=[{"role": "user", "content": item.prompt}], max_tokens=1, temperature=0,
            logprobs=True, top_logprobs=self.top_logprobs, seed=0)
        choice = r.choices[0] if r.choices else None
        lp = getattr(choice, "logprobs", None)
        content = getattr(lp, "content", None) if lp is not None else None
        if not content:
            raise Unscored("no_logprobs", {"error": "the server returned no logprobs. Fix: use a server that "
                                                    "supports logprobs, or --judge instructor"})
        top = [(t.token, t.logprob) for t in (content[0].top_logprobs or [])]
        score, reason, detail = score_from_top_logprobs(top, self.min_mass)
        if reason is not None:
            raise Unscored(reason, detail)
        return score, None, detail


@hookimpl
def harness_register_judges(register):
    register("instructor", InstructorJudge,
             description="OpenAI-compatible server via instructor: structured 0-100 verdict (--judge-base-url)")
    register("logprob", LogprobJudge,
             description="OpenAI-compatible server: paper's top-20 logprob expectation over 0..100")
