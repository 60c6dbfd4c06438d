"""Retries, backoff, Retry-After, timeouts and concurrency of the server judges.

The retries are the openai SDK's own (``max_retries = --judge-retries``; exponential backoff from
0.5 s with up to 25 % jitter, capped at 8 s; the server's Retry-After wins), instructor re-asks a
reply that fails the schema under a tenacity policy. Faults are injected by small real HTTP servers
on 127.0.0.1 written here (test doubles of an OpenAI-compatible server, hence 'fake_server' in the
test names); the judges use the real openai and instructor clients against them.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.core.config import Settings
from harness.core.errors import HarnessError
from harness.judging.transport import RetryPolicy, default_mode, server_kind
from harness.core.records import Generation, JudgeItem, Judgment, TraitSpec, InstructionPair

pytest.importorskip("openai")
pytest.importorskip("instructor")


def completion_with_logprobs(top: list[tuple[str, float]]) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": top[0][0]},
                         "logprobs": {"content": [{"token": top[0][0], "logprob": top[0][1], "bytes": None,
                                                   "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                                    for t, lp in top]}]}}]}


def completion_with_tool_call(arguments: dict) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None,
                                     "tool_calls": [{"id": "t1", "type": "function",
                                                     "function": {"name": "Verdict",
                                                                  "arguments": json.dumps(arguments)}}]}}]}


class FakeServer:
    """A threaded HTTP server; ``respond(n, body)`` -> (status, headers, json body, delay seconds)."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n_bytes = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n_bytes) or b"{}")
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append({"t": time.monotonic(), "path": self.path, "body": body,
                                           "auth": self.headers.get("authorization")})
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, headers, payload, delay = outer.respond(n, body)
                    if delay:
                        time.sleep(delay)
                    data = json.dumps(payload).encode()
                    try:
                        self.send_response(status)
                        for k, v in {"content-type": "application/json", **headers}.items():
                            self.send_header(k, v)
                        self.send_header("content-length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def settings_for(url: str, **kw) -> Settings:
    base = dict(judge_base_url=url, judge_model="m", judge_retries=3, judge_timeout=10.0, judge_concurrency=4,
                judge_min_mass=0.25)
    base.update(kw)
    return Settings(**base)


def items(n: int = 1, metric: str = "mini") -> list[JudgeItem]:
    return [JudgeItem(generation_id=f"g{i}", metric=metric, question="q?", answer=f"a{i}",
                      prompt=f"Rate answer a{i} from 0 to 100. Number only.") for i in range(n)]


def logprob_judge(s: Settings):
    from harness_plugins.judge_openai import LogprobJudge

    j = LogprobJudge(s)
    assert j.retry_policy == RetryPolicy(retries=s.judge_retries)
    return j


GOOD = completion_with_logprobs([("7", -0.1), ("3", -2.5), ("Hello", -3.0)])


# -- pure helpers -------------------------------------------------------------------------
def test_default_mode_per_server_kind():
    assert server_kind("http://127.0.0.1:8080/v1") == "local" and default_mode("http://127.0.0.1:8080/v1") == "tools"
    assert server_kind("http://localhost:8000/v1") == "local"
    assert server_kind("https://api.openai.com/v1") == "openai" and default_mode("https://api.openai.com/v1") == "json_schema"
    assert server_kind("https://api.together.xyz/v1") == "other" and default_mode("https://api.together.xyz/v1") == "tools"


# -- fault injection ----------------------------------------------------------------------
def test_429_retry_after_is_honoured_fake_server():
    def respond(n, body):
        if n == 0:
            return 429, {"retry-after": "1"}, {"error": {"message": "slow down"}}, 0
        return 200, {}, GOOD, 0

    with FakeServer(respond) as srv:
        j = logprob_judge(settings_for(srv.url))
        t0 = time.monotonic()
        [out] = j.judge(items(1), None)
        elapsed = time.monotonic() - t0
    assert len(srv.requests) == 2
    gap = srv.requests[1]["t"] - srv.requests[0]["t"]
    assert gap >= 0.95, f"the client retried after {gap:.2f}s, before Retry-After: 1"
    assert elapsed >= 0.95
    assert out.score is not None and out.detail["waited"] == [1.0] and out.detail["attempts"] == 2


def test_retry_after_http_date_is_honoured_fake_server():
    def respond(n, body):
        if n == 0:
            return 503, {"retry-after": email.utils.formatdate(time.time() + 2, usegmt=True)}, {"error": {}}, 0
        return 200, {}, GOOD, 0

    with FakeServer(respond) as srv:
        [out] = logprob_judge(settings_for(srv.url)).judge(items(1), None)
    gap = srv.requests[1]["t"] - srv.requests[0]["t"]
    assert gap >= 0.9 and out.score is not None  # the date has 1 s resolution: 1..2 s


def test_exponential_backoff_then_unscored_with_reason_fake_server():
    """The SDK's backoff: 0.5 s * 2^k, each shortened by up to 25 % jitter; waited = what it slept."""
    with FakeServer(lambda n, b: (503, {}, {"error": {"message": "overloaded"}}, 0)) as srv:
        j = logprob_judge(settings_for(srv.url, judge_retries=3))
        [out] = j.judge(items(1), None)
    assert len(srv.requests) == 4  # 1 + judge_retries
    gaps = [b["t"] - a["t"] for a, b in zip(srv.requests, srv.requests[1:])]
    waited = out.detail["waited"]
    assert len(waited) == 3
    for w, g, nominal in zip(waited, gaps, (0.5, 1.0, 2.0)):
        assert nominal * 0.75 - 1e-3 <= w <= nominal + 1e-3
        assert g >= w * 0.95  # the client really waited that long before the next request
    assert waited[2] > waited[0]
    assert out.score is None and out.reason == "http_503"
    assert out.detail["attempts"] == 4 and out.detail["transient"] is True


def test_client_error_is_not_retried_fake_server():
    with FakeServer(lambda n, b: (400, {}, {"error": {"message": "bad request"}}, 0)) as srv:
        [out] = logprob_judge(settings_for(srv.url)).judge(items(1), None)
    assert len(srv.requests) == 1 and out.reason == "http_400" and "transient" not in out.detail


def test_bad_key_stops_the_run_with_the_variable_named_fake_server():
    with FakeServer(lambda n, b: (401, {}, {"error": {"message": "invalid key"}}, 0)) as srv:
        with pytest.raises(HarnessError, match="judge-api-key-env"):
            logprob_judge(settings_for(srv.url)).judge(items(1), None)


def test_timeout_becomes_unscored_timeout_fake_server():
    with FakeServer(lambda n, b: (200, {}, GOOD, 1.5)) as srv:
        [out] = logprob_judge(settings_for(srv.url, judge_timeout=0.3, judge_retries=1)).judge(items(1), None)
    assert out.score is None and out.reason == "timeout" and out.detail["transient"] is True
    assert len(srv.requests) == 2


def test_connection_refused_is_connection_error():
    from tests.server_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    [out] = logprob_judge(settings_for(url, judge_retries=1)).judge(items(1), None)
    assert out.score is None and out.reason == "connection_error"


def test_concurrency_is_bounded_fake_server():
    with FakeServer(lambda n, b: (200, {}, GOOD, 0.2)) as srv:
        outs = logprob_judge(settings_for(srv.url, judge_concurrency=2)).judge(items(6), None)
    assert len(srv.requests) == 6 and srv.max_in_flight == 2
    assert [o.generation_id for o in outs] == [f"g{i}" for i in range(6)]


def test_instructor_reasks_on_invalid_output_then_unscored_fake_server():
    from harness_plugins.judge_openai import InstructorJudge

    with FakeServer(lambda n, b: (200, {}, completion_with_tool_call({"score": 150}), 0)) as srv:
        j = InstructorJudge(settings_for(srv.url, judge_retries=4))
        [out] = j.judge(items(1), None)
    assert out.score is None and out.reason == "invalid_output"
    assert len(srv.requests) == 1 + j.max_reasks  # instructor's validation re-asks; not HTTP-retried
    reask = srv.requests[-1]["body"]["messages"]
    assert any("less than or equal to 100" in json.dumps(m) for m in reask), reask


def test_instructor_refusal_flag_is_unscored_refusal_fake_server():
    from harness_plugins.judge_openai import InstructorJudge

    with FakeServer(lambda n, b: (200, {}, completion_with_tool_call({"score": 0, "refusal": True}), 0)) as srv:
        [out] = InstructorJudge(settings_for(srv.url)).judge(items(1), None)
    assert out.score is None and out.reason == "refusal"


def test_logprob_refusal_and_low_mass():
    from harness_plugins.judge_openai import score_from_top_logprobs

    import math

    ln = math.log
    s, r, d = score_from_top_logprobs([("REF", ln(0.5)), ("7", ln(0.2)), ("The", ln(0.2))], 0.25)
    assert s is None and r == "refusal"
    s, r, d = score_from_top_logprobs([("7", ln(0.1)), ("3", ln(0.1)), ("The", ln(0.7))], 0.25)
    assert s is None and r == "low_mass" and d["mass"] == pytest.approx(0.2)
    s, r, d = score_from_top_logprobs([("7", ln(0.3)), (" 7", ln(0.1)), ("100", ln(0.2)), ("007", ln(0.1)),
                                       ("101", ln(0.1)), ("-3", ln(0.1))], 0.25)
    # 7: 0.4, 100: 0.2, "007" = 7: 0.1; 101 and -3 are not numbers in 0..100
    assert r is None and s == pytest.approx((7 * 0.5 + 100 * 0.2) / 0.7)


# -- unscored never counts as 0 ------------------------------------------------------------
def _gens():
    def g(pol, qi):
        return Generation(id=f"t_extract_{qi}_{pol}_0_0", trait="t", split="extract", polarity=pol, question_index=qi,
                          question="q", instruction_index=0, sample_index=0, system_prompt="", response=f"r-{pol}-{qi}",
                          response_token_ids=(1,), prompt_token_ids=(1,), finish_reason="stop", model_id="m",
                          generator="hf")
    return [g("pos", 0), g("neg", 0), g("pos", 1), g("neg", 1)]


def test_unscored_judgments_are_excluded_from_means_and_dropped_by_the_filter():
    from harness.core.pipeline import score_summary
    from harness_plugins.filter_threshold import ThresholdFilter

    spec = TraitSpec(name="t", instructions=(InstructionPair("p", "n"),), questions=("q", "q2"), eval_questions=(),
                     eval_prompt="{question}{answer}")
    gens = _gens()
    J = Judgment
    js = [J(gens[0].id, "t", 80.0), J(gens[1].id, "t", 10.0), J(gens[2].id, "t", None, reason="timeout"),
          J(gens[3].id, "t", 20.0)]
    js += [J(g.id, "coherence", 90.0) for g in gens]
    summ = score_summary(spec, gens, js)
    assert summ["trait_pos_mean"] == 80.0  # not (80 + 0) / 2
    assert summ["trait_neg_mean"] == 15.0
    assert summ["unscored"] == {"timeout": 1}
    sel = ThresholdFilter(Settings(trait_threshold=0.0, coherence_threshold=0.0)).select(spec, gens, js)
    # with T = 0 a score of 0 would pass; the unscored pos is dropped as unscored
    assert sel.pairs == ((gens[0].id, gens[1].id),)
    assert sel.dropped == {"pos_trait_unscored": 1}


def test_transient_failures_are_not_cached_and_a_rerun_asks_again_fake_server(tmp_path):
    from harness.core.cache import Cache
    from harness.core.pipeline import RunContext, run_judge
    from harness.core.plugins import get_plugin_manager

    spec = TraitSpec(name="t", instructions=(InstructionPair("p", "n"),), questions=("q",), eval_questions=(),
                     eval_prompt="Rate {question} / {answer}. Number only.")
    gens = _gens()[:2]
    state = {"fail": True}
    with FakeServer(lambda n, b: (503, {}, {"error": {}}, 0) if state["fail"] else (200, {}, GOOD, 0)) as srv:
        s = settings_for(srv.url, judge_retries=0, cache_dir=str(tmp_path / "cache"))
        ctx = RunContext(settings=s, pm=get_plugin_manager(entrypoints=False), cache=Cache(s.cache_dir))
        first = run_judge(ctx, spec, gens, logprob_judge(s))
        assert all(j.score is None and j.reason == "http_503" for j in first)
        assert ctx.cache.count("judge") == 0
        state["fail"] = False
        second = run_judge(ctx, spec, gens, logprob_judge(s))
        assert all(j.score is not None for j in second) and ctx.cache.count("judge") == 4
        n = len(srv.requests)
        third = run_judge(ctx, spec, gens, logprob_judge(s))  # resumed from the cache: no requests
        assert len(srv.requests) == n and [j.score for j in third] == [j.score for j in second]


# -- which model judges ---------------------------------------------------------------------------
class ModelsServer:
    """Answers GET /v1/models with the given model ids (a test double of a multi-model server)."""

    def __init__(self, names):
        outer = self
        self.names = names

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                data = json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in outer.names]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_multi_model_server_without_a_judge_model_is_an_error_listing_its_models_fake_server():
    from harness.judging.transport import model_name
    from harness_plugins.judge_openai import LogprobJudge

    with ModelsServer(["judge-a", "judge-b", "judge-c"]) as srv:
        s = settings_for(srv.url, judge_model="")
        with pytest.raises(HarnessError) as ei:
            model_name(s)
        msg = str(ei.value)
        assert "hosts 3 models (judge-a, judge-b, judge-c)" in msg and "--judge-model" in msg and srv.url in msg
        with pytest.raises(HarnessError, match="hosts 3 models"):
            LogprobJudge(s).judge(items(1), None)
        assert model_name(settings_for(srv.url, judge_model="judge-b")) == "judge-b"
    with ModelsServer(["only-one"]) as srv:
        assert model_name(settings_for(srv.url, judge_model="")) == "only-one"


def test_validation_retrying_reasks_only_schema_failures():
    import asyncio

    import openai
    from pydantic import BaseModel, ValidationError

    from harness.judging.transport import validation_retrying

    class M(BaseModel):
        x: int

    calls = {"n": 0}

    async def run(exc_factory):
        calls["n"] = 0
        async for attempt in validation_retrying(2):
            with attempt:
                calls["n"] += 1
                raise exc_factory()

    def bad_schema():
        try:
            M(x="nope")
        except ValidationError as e:
            return e

    with pytest.raises(ValidationError):
        asyncio.run(run(bad_schema))
    assert calls["n"] == 3  # 1 + 2 re-asks
    import httpx2

    with pytest.raises(openai.APIConnectionError):
        asyncio.run(run(lambda: openai.APIConnectionError(request=httpx2.Request("POST", "http://127.0.0.1:9/v1"))))
    assert calls["n"] == 1  # the SDK already retried transport errors: not re-asked
