"""A real OpenAI-compatible server for judge tests: llama-cpp-python serving the embedded GGUF.

``llama_server`` (session scope) starts ``python -m llama_cpp.server`` on 127.0.0.1 at a free
port, waits for ``/v1/models``, yields the base URL ``http://127.0.0.1:PORT/v1`` and stops the
process at the end of the session. When llama-cpp-python[server] (or the embedded GGUF) is missing
it skips, saying why -- unless ``PERSONA_HARNESS_REQUIRE_SERVER=1`` is set (``.ci/run`` sets it, and
``scripts/setup.sh`` installs and checks the server), in which case it fails: CI never silently skips
the real-server tests. A server that is installed but does not start always fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")
START_TIMEOUT_S = float(os.environ.get("PERSONA_HARNESS_TEST_SERVER_START_S", "180"))
REQUIRE_ENV = "PERSONA_HARNESS_REQUIRE_SERVER"


def server_required() -> bool:
    """True when the real-server tests must run (CI): ``PERSONA_HARNESS_REQUIRE_SERVER`` is set and not 0."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def server_unavailable(reason: str) -> None:
    """Skip (local development) or fail (``PERSONA_HARNESS_REQUIRE_SERVER=1``, i.e. CI) with ``reason``."""
    if server_required():
        pytest.fail(f"{reason}. {REQUIRE_ENV}=1 is set, so the real-server tests must run instead of skipping "
                    "(run scripts/setup.sh, which installs and checks llama-cpp-python[server])", pytrace=False)
    pytest.skip(f"{reason} (set {REQUIRE_ENV}=1 to make this an error, as .ci/run does)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_server_modules() -> list[str]:
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def _models(url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(url + "/models", timeout=5) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]
    except Exception:  # noqa: BLE001 - not up yet
        return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGTERM when pytest dies (even by SIGKILL), so none is left behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the fixture's teardown still stops it
        pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """Base URL of a running llama.cpp server (llama-cpp-python) serving the embedded model."""
    missing = _missing_server_modules()
    if missing:
        server_unavailable(f"llama-cpp-python[server] is not installed (missing: {', '.join(missing)}); "
                           "install it with: pip install 'llama-cpp-python[server]' (scripts/setup.sh does)")
    from harness.core.errors import HarnessError
    from harness.models.loading import embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except HarnessError as e:
        server_unavailable(f"the embedded model's GGUF is not available: {e}")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    # one thread: ggml's spinning thread team degrades badly when the CPU is shared (CI, pytest -n)
    threads = os.environ.get("PERSONA_HARNESS_TEST_SERVER_THREADS", "1")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", threads]
    url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode} before answering; log:\n{_tail(log_path)}")
            if _models(url):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer {url}/models within {START_TIMEOUT_S:.0f}s; "
                            f"log:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@pytest.fixture(scope="session")
def llama_server_model(llama_server) -> str:
    """The model name the server lists first (what the judges request by default)."""
    names = _models(llama_server)
    assert names, "the server answered /v1/models earlier"
    return names[0]
