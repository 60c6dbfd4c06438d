"""Secrets are redacted everywhere: error bodies, exception text, log lines, records.

The end-to-end tests run a real ``persona-harness run`` subprocess whose judge is a real listener on
127.0.0.1 (tests/echo_server.py) that echoes every request header -- the Authorization header with
the key -- in its 500, 400 and 401 bodies and in a response header, with every library logging at
DEBUG. The key was really sent (the listener saw it); it must then be in no byte of stderr, stdout
or any file the run wrote (run folder, cache), in plain, base64, URL-encoded or partial form.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from echo_server import EchoServer
from reliability_run import write_trait

HERE = Path(__file__).parent
SECRET = "sk-redact-PH-4c1d9e0b77aa41f2-NEVER-PRINT"
KEY_VAR = "PH_REDACT_TEST_KEY"


def forms(secret: str) -> list[str]:
    return [secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe=""),
            secret[7:28]]


def assert_clean(text: str, where: str) -> None:
    for f in forms(SECRET):
        assert f not in text, f"the API key leaked into {where}"


def assert_no_file_holds_it(root: Path) -> int:
    n = 0
    for f in root.rglob("*"):
        if f.is_file():
            n += 1
            data = f.read_bytes()
            for form in forms(SECRET):
                assert form.encode() not in data, f"the API key leaked into {f}"
    return n


# -- unit ----------------------------------------------------------------------------------------
def test_redact_scrubs_registered_secrets_and_credential_headers():
    from harness.core.redact import REDACTED, redact, redact_obj, register_secret

    register_secret(SECRET)
    register_secret("short")  # too short to be treated as a secret: never blanks ordinary words
    texts = [
        f"Error code: 401 - {{'error': {{'message': 'Authorization: Bearer {SECRET}'}}}}",
        json.dumps({"headers": {"authorization": f"Bearer {SECRET}", "api-key": "zzzzzzzzzzzzzzzz"}}),
        f"('authorization', 'Bearer {SECRET}')",
        f"url https://x/?key={urllib.parse.quote(SECRET, safe='')}",
        f"b64 {base64.b64encode(SECRET.encode()).decode()}",
        "x-api-key: other-secret-value-123456",
        "Proxy-Authorization: Basic dXNlcjpwYXNz",
        "OPENAI_API_KEY=sk-something-else-entirely",
    ]
    for t in texts:
        r = redact(t)
        assert REDACTED in r and SECRET not in r, (t, r)
        assert "zzzzzzzzzzzzzzzz" not in r and "other-secret-value" not in r and "dXNlcjpwYXNz" not in r
        assert "sk-something-else" not in r
    assert redact("a short note about the judge_api_key_env setting") == \
        "a short note about the judge_api_key_env setting"
    rec = redact_obj({"detail": {"error": f"Bearer {SECRET}", "n": 3, "list": [f"k={SECRET}"]}})
    assert SECRET not in json.dumps(rec) and rec["detail"]["n"] == 3


def test_log_records_are_redacted_before_any_handler_sees_them():
    import io

    from harness.core.redact import install_log_redaction, register_secret

    register_secret(SECRET)
    install_log_redaction()
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("ph.redact.test")
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    try:
        log.debug("request headers %s", {"Authorization": f"Bearer {SECRET}"})
        try:
            raise RuntimeError(f"server said: {SECRET}")
        except RuntimeError:
            log.exception("judge failed")
    finally:
        log.removeHandler(h)
    text = buf.getvalue()
    assert "request headers" in text and "judge failed" in text and "RuntimeError" in text
    assert_clean(text, "a log line")


@pytest.mark.parametrize("name", ["sk1234567890abcdefABCDEF", "abcdef0123456789abcdef0123456789",
                                  "AKIAIOSFODNN7EXAMPLE", "sk-proj-abc_def", "key with spaces", "x" * 80])
def test_a_key_passed_as_the_variable_name_is_never_echoed(name, tmp_path):
    from harness.core.config import load_settings
    from harness.core.errors import ConfigError, HarnessError
    from harness.core.config import Settings
    from harness.judging.transport import api_key

    with pytest.raises(ConfigError) as ei:
        load_settings({"judge_api_key_env": name}, cwd=tmp_path, environ={})
    msg = str(ei.value)
    assert name not in msg and name[4:16] not in msg and "NAME of an environment variable" in msg
    assert "--judge-api-key-env" in msg and len(msg.splitlines()) == 1
    with pytest.raises(ConfigError) as ei:
        load_settings(environ={"PERSONA_HARNESS_JUDGE_API_KEY_ENV": name}, cwd=tmp_path)
    assert name not in str(ei.value) and "PERSONA_HARNESS_JUDGE_API_KEY_ENV" in str(ei.value)
    # built directly (no load_settings), the transport's "not set" message does not echo it either
    with pytest.raises(HarnessError) as ei:
        api_key(Settings(judge_base_url="https://judge.example.com/v1", judge_api_key_env=name))
    assert name not in str(ei.value)


def test_conventional_variable_names_are_accepted_and_named(tmp_path, monkeypatch):
    from harness.core.config import Settings, load_settings
    from harness.core.errors import HarnessError
    from harness.judging.transport import api_key

    for name in ("OPENAI_API_KEY", "MY_JUDGE_KEY", "JUDGE2_KEY", "K"):
        assert load_settings({"judge_api_key_env": name}, cwd=tmp_path, environ={}).judge_api_key_env == name
    # an unconventional name that really is set in the environment is accepted too
    s = load_settings({"judge_api_key_env": "my_lower_key"}, cwd=tmp_path, environ={"my_lower_key": "v"})
    assert s.judge_api_key_env == "my_lower_key"
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(HarnessError, match="MY_JUDGE_KEY is not set"):
        api_key(Settings(judge_base_url="https://judge.example.com/v1", judge_api_key_env="MY_JUDGE_KEY"))


# -- end to end ----------------------------------------------------------------------------------
def _run(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    traits = write_trait(tmp_path, pairs=1, questions=1)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_HARNESS_")}
    env.update({KEY_VAR: SECRET, "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1", "OPENAI_LOG": "debug"})
    code = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); "
            "from harness.cli import main; sys.exit(main())")
    argv = [sys.executable, "-c", code, "run", "--trait", "mini", "--model", "tiny", "--plugin", "kill_plugin",
            "--traits-dir", str(traits), "--out", str(work / "run"), "--cache-dir", str(work / "cache"),
            "--judge", "logprob", "--judge-base-url", url, "--judge-api-key-env", KEY_VAR, "--judge-model", "m",
            "--trait-threshold", "0", "--coherence-threshold", "0", "--max-new-tokens", "3", "--judge-retries", "0",
            "--no-progress", *extra]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def test_echoed_key_in_500_and_400_bodies_reaches_no_output_record_or_cache(tmp_path):
    """500 (transient: unscored, recorded in judgments.jsonl) and 400 (cached) bodies hold the key."""
    with EchoServer(status=lambda n, req: 500 if n % 2 == 0 else 400) as srv:
        p = _run(tmp_path, srv.url)
    assert srv.requests and all(r["authorization"] == f"Bearer {SECRET}" for r in srv.requests)
    assert p.returncode in (0, 1), p.stderr[-3000:]  # 1: no effective pairs (every item unscored)
    assert "DEBUG" in p.stderr  # logging really was on
    assert_clean(p.stdout, "stdout")
    assert_clean(p.stderr, "stderr")
    work = tmp_path / "work"
    assert assert_no_file_holds_it(work) >= 3
    judgments = [json.loads(ln) for ln in (work / "run" / "judgments.jsonl").read_text().splitlines()]
    reasons = {j["reason"] for j in judgments}
    assert {"http_500", "http_400"} <= reasons
    errors = [j["detail"]["error"] for j in judgments if j["detail"].get("error")]
    assert errors and all("[REDACTED]" in e for e in errors)  # the body is kept, the key is not


def test_echoed_key_in_a_401_body_reaches_no_output(tmp_path):
    with EchoServer(status=401) as srv:
        p = _run(tmp_path, srv.url)
    assert srv.requests and srv.requests[-1]["authorization"] == f"Bearer {SECRET}"
    assert p.returncode == 1 and "refused the request with HTTP 401" in p.stderr
    assert_clean(p.stdout, "stdout")
    assert_clean(p.stderr, "stderr")
    assert_no_file_holds_it(tmp_path / "work")
