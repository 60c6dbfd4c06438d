"""Fast, hermetic checks of the ``bad_response`` and ``out_of_range`` reasons (no server needed; the
real-server versions are in tests/test_judge_faults.py).

A 2xx reply whose body does not parse as JSON (truncated, garbled) is caught at the HTTP layer by
``harness.judging.transport.check_json_body``: it is retried by the harness's policy (``detail["attempts"]``
counts every request), then recorded unscored as the transient ``bad_response`` (not cached).
A well-formed reply that fails the verdict schema stays ``invalid_output``.
"""

from __future__ import annotations

import json
import math

import pytest

from harness.core.config import Settings
from harness.judging.transport import BadResponse, TRANSIENT_REASONS, check_json_body, classify
from harness.core.records import JudgeItem

openai = pytest.importorskip("openai")
pytest.importorskip("instructor")
httpx2 = pytest.importorskip("httpx2")

RETRIES = 2

GOOD_LOGPROBS = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "7"},
                              "logprobs": {"content": [{"token": "7", "logprob": -0.1, "bytes": None,
                                                        "top_logprobs": [{"token": "7", "logprob": -0.1,
                                                                          "bytes": None}]}]}}]}


def _item() -> JudgeItem:
    return JudgeItem("g0", "coherence", "Q?", "A.", "Rate this answer 0-100: A.")


def _judge(cls_name: str, bodies: list[bytes], **kw):
    """A judge whose HTTP client answers request n with ``bodies[min(n, -1)]`` (status 200)."""
    import harness_plugins.judge_openai as jo

    seen: list[int] = []

    def handler(request):
        n = len(seen)
        seen.append(n)
        return httpx2.Response(200, content=bodies[min(n, len(bodies) - 1)],
                               headers={"content-type": "application/json"})

    s = Settings(judge_base_url="http://127.0.0.1:9/v1", judge_retries=RETRIES, judge_timeout=10.0,
                 judge_concurrency=1, judge_min_mass=0.0, judge_model="m", **kw)
    j = getattr(jo, cls_name)(s)
    j.http_client_factory = lambda: httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    j.retry_policy.base = 0.01  # keep the backoff short; its count and order are what matter here
    return j, seen


@pytest.mark.parametrize("cls_name", ["LogprobJudge", "InstructorJudge"])
@pytest.mark.parametrize("body", [json.dumps(GOOD_LOGPROBS).encode()[:40], b"<html>this is not JSON {"],
                         ids=["truncated", "malformed"])
def test_unparsable_body_is_retried_as_configured_then_transient_bad_response(cls_name, body):
    j, seen = _judge(cls_name, [body])
    (out,) = j.judge([_item()])
    assert out.score is None and out.reason == "bad_response"
    assert len(seen) == RETRIES + 1  # exactly: no instructor re-asks on top of the harness's retries
    assert out.detail["attempts"] == RETRIES + 1 and out.detail["transient"] is True
    assert len(out.detail["waited"]) == RETRIES
    assert "not JSON" in out.detail["error"]


def test_bad_body_then_good_reply_is_scored():
    j, seen = _judge("LogprobJudge", [b"{\"id\": \"c\", \"obj", json.dumps(GOOD_LOGPROBS).encode()])
    (out,) = j.judge([_item()])
    assert out.score == pytest.approx(7.0) and out.reason is None
    assert len(seen) == 2 and out.detail["attempts"] == 2


def test_well_formed_reply_failing_the_schema_stays_invalid_output():
    tool = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None,
                                     "tool_calls": [{"id": "t", "type": "function",
                                                     "function": {"name": "Verdict",
                                                                  "arguments": json.dumps({"score": 150})}}]}}]}
    j, seen = _judge("InstructorJudge", [json.dumps(tool).encode()])
    (out,) = j.judge([_item()])
    assert out.score is None and out.reason == "invalid_output" and not out.detail.get("transient")
    assert len(seen) == 1 + min(j.max_reasks, RETRIES)  # instructor's validation re-asks only


def test_classify_bad_response_inside_openai_and_instructor_wrappers():
    from instructor.core.exceptions import InstructorRetryException

    req = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    try:
        try:
            try:
                raise BadResponse("the judge server answered HTTP 200 with a body that is not JSON")
            except BadResponse as b:
                raise openai.APIConnectionError(request=req) from b
        except openai.APIConnectionError as c:
            raise InstructorRetryException("Connection error.", n_attempts=1, total_usage=0) from c
    except InstructorRetryException as e:
        assert classify(e) == ("bad_response", True, None)
    assert "bad_response" in TRANSIENT_REASONS
    # a decode error of tool-call arguments (the reply itself was JSON) is still invalid_output
    try:
        json.loads("{")
    except json.JSONDecodeError as e:
        assert classify(e)[0] == "invalid_output"


def test_check_json_body_leaves_errors_and_streams_alone():
    import asyncio

    async def run(resp):
        await check_json_body(resp)

    asyncio.run(run(httpx2.Response(500, content=b"<html>oops")))  # classified by status instead
    asyncio.run(run(httpx2.Response(200, content=b"data: {}\n\n", headers={"content-type": "text/event-stream"})))
    asyncio.run(run(httpx2.Response(200, content=b'{"ok": true}')))
    with pytest.raises(BadResponse, match="not JSON"):
        asyncio.run(run(httpx2.Response(200, content=b'{"ok": tr')))


# -- logprob judge: out-of-range numbers are out_of_range, not low_mass ---------------------------
def test_logprob_out_of_range_numbers_are_out_of_range():
    from harness_plugins.judge_openai import score_from_top_logprobs

    ln = math.log
    s, r, d = score_from_top_logprobs([("150", ln(0.6)), ("151", ln(0.3)), ("The", ln(0.05))], 0.0)
    assert (s, r) == (None, "out_of_range") and d["p_out_of_range"] == pytest.approx(0.9)
    s, r, _ = score_from_top_logprobs([("-5", ln(0.5)), ("7", ln(0.1))], 0.25)
    assert (s, r) == (None, "out_of_range")
    # few numbers at all, none out of range: still low_mass
    s, r, _ = score_from_top_logprobs([("7", ln(0.1)), ("The", ln(0.7))], 0.25)
    assert (s, r) == (None, "low_mass")
    # enough in-range mass: scored as in the paper, out-of-range tokens ignored
    s, r, _ = score_from_top_logprobs([("7", ln(0.5)), ("150", ln(0.3))], 0.25)
    assert r is None and s == pytest.approx(7.0)
    # REFUSAL still wins when it outweighs the numbers
    s, r, _ = score_from_top_logprobs([("REF", ln(0.5)), ("150", ln(0.3))], 0.25)
    assert r == "refusal"
