"""Shared machinery for judges that call an OpenAI-compatible server.

* Client construction: ``openai.AsyncOpenAI(base_url=..., api_key=...)`` (optionally wrapped by
  ``instructor.from_openai``). The API key is read from the environment variable named by
  ``settings.judge_api_key_env`` at call time; it is never stored on the judge, in records, in the
  cache key, in run.json or in log messages.
* Bounded concurrency: ``asyncio.Semaphore(settings.judge_concurrency)``.
* Timeouts (``settings.judge_timeout`` seconds per HTTP request) and retries
  (``settings.judge_retries``) with exponential backoff and jitter that honour ``Retry-After``
  (seconds or an HTTP date). After the last retry the item is unscored with a reason:
  ``timeout``, ``http_<status>``, ``connection_error``, ``bad_response`` (a 2xx reply whose body is
  not JSON: truncated or malformed at the HTTP layer), ``invalid_output`` (a well-formed reply that
  fails the verdict schema) or whatever a judge's own ``Unscored`` says (``refusal``, ``low_mass``,
  ``out_of_range``, ...).
* Transport-level body check: every client made by ``async_client`` gets an httpx response hook
  (``check_json_body``) that reads each 2xx reply and raises ``BadResponse`` when its body does not
  parse as JSON, before openai or instructor try to parse it. So a cut or garbled reply is retried
  by ``call_with_retries`` (with backoff, counted in ``detail["attempts"]``) instead of being
  re-asked by instructor's validation loop or recorded as ``invalid_output``.

Judges stay synchronous to the pipeline: ``run_sync(coro)`` runs an event loop inside ``judge()``.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
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
    """``settings.judge_model``; else gpt-4.1-mini for api.openai.com; else the first model the
    server lists at ``/v1/models`` (``local`` if it lists none or cannot be asked)."""
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
            _MODEL_CACHE[url] = names[0] if names else "local"
        return _MODEL_CACHE[url]


def async_client(settings: Any, *, http_client: Any = None):
    """``openai.AsyncOpenAI`` for the judge server; its own retries are off (ours honour Retry-After).
    Its HTTP client (``http_client`` or openai's default) checks every 2xx body is JSON
    (``check_json_body``), so truncated or malformed replies become the retryable ``bad_response``."""
    import openai

    if http_client is None:
        http_client = openai.DefaultAsyncHttpxClient(timeout=float(settings.judge_timeout))
    add_body_check(http_client)
    return openai.AsyncOpenAI(base_url=base_url_of(settings), api_key=api_key(settings), max_retries=0,
                              timeout=float(settings.judge_timeout), http_client=http_client)


# -- retries -----------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    retries: int = 4  # attempts = retries + 1
    base: float = 1.0  # first backoff, seconds
    factor: float = 2.0
    max_delay: float = 30.0
    max_retry_after: float = 300.0  # cap on a server's Retry-After
    jitter: float = 0.25  # +- fraction of the backoff

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        return cls(retries=max(0, int(settings.judge_retries)))

    def backoff(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (0-based). Retry-After wins when the server sends it."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        d = min(self.base * self.factor ** attempt, self.max_delay)
        r = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, d * (1.0 + r))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - (time.time() if now is None else now))


def retry_after_of(exc: BaseException) -> float | None:
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _chain(exc: BaseException):
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403}  # a wrong key fails every item: stop the run with a clear message


def classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """(reason, retryable, retry_after seconds) for an exception raised by a judge call."""
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
            return f"http_{e.status_code}", e.status_code in RETRYABLE_STATUS or e.status_code >= 500, retry_after_of(e)
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


async def call_with_retries(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, *,
                            sleep: Callable[[float], Awaitable[Any]] | None = None,
                            rng: random.Random | None = None) -> Outcome:
    """Call ``fn`` until it succeeds or the retries run out; never raises for a judge failure
    (only for a fatal 401/403, which names the key variable)."""
    import asyncio

    import openai

    sleep = sleep or asyncio.sleep
    waited: list[float] = []
    for attempt in range(policy.retries + 1):
        try:
            return Outcome(value=await fn(), attempts=attempt + 1, detail={"waited": waited} if waited else {})
        except Unscored as u:
            return Outcome(reason=u.reason, detail={**u.detail, "attempts": attempt + 1}, attempts=attempt + 1)
        except Exception as e:  # noqa: BLE001 - every failure becomes a reason or a retry
            for c in _chain(e):
                if isinstance(c, openai.APIStatusError) and c.status_code in FATAL_STATUS:
                    raise HarnessError(
                        f"the judge server refused the request with HTTP {c.status_code}. Fix: check the API key "
                        "in the variable named by --judge-api-key-env (default OPENAI_API_KEY) and --judge-base-url"
                    ) from None
            reason, retryable, retry_after = classify(e)
            shown = next((c for c in _chain(e) if isinstance(c, BadResponse)), e)
            msg = redact(str(shown).splitlines()[0])[:300] if str(shown) else type(shown).__name__
            if not retryable or attempt == policy.retries:
                d: dict = {"attempts": attempt + 1, "error": msg}
                if waited:
                    d["waited"] = waited
                if reason in TRANSIENT_REASONS or (reason.startswith("http_") and retryable):
                    d["transient"] = True
                return Outcome(reason=reason, detail=d, attempts=attempt + 1)
            delay = policy.backoff(attempt, retry_after, rng)
            log.info("judge call failed (%s); retry %d of %d in %.2fs", reason, attempt + 1, policy.retries, delay)
            waited.append(round(delay, 3))
            await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


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
