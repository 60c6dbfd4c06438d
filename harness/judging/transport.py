"""Shared machinery for judges that call an OpenAI-compatible server.

* Client construction: ``openai.AsyncOpenAI(base_url=..., api_key=...)`` (optionally wrapped by
  ``instructor.from_openai``). The API key is read from the environment variable named by
  ``settings.judge_api_key_env`` at call time; it is never stored on the judge, in records, in the
  cache key, in run.json or in log messages.
* Bounded concurrency: ``asyncio.Semaphore(settings.judge_concurrency)``.
* Timeouts (``settings.judge_timeout`` seconds per HTTP request) and retries: the openai SDK's own
  (``max_retries = settings.judge_retries``: timeouts, connection errors, 408/409/429/5xx, exponential
  backoff with jitter, the server's ``Retry-After``). Replies that fail the verdict schema are
  re-asked by instructor under a ``tenacity`` policy (``validation_retrying``). After the last try
  the item is unscored with a reason: ``timeout``, ``http_<status>``, ``connection_error``,
  ``bad_response`` (a 2xx reply whose body is not JSON: truncated or malformed at the HTTP layer),
  ``invalid_output`` (a well-formed reply that fails the verdict schema) or whatever a judge's own
  ``Unscored`` says (``refusal``, ``low_mass``, ``out_of_range``, ...). ``detail["attempts"]``
  counts the transport attempts and ``detail["waited"]`` the SDK's backoff delays (``CallLog``).
* Transport-level body check: every client made by ``async_client`` gets an httpx response hook
  (``check_json_body``) that reads each 2xx reply and raises ``BadResponse`` when its body does not
  parse as JSON, before openai or instructor try to parse it. The SDK treats that like a broken
  connection and retries it with the same budget and backoff, instead of instructor re-asking or the
  item being recorded as ``invalid_output``.

Judges stay synchronous to the pipeline: ``run_sync(coro)`` runs an event loop inside ``judge()``.
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlparse

from harness.core.errors import HarnessError
from harness.core.redact import install_log_redaction, is_env_var_name, redact, register_secret

log = logging.getLogger("persona_harness.judging")
T = TypeVar("T")

OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "gpt-4.1-mini"  # the paper's judge
LOCAL_PLACEHOLDER_KEY = "local"  # sent to local servers when no key is set (they ignore it)
MODES = ("tools", "json_schema", "json", "md_json")
#: reasons that come from a transport problem, not from the judged text: the pipeline does not
#: cache such judgments (``detail["transient"]``), so a rerun asks again.
TRANSIENT_REASONS = ("timeout", "connection_error", "bad_response")


class Unscored(Exception):
    """Raised inside a judge coroutine: the item is unscored with ``reason`` (not retried)."""

    def __init__(self, reason: str, detail: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or {}


class BadResponse(Exception):
    """A 2xx reply from the judge server whose body is not JSON (truncated, garbled, an HTML page).

    Raised by the ``check_json_body`` response hook; openai wraps it in ``APIConnectionError``
    (``__cause__``), and ``classify`` maps it to the transient, retryable reason ``bad_response``."""


def _body_excerpt(data: bytes, n: int = 80) -> str:
    return redact(data[:n].decode("utf-8", errors="replace").replace("\n", " "))


async def check_json_body(response: Any) -> None:
    """httpx response hook: a 2xx reply that is not a stream must have a JSON body."""
    if not (200 <= response.status_code < 300):
        return  # error statuses are classified by their status code
    ctype = (response.headers.get("content-type") or "").lower()
    if "text/event-stream" in ctype:
        return
    data = await response.aread()
    try:
        json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadResponse(
            f"the judge server answered HTTP {response.status_code} with a body that is not JSON "
            f"({len(data)} bytes, {type(e).__name__}: {e}; starts {_body_excerpt(data)!r})") from None


def add_body_check(http_client: Any) -> Any:
    """Add ``check_json_body`` to an httpx client's response hooks (once); returns the client."""
    hooks = http_client.event_hooks
    if check_json_body not in hooks.get("response", []):
        hooks = {**hooks, "response": [*hooks.get("response", []), check_json_body]}
        http_client.event_hooks = hooks
    return http_client


