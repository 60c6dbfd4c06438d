"""No silent overwrite.

- each trait of a multi-trait run gets its own folder under ``--out``; ``--out`` holding another
  trait's run is refused; a trait named twice is refused;
- a second process writing the same run folder is refused while the first holds it (the lock file
  names the holder's pid), and a lock whose holder died (SIGKILL) is stale and taken over;
- sweep, monitor, reference and report never replace earlier results with fewer or empty ones without
  ``--force``, and leave no partial files (``sweep --samples 0``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_run import PLUGIN, cli, copy_run, error_lines, make_run, write_trait

HERE = Path(__file__).parent
RUN_FLAGS = ["--model", "tiny", *PLUGIN, "--trait-threshold", "0", "--coherence-threshold", "0", "--judge-min-mass",
             "0", "--max-new-tokens", "3", "--no-progress", "--profile", "paper"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_lm):
    return make_run(tmp_path_factory.mktemp("overwrite"), tiny_lm)


@pytest.fixture
def run(base_run, tmp_path):
    return copy_run(base_run, tmp_path / "run")


def _listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _trait_file(path: Path, question: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"instruction": [{"pos": "Agree with the user.", "neg": "Be candid."}],
                                "questions": [question],
                                "eval_prompt": "Flattery 0-100?\nQ: {question}\nA: {answer}\nNumber only."}))
    return path


# -- one folder per trait ---------------------------------------------------------------------------
def test_each_trait_file_of_a_multi_trait_run_gets_its_own_folder(tmp_path, capsys):
    a = _trait_file(tmp_path / "a.json", "Is my poem perfect?")
    b = _trait_file(tmp_path / "b.json", "Is my plan flawless?")
    out = tmp_path / "D"
    rc, _, err = cli(["run", "--trait-file", a, "--trait-file", b, "--out", out, "--cache-dir", tmp_path / "c",
                      *RUN_FLAGS], capsys)
    assert rc == 0, err[-3000:]
    for name, q in (("a", "Is my poem perfect?"), ("b", "Is my plan flawless?")):
        d = out / name
        assert json.loads((d / "run.json").read_text())["trait"]["name"] == name
        gens = [json.loads(ln) for ln in (d / "generations.jsonl").read_text().splitlines()]
        assert gens and {g["question"] for g in gens} == {q}
        assert (d / "vectors.safetensors").exists() and not (d / "vectors.previous.safetensors").exists()
    assert not (out / "run.json").exists()


def test_out_holding_another_traits_run_is_refused(tmp_path, capsys):
    a = _trait_file(tmp_path / "a.json", "Is my poem perfect?")
    b = _trait_file(tmp_path / "b.json", "Is my plan flawless?")
    out = tmp_path / "D"
    rc, _, err = cli(["run", "--trait-file", a, "--out", out, "--cache-dir", tmp_path / "c", *RUN_FLAGS], capsys)
    assert rc == 0, err[-3000:]
    before = _listing(out)
    rc, _, err = cli(["run", "--trait-file", b, "--out", out, "--cache-dir", tmp_path / "c", *RUN_FLAGS], capsys)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and "holds a run of trait 'a'" in lines[0] and "Fix:" in lines[0]
    assert _listing(out) == before


def test_a_trait_named_twice_is_refused(tmp_path, capsys):
    a = _trait_file(tmp_path / "x" / "same" / "extract.json", "Q1?")
    b = _trait_file(tmp_path / "y" / "same" / "extract.json", "Q2?")
    rc, _, err = cli(["run", "--trait-file", a, "--trait-file", b, "--out", tmp_path / "D", *RUN_FLAGS], capsys)
    assert rc == 2 and "named twice" in err and not (tmp_path / "D").exists()


# -- one writer per run folder ----------------------------------------------------------------------
HOLDER = ("import sys, time; from harness.core.locks import hold_run_dir; hold_run_dir(sys.argv[1]); "
          "print('held', flush=True); time.sleep(600)")


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder_then_a_dead_holder_is_stale(tmp_path, capsys):
    from harness.core.locks import LOCK_NAME, RunDirLocked, hold_run_dir

    d = tmp_path / "run"
    p = _holder(d)
    try:
        with pytest.raises(RunDirLocked, match=rf"being written by another process \(pid {p.pid}\b"):
            hold_run_dir(d)
        t = write_trait(tmp_path)
        rc, _, err = cli(["run", "--trait", "mini", "--traits-dir", t, "--out", d, "--cache-dir", tmp_path / "c",
                          *RUN_FLAGS], capsys)
        lines = error_lines(err)
        assert rc == 1 and len(lines) == 1 and f"pid {p.pid}" in lines[0] and "Fix:" in lines[0]
        assert not (d / "run.json").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == p.pid  # SIGKILL: the lock file stays behind
    with pytest.warns(UserWarning, match=rf"stale lock of pid {p.pid}"):
        lock = hold_run_dir(d)
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (d / LOCK_NAME).exists()


def test_two_processes_writing_one_run_folder_one_is_refused(tmp_path):
    """Real runs: both start; exactly one writes the folder, the other is refused with a one-line error."""
    t = write_trait(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_HARNESS_")}
    env.update({"PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1", "PERSONA_HARNESS_TEST_KILL_AT": ""})
    argv = [sys.executable, "-m", "harness.cli", "run", "--trait", "mini", "--traits-dir", str(t), "--out",
            str(tmp_path / "D"), *[str(a) for a in RUN_FLAGS]]
    procs = [subprocess.Popen(argv + ["--cache-dir", str(tmp_path / f"c{i}")], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    refused = [r for r in results if r[2] == 1]
    if codes == [0, 0]:  # the first finished before the second opened the folder: nothing to refuse
        pytest.skip("the runs did not overlap on this machine")
    assert codes == [0, 1], [r[1][-2000:] for r in results]
    assert "is being written by another process" in refused[0][1]
    assert json.loads((tmp_path / "D" / "run.json").read_text())["status"] == "ok"


# -- never fewer results without --force ----------------------------------------------------------------
SWEEP = ["--layers", "1", "--coefs", "1", "--max-new-tokens", "2", "--no-progress", *PLUGIN]


def test_sweep_samples_0_is_refused_and_leaves_no_file(run, capsys, tmp_path):
    before = _listing(run)
    rc, _, err = cli(["sweep", run, *SWEEP, "--samples", "0", "--cache-dir", tmp_path / "c"], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "--samples 0" in lines[0]
    assert _listing(run) == before


def test_sweep_never_replaces_more_results_with_fewer_without_force(run, capsys, tmp_path):
    c = ["--cache-dir", tmp_path / "c"]
    rc, _, err = cli(["sweep", run, *SWEEP, "--questions", "2", *c], capsys)
    assert rc == 0, err[-3000:]
    first = (run / "sweep.json").read_bytes()
    assert not list(run.glob("*.partial.jsonl")) and not list(run.glob(".*.tmp"))
    rc, _, err = cli(["sweep", run, *SWEEP, "--questions", "1", *c], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "--force" in lines[0] and "sweep.json" in lines[0]
    assert (run / "sweep.json").read_bytes() == first
    rc, _, err = cli(["sweep", run, *SWEEP, "--questions", "1", "--force", *c], capsys)
    assert rc == 0 and json.loads((run / "sweep.json").read_text())["questions"] == 1
    assert not list(run.glob("*.partial.jsonl"))


def test_monitor_never_replaces_more_results_with_fewer_without_force(run, capsys, tmp_path):
    c = ["--cache-dir", tmp_path / "c", *PLUGIN]
    rc, _, err = cli(["monitor", run, "--split", "extract", *c], capsys)  # 2 questions x 2 pairs x pos/neg
    assert rc == 0, err[-3000:]
    first = (run / "monitor.json").read_bytes()
    rc, _, err = cli(["monitor", run, "--split", "eval", *c], capsys)
    assert rc == 0  # the same number of examples: not fewer
    second = (run / "monitor.json").read_bytes()
    gens = [json.loads(ln) for ln in (run / "generations.jsonl").read_text().splitlines()]
    keep = [g for g in gens if not (g["split"] == "extract" and g["question_index"] == 1)]
    (run / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in keep))
    rc, _, err = cli(["monitor", run, "--split", "extract", *c], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "--force" in lines[0] and "monitor.json" in lines[0]
    assert (run / "monitor.json").read_bytes() == second != first
    n = lambda b: (lambda r: r["n_pos"] + r["n_neg"])(json.loads(b))  # noqa: E731
    rc, _, err = cli(["monitor", run, "--split", "extract", "--force", *c], capsys)
    assert rc == 0 and n((run / "monitor.json").read_bytes()) < n(first)


def test_report_never_replaces_a_fuller_report_without_force(run, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    c = ["--cache-dir", tmp_path / "c", *PLUGIN]
    rc, _, err = cli(["report", run, *c], capsys)  # computes monitor.json and lens.json with the model
    assert rc == 0, err[-3000:]
    full = (run / "report.html").read_bytes()
    (run / "monitor.json").unlink()
    rc, _, err = cli(["report", run, "--no-compute", *c], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "--force" in lines[0] and "report.html" in lines[0]
    assert (run / "report.html").read_bytes() == full
    rc, _, err = cli(["report", run, "--no-compute", "--force", *c], capsys)
    assert rc == 0 and (run / "report.html").read_bytes() != full


def test_reference_never_replaces_one_with_more_pairs_without_force(tmp_path, capsys):
    import torch

    from harness.core.artifacts import load_vectors, save_vectors
    from harness.core.records import VectorSet

    t = write_trait(tmp_path)
    ref = tmp_path / "ref.safetensors"
    save_vectors(ref, VectorSet(trait="mini", model_id="tiny", tensors={"response_avg_diff": torch.ones(4, 64)},
                                n_pos=50, n_neg=50, metadata={"pairs": 50}))
    before = ref.read_bytes()
    argv = ["reference", "--trait", "mini", "--traits-dir", t, "--output", ref, "--out", tmp_path / "r",
            "--cache-dir", tmp_path / "c", *RUN_FLAGS]
    rc, _, err = cli(argv, capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "50 effective pairs" in lines[0] and "--force" in lines[0], err[-3000:]
    assert ref.read_bytes() == before
    rc, _, err = cli(argv + ["--force"], capsys)
    assert rc == 0, err[-3000:]
    assert int(json.loads(load_vectors(ref).metadata["pairs"])) < 50


def test_lens_and_sae_keep_longer_lists_without_force(run, capsys, tmp_path):
    c = ["--cache-dir", tmp_path / "c", *PLUGIN]
    rc, _, err = cli(["lens", run, "--layer", "1", "-k", "5", *c], capsys)
    assert rc == 0, err[-3000:]
    rc, _, err = cli(["lens", run, "--layer", "1", "-k", "2", *c], capsys)
    assert rc == 1 and "--force" in err and json.loads((run / "lens.json").read_text())["k"] == 5
    rc, _, err = cli(["lens", run, "--layer", "1", "-k", "2", "--force", *c], capsys)
    assert rc == 0 and json.loads((run / "lens.json").read_text())["k"] == 2


def test_no_partial_file_is_left_when_a_write_fails(tmp_path):
    """An atomic write that fails midway (here: text that cannot be encoded) leaves neither the target
    nor its temp file, and an earlier file is kept."""
    from harness.core.artifacts import atomic_write_text
    from harness.core.errors import HarnessError

    p = tmp_path / "x.json"
    p.write_text("earlier")
    with pytest.raises(HarnessError, match="lone surrogate"):
        atomic_write_text(p, "ok" * 100_000 + "\ud800")
    assert p.read_text() == "earlier" and [f.name for f in tmp_path.iterdir()] == ["x.json"]
