"""Secrets out of text: the judge API key and credential headers scrubbed before anything is shown or written.

``redact(text)`` replaces every registered secret (the judge API key, registered by the judging
transport when it reads the key) in its plain, URL-quoted, JSON-escaped and base64 forms, and the
value of any ``Authorization`` / ``Proxy-Authorization`` / ``api-key`` / ``x-api-key`` header or
``Bearer`` token, whatever the key. ``redact_obj`` does the same for every string inside a record.
``install_log_redaction()`` makes every log record (message, arguments and traceback text) pass
through ``redact`` before any handler formats it.

``is_env_var_name(name)`` is the rule for a value that claims to be the NAME of an environment
variable: it may be echoed in a message only when it looks like one, so a key typed where the
name belongs is never repeated back.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.parse
from typing import Any

REDACTED = "[REDACTED]"
#: shorter values are not treated as secrets (a local server's placeholder key, empty strings)
MIN_SECRET_LEN = 8

_secrets: set[str] = set()
_lock = threading.Lock()
_pattern: re.Pattern | None = None

# header-style credentials, as they appear in HTTP dumps, JSON echoes and reprs of header dicts
_HEADER = re.compile(
    r"""(?ix)
    (?P<name>\b(?:proxy-)?authorization|\bx-api-key|\bapi[-_]key|\bopenai[-_]api[-_]key)
    (?P<sep>["']?\s*[:=]\s*["']?|["']?\s*,\s*["'])       # name: value / "name": "value" / ('name', 'value')
    (?P<value>(?:bearer\s+|basic\s+|token\s+)?[^\s"',;}\]\)]+)
    """)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")


def _forms(secret: str) -> set[str]:
    out = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
           json.dumps(secret)[1:-1], base64.b64encode(secret.encode("utf-8", "surrogatepass")).decode("ascii")}
    return {f for f in out if len(f) >= MIN_SECRET_LEN}


def register_secret(value: str | None) -> None:
    """Remember ``value`` (e.g. the API key just read from the environment) as a secret to scrub."""
    global _pattern
    if not value or len(value) < MIN_SECRET_LEN:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        forms = sorted({f for s in _secrets for f in _forms(s)}, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(f) for f in forms))


def redact(text: Any) -> str:
    """``text`` as a string with every secret and credential header value replaced by ``[REDACTED]``."""
    s = text if isinstance(text, str) else str(text)
    pat = _pattern
    if pat is not None:
        s = pat.sub(REDACTED, s)
    s = _HEADER.sub(lambda m: m.group("name") + m.group("sep") + REDACTED, s)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", s)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like record with every string (keys included) passed through ``redact``."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def is_env_var_name(name: str) -> bool:
    """True for a conventional environment variable name (``OPENAI_API_KEY``, ``MY_JUDGE_KEY``): upper
    case letters, digits and ``_``, at most 64 characters, and not a long run without ``_`` that holds
    digits (the shape of an access key such as ``AKIA...``)."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        return False
    return not (len(name) >= 16 and "_" not in name and any(c.isdigit() for c in name))


_installed = False


def install_log_redaction() -> None:
    """Pass every log record through ``redact`` when it is created (idempotent). Message and
    arguments are merged into the redacted message; exception text is formatted and redacted now,
    so no handler or formatter ever sees the raw values."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the logging module's to report
            return record
        record.msg, record.args = redact(msg), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)