# -- servers -----------------------------------------------------------------------------
def base_url_of(settings: Any) -> str:
    return (getattr(settings, "judge_base_url", "") or OPENAI_BASE_URL).rstrip("/")


def is_local_url(url: str) -> bool:
    """True for loopback / private hosts (a llama.cpp or vLLM server you run yourself)."""
    host = (urlparse(url).hostname or "").lower()
    if host in ("localhost", "host.docker.internal") or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


def server_kind(url: str) -> str:
    """``openai`` (api.openai.com), ``local`` (loopback/private host) or ``other``."""
    host = (urlparse(url).hostname or "").lower()
    if host == "api.openai.com":
        return "openai"
    return "local" if is_local_url(url) else "other"


def default_mode(url: str) -> str:
    """TOOLS for local and unknown servers (llama.cpp accepts only TOOLS; vLLM constrains it),
    JSON_SCHEMA (structured outputs) for api.openai.com."""
    return "json_schema" if server_kind(url) == "openai" else "tools"


def mode_of(settings: Any) -> str:
    mode = (getattr(settings, "judge_mode", "") or default_mode(base_url_of(settings))).lower().replace("-", "_")
    if mode not in MODES:
        raise HarnessError(f"--judge-mode {mode!r} is not known. Fix: use one of {', '.join(MODES)}")
    return mode


def instructor_mode(mode: str):
    import instructor

    return {"tools": instructor.Mode.TOOLS, "json_schema": instructor.Mode.JSON_SCHEMA,
            "json": instructor.Mode.JSON, "md_json": instructor.Mode.MD_JSON}[mode]


def endpoint_id(url: str) -> str:
    """What identifies the server in a cache key: ``local`` for your own servers (the port may
    change between runs; the model name says what answers), else the base URL."""
    return "local" if server_kind(url) == "local" else url


def api_key(settings: Any) -> str:
    """The key from the environment variable named by ``judge_api_key_env``, read now."""
    var = getattr(settings, "judge_api_key_env", "") or "OPENAI_API_KEY"
    key = os.environ.get(var, "")
    if key:
        install_log_redaction()
        register_secret(key)  # scrubbed from every error text, record and log line from now on
        return key
    url = base_url_of(settings)
    if server_kind(url) == "local":
        return LOCAL_PLACEHOLDER_KEY
    shown = var if is_env_var_name(var) else "named by --judge-api-key-env (its value is not repeated: it may be a key)"
    raise HarnessError(
        f"the judge server {url} needs an API key, but the environment variable {shown} is not set. "
        f"Fix: export {var if is_env_var_name(var) else 'MY_JUDGE_KEY'}=... (or name another variable with "
        "--judge-api-key-env)")


_MODEL_CACHE: dict[str, str] = {}
_MODEL_LOCK = threading.Lock()


def list_server_models(url: str, key: str, timeout: float = 10.0) -> list[str]:
    import urllib.request

    req = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (the user's own server)
        data = json.loads(r.read().decode("utf-8"))
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]


def model_name(settings: Any) -> str:
    """``settings.judge_model``; else gpt-4.1-mini for api.openai.com; else the one model the server
    lists at ``/v1/models`` (``local`` if it lists none or cannot be asked). A server that lists
    several models is an error naming them: which one judges must be said with ``--judge-model``."""
    if getattr(settings, "judge_model", ""):
        return settings.judge_model
    url = base_url_of(settings)
    if server_kind(url) == "openai":
        return OPENAI_DEFAULT_MODEL
    with _MODEL_LOCK:
        if url not in _MODEL_CACHE:
            try:
                names = list_server_models(url, api_key(settings), timeout=min(10.0, float(settings.judge_timeout)))
            except HarnessError:
                raise
            except Exception as e:  # unreachable server: requests will fail and say so
                log.warning("could not list models at %s/models (%s); using the model name 'local'", url, type(e).__name__)
                return "local"
            if len(names) > 1:
                shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
                raise HarnessError(f"the judge server {url} hosts {len(names)} models ({shown}) and no judge model "
                                   f"was named. Fix: --judge-model NAME (e.g. --judge-model {names[0]})")
            _MODEL_CACHE[url] = names[0] if names else "local"
        return _MODEL_CACHE[url]


