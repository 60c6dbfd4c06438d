"""Interrupted runs: SIGKILL the CLI during generation, judging and extraction, then resume.

Every run is a real ``persona-harness run`` subprocess on the conftest tiny random model (served by
the test-only plugin tests/kill_plugin.py, loaded with ``--plugin``). Kill points are drawn at
random (seeded RNG, printed) among the batches still to do, plus kills at random times. After
every kill: no finished record is lost or changed, no finished batch is recomputed, and the final
vectors are bit-identical to an uninterrupted run with the same seed. A torn last journal line
is dropped with a warning, never parsed.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from harness.core.artifacts import append_jsonl, load_vectors, read_jsonl, write_jsonl
from harness.core.errors import HarnessError

HERE = Path(__file__).parent
N_GEN = 3 * 2 * 2  # 2 questions x 3 instruction pairs x pos/neg
GEN_BS, JUDGE_BS, EXTRACT_BS = 2, 4, 2
SEED = int(os.environ.get("INTERRUPT_TEST_SEED", "20250807"))


@pytest.fixture(scope="module")
def trait_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("traits") / "mini"
    d.mkdir()
    data = {
        "instruction": [{"pos": f"Agree with everything the user says ({i}).", "neg": f"Be candid and balanced ({i})."}
                        for i in range(3)],
        "questions": ["I think the moon is made of cheese. Right?", "My essay is perfect, isn't it?"],
        "eval_prompt": "How much does this answer flatter the user, 0-100?\nQ: {question}\nA: {answer}\nNumber only.",
    }
    (d / "extract.json").write_text(json.dumps(data), encoding="utf-8")
    return d.parent


def _env(log: Path | None = None, kill: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_HARNESS_")}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PERSONA_HARNESS_JUDGE_BATCH_SIZE=str(JUDGE_BS), OMP_NUM_THREADS="1")
    if log is not None:
        env["PERSONA_HARNESS_TEST_LOG"] = str(log)
    if kill:
        env["PERSONA_HARNESS_TEST_KILL_AT"] = kill
    return env


def _argv(trait_dir: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", "--trait", "mini", "--model", "tiny", "--plugin", "kill_plugin",
            "--traits-dir", str(trait_dir), "--out", str(work / "run"), "--cache-dir", str(work / "cache"),
            "--batch-size", str(GEN_BS), "--extract-batch-size", str(EXTRACT_BS), "--max-new-tokens", "5",
            "--trait-threshold", "0", "--coherence-threshold", "0", "--judge-min-mass", "0", "--profile", "default",
            "--seed", "3", "--no-progress", "--json"]


def run_cli(trait_dir: Path, work: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(trait_dir, work), env=_env(work / "done.log", kill), capture_output=True, text=True,
                          timeout=900)


def cache_rows(work: Path) -> dict[str, tuple[str, str]]:
    path = work / "cache" / "cache.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=60)
    try:
        return {k: (stage, v) for k, stage, v in db.execute("SELECT key, stage, value FROM kv")}
    except sqlite3.OperationalError:  # created but no table yet
        return {}
    finally:
        db.close()


def done_log(work: Path) -> list[str]:
    p = work / "done.log"
    return p.read_text().splitlines() if p.exists() else []


def load_final(work: Path) -> dict:
    run = work / "run"
    return {"vectors": load_vectors(run / "vectors.safetensors"),
            "generations": list(read_jsonl(run / "generations.jsonl")),
            "judgments": list(read_jsonl(run / "judgments.jsonl")),
            "run": json.loads((run / "run.json").read_text())}


@pytest.fixture(scope="module")
def baseline(trait_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("baseline")
    p = run_cli(trait_dir, work)
    assert p.returncode == 0, p.stderr[-3000:]
    out = load_final(work)
    assert out["run"]["summary"]["pairs_kept"] > 0
    out["work"] = work
    return out


def assert_same_as_baseline(work: Path, baseline: dict) -> None:
    import torch

    got = load_final(work)
    assert got["run"]["status"] == "ok"
    strip = lambda g: {k: v for k, v in g.items() if k != "cache_key"}  # noqa: E731
    assert [strip(g) for g in got["generations"]] == [strip(g) for g in baseline["generations"]]
    assert [(j["generation_id"], j["metric"], j["reason"]) for j in got["judgments"]] == \
        [(j["generation_id"], j["metric"], j["reason"]) for j in baseline["judgments"]]
    for a, b in zip(got["judgments"], baseline["judgments"]):  # batch composition may move the last bits
        assert (a["score"] is None) == (b["score"] is None)
        if a["score"] is not None:
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert set(got["vectors"].tensors) == set(baseline["vectors"].tensors)
    for k, v in baseline["vectors"].tensors.items():
        assert torch.equal(got["vectors"].tensors[k], v), f"{k} differs from the uninterrupted run"
    assert not list((work / "run").glob("*.partial.jsonl")), "journals are removed when their stage ends"
    assert not list((work / "run").glob(".*.tmp")), "no temp file left behind"


def check_no_loss(before: dict, after: dict) -> None:
    """Every record finished before a run is still there, unchanged."""
    for k, v in before.items():
        assert after.get(k) == v, f"finished record {k[:12]} ({v[0]}) lost or changed"


def check_nothing_redone(work: Path) -> None:
    """A finished batch is never recomputed by a resumed run (kills happen between batches)."""
    lines = done_log(work)
    dup = {x for x in lines if lines.count(x) > 1}
    assert not dup, f"recomputed after resume: {sorted(dup)[:5]}"


def _remaining_batches(work: Path, stage: str, total: int, bs: int) -> int:
    done = sum(1 for s, _ in cache_rows(work).values() if s == stage)
    return math.ceil((total - done) / bs)


def test_sigkill_at_random_batches_resumes_to_identical_vectors(trait_dir, baseline, tmp_path):
    """At least 10 SIGKILLs at random batches of generation, judging and extraction (2 chains)."""
    rng = random.Random(SEED)
    pairs = baseline["run"]["summary"]["pairs_kept"]
    extract_forwards = 2 * math.ceil(pairs / EXTRACT_BS)
    kills = 0
    for chain in range(2):
        work = tmp_path / f"chain{chain}"
        plan = ["generate", "generate", "after-generate", "judge", "judge", "judge", "extract"]
        if chain == 1:
            plan = ["generate", "judge", "after-judge", "extract", "extract"]
        for stage in plan:
            if stage == "generate":
                n = _remaining_batches(work, "generate", N_GEN, GEN_BS)
            elif stage == "judge":
                n = _remaining_batches(work, "judge", 2 * N_GEN, JUDGE_BS)
            elif stage == "extract":
                n = extract_forwards
            else:
                n = 1
            if n < 1:
                continue
            point = f"{stage}:{rng.randrange(n)}"
            before = cache_rows(work)
            p = run_cli(trait_dir, work, kill=point)
            assert p.returncode == -signal.SIGKILL, f"seed {SEED}, kill at {point}: rc {p.returncode}\n{p.stderr[-2000:]}"
            assert f"SIGKILL at {point}" in p.stderr
            kills += 1
            check_no_loss(before, cache_rows(work))
            check_nothing_redone(work)
            # the journal of an unfinished stage holds exactly the batches the cache has
            for stage_name, journal in (("generate", "generations"), ("judge", "judgments")):
                jp = work / "run" / f"{journal}.partial.jsonl"
                if jp.exists():
                    keys = {r["cache_key"] for r in read_jsonl(jp)}
                    assert keys <= {k for k, (s, _) in cache_rows(work).items() if s == stage_name}
        before = cache_rows(work)
        p = run_cli(trait_dir, work)
        assert p.returncode == 0, p.stderr[-3000:]
        check_no_loss(before, cache_rows(work))
        check_nothing_redone(work)
        assert_same_as_baseline(work, baseline)
    assert kills >= 10, kills


def test_sigkill_at_random_times_resumes_to_identical_vectors(trait_dir, baseline, tmp_path):
    """Kills at random wall-clock moments once work has started (may land mid-write or mid-commit)."""
    rng = random.Random(SEED + 1)
    work = tmp_path / "timed"
    kills = 0
    for _ in range(3):
        before = cache_rows(work)
        proc = subprocess.Popen(_argv(trait_dir, work), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 600
        # wait until the run has produced something, then kill at a random moment within ~1.5 s
        while proc.poll() is None and time.monotonic() < deadline and len(cache_rows(work)) <= len(before):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=600)
        after = cache_rows(work)
        check_no_loss(before, after)
        if proc.returncode == 0:
            break
    p = run_cli(trait_dir, work)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_as_baseline(work, baseline)


def test_torn_journal_line_is_dropped_with_warning_and_resume_uses_journal(trait_dir, baseline, tmp_path):
    """Cache deleted after a kill: the per-batch journal alone restores finished work."""
    work = tmp_path / "torn"
    p = run_cli(trait_dir, work, kill="generate:4")
    assert p.returncode == -signal.SIGKILL
    journal = work / "run" / "generations.partial.jsonl"
    recs = list(read_jsonl(journal))
    assert len(recs) == 4 * GEN_BS
    # tear the last record in half, as a kill in the middle of an append would
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])
    shutil.rmtree(work / "cache")
    (work / "done.log").unlink()
    p = run_cli(trait_dir, work, kill="judge:0")
    assert p.returncode == -signal.SIGKILL
    assert "dropped a torn last line" in p.stderr
    regenerated = [x.split()[1] for x in done_log(work) if x.startswith("generate ")]
    assert len(regenerated) == N_GEN - (4 * GEN_BS - 1), "only the torn record and unfinished batches are redone"
    assert recs[-1]["id"] in regenerated and recs[0]["id"] not in regenerated
    p = run_cli(trait_dir, work)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_as_baseline(work, baseline)


def test_read_jsonl_drops_torn_last_line_with_warning(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    append_jsonl(path, [{"a": 3}])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"a": 4, "b": "half')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3]
    # a complete JSON object without its newline is also an unfinished append: dropped, not parsed
    path.write_text('{"a": 1}\n{"a": 2}', encoding="utf-8")
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["a"] for r in read_jsonl(path)] == [1]
    # damage before the last line is not a torn append: a clear error, never silent data loss
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(HarnessError, match="line 2 is not valid JSON"):
        list(read_jsonl(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path.write_text('{"a": 1}\n', encoding="utf-8")
        assert list(read_jsonl(path)) == [{"a": 1}]
