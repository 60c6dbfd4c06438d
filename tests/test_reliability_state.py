"""Broken state is a one-line error with the fix, never a traceback, and never blocks the next run.

- a cache database that is garbage or truncated is moved aside (named in a warning) and a fresh one
  is started; a corrupt row is skipped with a warning and recomputed;
- read-only folders (a real kernel refusal: ``chattr +i`` as root, ``chmod`` otherwise), a full disk
  (writes to ``/dev/full``), a file where a folder belongs: one line naming the path and the problem;
- undecodable bytes in a record file are reported with the file and the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

from harness.core.errors import HarnessError
from reliability_run import PLUGIN, cli, copy_run, error_lines, make_run, write_trait

RUN_FLAGS = ["--model", "tiny", *PLUGIN, "--trait-threshold", "0", "--coherence-threshold", "0", "--judge-min-mass",
             "0", "--max-new-tokens", "3", "--no-progress", "--profile", "paper"]


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` really unwritable: the immutable flag as root (permissions do not bind root), else 0555."""
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a folder read-only here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        try:
            yield
        finally:
            path.chmod(mode)


def _fill(cache_dir: Path, n: int = 400):
    from harness.core.cache import Cache, cache_key

    c = Cache(cache_dir)
    c.put_many("generate", [(cache_key("g", i=i), {"i": i, "pad": "x" * 500}) for i in range(n)])
    c.close()
    db = sqlite3.connect(cache_dir / "cache.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return [cache_key("g", i=i) for i in range(n)]


# -- the cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed header"])
def test_a_damaged_cache_database_is_moved_aside_and_a_fresh_one_started(tmp_path, damage):
    from harness.core.cache import Cache, CorruptCacheWarning

    d = tmp_path / "cache"
    keys = _fill(d)
    db = d / "cache.sqlite"
    data = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(os.urandom(len(data)))
    elif damage == "truncated":
        db.write_bytes(data[: len(data) // 3])
    else:
        db.write_bytes(b"\0" * 100 + data[100:])
    with pytest.warns(CorruptCacheWarning) as rec:
        c = Cache(d)
        got = c.get_many(keys)
    assert got == {}  # nothing from the damaged file is trusted: everything is recomputed
    aside = [p for p in d.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].name in str(rec[0].message) and str(db) in str(rec[0].message)
    c.put_many("generate", [(keys[0], {"i": 0})])
    assert c.get(keys[0]) == {"i": 0}
    c.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fresh cache opens cleanly next time
        assert Cache(d).get(keys[0]) == {"i": 0}


def test_a_corrupt_row_is_skipped_with_a_warning_and_recomputed(tmp_path, tiny_pm, mini_trait_dir):
    from harness.core.cache import CorruptCacheWarning
    from harness.core.config import Settings
    from harness.core.pipeline import run_trait

    s = Settings(traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"),
                 trait_threshold=0.0, coherence_threshold=0.0, judge_min_mass=0.0, max_new_tokens=3, progress=False,
                 profile="paper")
    first = run_trait("mini", s, pm=tiny_pm)
    db = sqlite3.connect(tmp_path / "c" / "cache.sqlite")
    key = first.generations[0].cache_key or db.execute("SELECT key FROM kv WHERE stage='generate'").fetchone()[0]
    db.execute("UPDATE kv SET value=? WHERE key=?", ('{"id": "torn', key))
    db.execute("UPDATE kv SET value=? WHERE key=(SELECT key FROM kv WHERE stage='judge' LIMIT 1)", ("\x00\x01",))
    db.commit()
    db.close()
    with pytest.warns(CorruptCacheWarning, match="skipped 1 damaged cache entry"):
        again = run_trait("mini", s, pm=tiny_pm)
    assert again.run_dir == first.run_dir
    assert [g.response for g in again.generations] == [g.response for g in first.generations]  # seeded: same text
    assert again.summary["generations"] == first.summary["generations"]
    db = sqlite3.connect(tmp_path / "c" / "cache.sqlite")
    assert json.loads(db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()[0])["id"]  # rewritten
    db.close()


def test_a_garbage_cache_does_not_block_the_next_cli_run(tmp_path, capsys):
    t = write_trait(tmp_path, pairs=1, questions=1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache.sqlite").write_bytes(b"this is not a database" * 100)
    from harness.core.cache import CorruptCacheWarning

    with pytest.warns(CorruptCacheWarning, match="moved it aside to cache.sqlite.corrupt-"):
        rc, _, err = cli(["run", "--trait", "mini", "--traits-dir", t, "--out", tmp_path / "D", "--cache-dir",
                          tmp_path / "c", *RUN_FLAGS], capsys)
    assert rc == 0 and json.loads((tmp_path / "D" / "run.json").read_text())["status"] == "ok"


# -- paths ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["--out", "--cache-dir"])
def test_a_file_where_a_folder_belongs_is_one_line(tmp_path, capsys, which):
    t = write_trait(tmp_path, pairs=1, questions=1)
    f = tmp_path / "afile"
    f.write_text("x")
    paths = {"--out": tmp_path / "D", "--cache-dir": tmp_path / "c", which: f}
    rc, _, err = cli(["run", "--trait", "mini", "--traits-dir", t, "--out", paths["--out"], "--cache-dir",
                      paths["--cache-dir"], *RUN_FLAGS], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and str(f) in lines[0] and "is a file, not a folder" in lines[0], err[-2000:]
    assert "Fix:" in lines[0] and f.read_text() == "x"


@pytest.mark.parametrize("which", ["out", "cache"])
def test_a_read_only_folder_is_one_line_naming_it(tmp_path, capsys, which):
    t = write_trait(tmp_path, pairs=1, questions=1)
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "D" if which == "out" else tmp_path / "D"
    cache = ro / "c" if which == "cache" else tmp_path / "c"
    with read_only(ro):
        rc, _, err = cli(["run", "--trait", "mini", "--traits-dir", t, "--out", out, "--cache-dir", cache, *RUN_FLAGS],
                         capsys)
    lines = error_lines(err)
    target = out if which == "out" else cache
    assert rc == 1 and len(lines) == 1 and str(target) in lines[0], err[-2000:]
    assert ("operation not permitted" in lines[0] or "permission denied" in lines[0]) and "Fix:" in lines[0]


def test_a_read_only_cache_database_file_is_one_line(tmp_path):
    from harness.core.cache import Cache

    d = tmp_path / "c"
    _fill(d, 5)
    with read_only(d):
        with pytest.raises(HarnessError) as ei:
            Cache(d).put_many("generate", [("k", {"a": 1})])
    assert str(d) in str(ei.value) and "Fix:" in str(ei.value) and "\n" not in str(ei.value)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    """Appends to /dev/full fail with the kernel's ENOSPC, as a full disk does."""
    from harness.core.artifacts import append_jsonl

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    j = tmp_path / "generations.partial.jsonl"
    j.symlink_to("/dev/full")
    with pytest.raises(HarnessError) as ei:
        append_jsonl(j, [{"id": "x" * 10_000}])
    msg = str(ei.value)
    assert str(j) in msg and "the disk is full" in msg and "Fix:" in msg and "\n" not in msg


# -- record files -----------------------------------------------------------------------------------
def test_undecodable_bytes_in_a_record_file_name_the_file_and_line(tmp_path, tiny_lm, capsys):
    from harness.core.artifacts import read_jsonl

    p = tmp_path / "judgments.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n{"c": 3}\n')
    with pytest.raises(HarnessError, match=r"judgments.jsonl: line 2: bytes that are not UTF-8.*Fix:"):
        list(read_jsonl(p))
    run = copy_run(make_run(tmp_path / "base", tiny_lm), tmp_path / "run")
    j = run / "judgments.jsonl"
    lines = j.read_bytes().split(b"\n")
    lines[3] = lines[3][:20] + b"\xc3\x28" + lines[3][20:]
    j.write_bytes(b"\n".join(lines))
    for argv in (["monitor", run, "--cache-dir", tmp_path / "c", *PLUGIN], ["report", run, "--no-compute"]):
        rc, _, err = cli(argv, capsys)
        out = error_lines(err)
        assert rc == 1 and len(out) == 1 and f"{j}: line 4: bytes that are not UTF-8" in out[0], err[-2000:]


def test_a_folder_where_the_vector_file_belongs_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "vectors.safetensors").mkdir()  # a folder where the vector file belongs
    rc, _, err = cli(["layers", run], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err and "vectors.safetensors" in lines[0], err