def async_client(settings: Any, *, http_client: Any = None, max_retries: int | None = None):
    """``openai.AsyncOpenAI`` for the judge server. The SDK does the retries: ``max_retries``
    (default ``settings.judge_retries``) for timeouts, connection errors, 408/409/429/5xx, with its
    exponential backoff and the server's ``Retry-After``. Its HTTP client (``http_client`` or openai's
    default) checks every 2xx body is JSON (``check_json_body``): a truncated or malformed reply is
    then a transport failure the SDK retries the same way, recorded as ``bad_response`` at the end.
    Every request and every backoff the SDK takes is counted in the current call's ``CallLog``."""
    import openai

    if http_client is None:
        http_client = openai.DefaultAsyncHttpxClient(timeout=float(settings.judge_timeout))
    add_body_check(http_client)
    hooks = http_client.event_hooks
    if count_request not in hooks.get("request", []):
        http_client.event_hooks = {**hooks, "request": [*hooks.get("request", []), count_request]}
    retries = max(0, int(settings.judge_retries if max_retries is None else max_retries))
    return _client_class()(base_url=base_url_of(settings), api_key=api_key(settings), max_retries=retries,
                           timeout=float(settings.judge_timeout), http_client=http_client)


# -- retries: the SDK's, observed --------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """How often one judge call may be repeated: ``retries`` transport retries (the openai SDK's
    ``max_retries``) and at most ``max_reasks`` re-asks after a reply that fails the verdict schema
    (instructor's validation loop, a ``tenacity`` policy: ``validation_retrying``)."""

    retries: int = 4
    max_reasks: int = 2

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        return cls(retries=max(0, int(settings.judge_retries)))


@dataclass
class CallLog:
    """What the SDK did for one judge call: HTTP requests sent, the transport attempts of the last
    SDK request (1 + the retries it took: the ``x-stainless-retry-count`` header the SDK sends) and
    the backoff before each retry."""

    requests: int = 0
    last_attempts: int = 0
    waited: list = field(default_factory=list)

    @property
    def attempts(self) -> int:
        """Transport attempts: what ``--judge-retries`` bounds (instructor's re-asks are separate calls)."""
        return max(1, self.last_attempts or self.requests)


#: the CallLog of the judge call running in this task (each item of ``gather_bounded`` is a task of its own)
_CALL: contextvars.ContextVar[CallLog | None] = contextvars.ContextVar("persona_harness_judge_call", default=None)


async def count_request(request: Any) -> None:
    """httpx request hook: one more HTTP request for the current call."""
    rec = _CALL.get()
    if rec is not None:
        rec.requests += 1
        try:
            rec.last_attempts = int(request.headers.get("x-stainless-retry-count", "")) + 1
        except ValueError:
            rec.last_attempts = 0  # no header: count every request


@functools.lru_cache(maxsize=1)
def _client_class():
    """``openai.AsyncOpenAI`` that also notes each backoff delay its retry loop picks (the SDK's own
    choice, Retry-After included) in the current ``CallLog``; it decides nothing itself."""
    import openai

    class JudgeClient(openai.AsyncOpenAI):
        def _calculate_retry_timeout(self, *args: Any, **kwargs: Any) -> float:
            delay = super()._calculate_retry_timeout(*args, **kwargs)
            rec = _CALL.get()
            if rec is not None:
                rec.waited.append(round(float(delay), 3))
            return delay

    return JudgeClient


def validation_retrying(max_reasks: int):
    """A fresh ``tenacity.AsyncRetrying`` for instructor's ``max_retries``: re-ask (with the validation
    error in the conversation, as instructor does) at most ``max_reasks`` times, and only after a reply
    that fails the schema. Transport errors are not re-asked: the SDK has already retried them."""
    import tenacity
    from instructor.core.exceptions import AsyncValidationError, ResponseParsingError
    from pydantic import ValidationError

    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max(0, int(max_reasks)) + 1),
        retry=tenacity.retry_if_exception_type((ValidationError, json.JSONDecodeError, AsyncValidationError,
                                                ResponseParsingError)),
        reraise=True)


def _chain(exc: BaseException):
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


#: statuses a rerun may get another answer for (not cached); the SDK retries 408, 409, 429 and >= 500
TRANSIENT_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403}  # a wrong key fails every item: stop the run with a clear message


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    try:
        return max(0.0, float(headers.get("retry-after"))) if headers is not None else None
    except (TypeError, ValueError):
        return None


def classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """(reason, transient, the server's Retry-After seconds when it sent a number) for an exception
    a judge call ended with; transient reasons are not cached, so a rerun asks again."""
    import asyncio

    import openai

    chain = list(_chain(exc))
    for e in chain:  # before APIConnectionError, which wraps it
        if isinstance(e, BadResponse):
            return "bad_response", True, None
    for e in chain:
        if isinstance(e, Unscored):
            return e.reason, False, None
        if isinstance(e, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
            return "timeout", True, None
        if isinstance(e, openai.APIStatusError):
            return f"http_{e.status_code}", e.status_code in TRANSIENT_STATUS or e.status_code >= 500, _retry_after(e)
        if isinstance(e, openai.APIConnectionError):
            return "connection_error", True, None
    try:
        from instructor.core.exceptions import IncompleteOutputException, InstructorRetryException

        for e in _chain(exc):
            if isinstance(e, (InstructorRetryException, IncompleteOutputException)):
                return "invalid_output", False, None
    except ImportError:  # pragma: no cover
        pass
    from pydantic import ValidationError

    for e in _chain(exc):
        if isinstance(e, (ValidationError, json.JSONDecodeError)):
            return "invalid_output", False, None
    return "error", False, None


@dataclass
class Outcome:
    value: Any = None
    reason: str | None = None
    detail: dict | None = None
    attempts: int = 0


async def call_with_retries(fn: Callable[[], Awaitable[T]], policy: RetryPolicy | None = None) -> Outcome:
    """Run one judge call, whose retries happen inside the SDK (and instructor's re-asks), and turn
    its end into an ``Outcome``: the value, or the unscored reason with ``detail`` (``attempts`` =
    the transport attempts, ``waited`` = the SDK's backoff delays, ``transient``, ``error``). Never raises
    for a judge failure, only for a fatal 401/403, which names the key variable. ``policy`` is what
    the client was built with (``async_client``'s ``max_retries``); it is not applied a second time."""
    import openai

    rec = CallLog()
    token = _CALL.set(rec)
    try:
        try:
            value = await fn()
        except Unscored as u:
            n = rec.attempts
            return Outcome(reason=u.reason, detail={**u.detail, "attempts": n, **_waited(rec)}, attempts=n)
        except Exception as e:  # noqa: BLE001 - every failure becomes a reason
            for c in _chain(e):
                if isinstance(c, openai.APIStatusError) and c.status_code in FATAL_STATUS:
                    raise HarnessError(
                        f"the judge server refused the request with HTTP {c.status_code}. Fix: check the API key "
                        "in the variable named by --judge-api-key-env (default OPENAI_API_KEY) and --judge-base-url"
                    ) from None
            reason, transient, _ = classify(e)
            shown = next((c for c in _chain(e) if isinstance(c, BadResponse)), e)
            msg = redact(str(shown).splitlines()[0])[:300] if str(shown) else type(shown).__name__
            n = rec.attempts
            d: dict = {"attempts": n, "error": msg, **_waited(rec)}
            if transient:
                d["transient"] = True
            log.info("judge call unscored after %d request(s): %s", n, reason)
            return Outcome(reason=reason, detail=d, attempts=n)
        return Outcome(value=value, attempts=rec.attempts, detail=_waited(rec))
    finally:
        _CALL.reset(token)


def _waited(rec: CallLog) -> dict:
    return {"waited": list(rec.waited)} if rec.waited else {}


async def gather_bounded(fns: Sequence[Callable[[], Awaitable[T]]], concurrency: int) -> list[T]:
    """Run the coroutine factories with at most ``concurrency`` in flight; results in order."""
    import asyncio

    sem = asyncio.Semaphore(max(1, int(concurrency)))

    async def one(f):
        async with sem:
            return await f()

    return list(await asyncio.gather(*(one(f) for f in fns)))


def run_sync(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also when a loop already runs (notebooks)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    box: dict[str, Any] = {}

    def target():
        try:
            box["v"] = asyncio.run(coro_factory())
        except BaseException as e:  # noqa: BLE001
            box["e"] = e

    t = threading.Thread(target=target, name="persona-harness-judge")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]
