"""Content-addressed cache of finished generations and judgments (stdlib sqlite3).

Keys are sha256 of canonical JSON over everything that determines a result (stage, component
name and ``config()`` with its version, the model's identity -- fingerprint, dtype, chat settings,
``harness.core.model_ids.model_identity`` -- messages, parameters, seed, sample index). Each put is its own committed transaction,
so a killed process loses at most the record it was writing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from harness.core.errors import HarnessError
from harness.core.records import content_hash


def cache_key(stage: str, **parts: Any) -> str:
    return content_hash({"stage": stage, **parts})


def _retry_locked(fn, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


#: sqlite primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``)
_CORRUPT, _NOTADB, _FULL, _READONLY, _CANTOPEN, _IOERR, _PERM = 11, 26, 13, 8, 14, 10, 3


def _code(e: sqlite3.Error) -> int:
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:  # older Pythons: from the message
        msg = str(e).lower()
        if "malformed" in msg:
            return _CORRUPT
        if "not a database" in msg:
            return _NOTADB
        if "disk is full" in msg:
            return _FULL
        if "readonly" in msg:
            return _READONLY
        if "unable to open" in msg:
            return _CANTOPEN
        return -1
    return int(code) & 0xFF


class CorruptCacheWarning(UserWarning):
    """The cache database or one of its rows could not be read; it was set aside and is recomputed."""


class Cache:
    """The cache database ``<directory>/cache.sqlite``.

    Robust to broken state: a database that is not sqlite or is damaged (garbage, truncated) is moved
    aside to ``cache.sqlite.corrupt-<time>`` (named in a warning) and a fresh one is started; a row
    whose value does not parse is skipped with a warning and counts as a miss, so it is recomputed
    and overwritten. A folder that cannot hold the database (read-only, full, a file) is a one-line
    ``HarnessError`` naming the path and the problem.
    """

    def __init__(self, directory: str | Path):
        from harness.core.locks import make_dir

        self.dir = make_dir(directory, "cache directory")
        self.path = self.dir / "cache.sqlite"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._ino: int | None = None
        self.hits = 0
        self.misses = 0
        self.corrupt_rows = 0
        self._run(lambda db: None)  # open now: problems surface before any work starts

    # -- opening and broken state ------------------------------------------------------------
    def _connect(self) -> None:
        db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        try:
            # Switching a fresh file to WAL takes an exclusive lock and sqlite answers SQLITE_BUSY at
            # once (no busy handler) when another process opens the same new cache at that moment --
            # e.g. the ranks of a torchrun job. Retry with backoff for as long as `timeout`.
            _retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            _retry_locked(lambda: db.execute("PRAGMA synchronous=NORMAL"))
            _retry_locked(lambda: db.execute(
                "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, stage TEXT, value TEXT)"))
            _retry_locked(lambda: db.execute("SELECT key, stage, value FROM kv LIMIT 1").fetchall())
        except BaseException:
            db.close()
            raise
        self._db = db
        try:
            self._ino = os.stat(self.path).st_ino
        except OSError:
            self._ino = None

    def _set_aside(self, err: sqlite3.Error) -> None:
        """Move a damaged database (and its WAL files) aside, unless another process already did."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        try:
            ino = os.stat(self.path).st_ino
        except OSError:
            ino = None
        if ino is None or (self._ino is not None and ino != self._ino):
            return  # already replaced by another process: just reopen
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                side = Path(str(self.path) + suffix)
                if side.exists():
                    os.replace(side, Path(str(aside) + suffix))
        except OSError as e:
            from harness.core.artifacts import os_error_message

            raise HarnessError(os_error_message(self.path, e, f"the cache database is damaged ({err}) and cannot "
                                                             "be moved aside")) from None
        warnings.warn(f"{self.path}: the cache database is damaged ({err}); moved it aside to {aside.name} and "
                      "started a fresh one (earlier results are recomputed)", CorruptCacheWarning, stacklevel=4)

    def _fail(self, err: sqlite3.Error) -> HarnessError:
        code = _code(err)
        if code == _FULL:
            problem, fix = "the disk is full", "free space, or pass --cache-dir on another disk"
        elif code in (_READONLY, _PERM):
            problem, fix = "it is read-only", "make it writable, or pass --cache-dir DIR"
        elif code in (5, 6):  # SQLITE_BUSY / SQLITE_LOCKED after the busy timeout
            problem, fix = "another process held it locked for too long", "retry, or pass --cache-dir DIR"
        elif code == _CANTOPEN:
            problem = ("the folder is not writable" if not os.access(self.dir, os.W_OK) else "it cannot be opened")
            fix = "make it writable, or pass --cache-dir DIR"
        else:
            problem, fix = str(err), "pass --cache-dir DIR, or move the file away"
        return HarnessError(f"{self.path}: cannot use the cache database: {problem} ({err}). Fix: {fix}")

    def _run(self, fn):
        """``fn(db)`` under the lock; a damaged database is set aside and ``fn`` retried once on a fresh one."""
        for attempt in (0, 1):
            try:
                with self._lock:
                    if self._db is None:
                        self._connect()
                    return fn(self._db)
            except sqlite3.DatabaseError as e:
                if _code(e) in (_CORRUPT, _NOTADB) and attempt == 0:
                    with self._lock:
                        self._set_aside(e)
                    continue
                if isinstance(e, sqlite3.OperationalError) and _code(e) not in (_FULL, _READONLY, _PERM, _CANTOPEN,
                                                                                 _IOERR, 5, 6):
                    raise
                raise self._fail(e) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode(self, key: str, value: str) -> dict | None:
        try:
            obj = json.loads(value)
        except (ValueError, TypeError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            self.corrupt_rows += 1
            return None
        return obj

    def _warn_skipped(self, n: int) -> None:
        if n:
            warnings.warn(f"{self.path}: skipped {n} damaged cache entr{'y' if n == 1 else 'ies'}; "
                          f"{'it is' if n == 1 else 'they are'} recomputed", CorruptCacheWarning, stacklevel=3)

    # -- reading and writing -----------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        row = self._run(lambda db: db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone())
        value = None if row is None else self._decode(key, row[0])
        self._warn_skipped(int(row is not None and value is None))
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value

    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        keys = list(keys)

        def read(db):
            rows = []
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                q = "SELECT key, value FROM kv WHERE key IN (%s)" % ",".join("?" * len(chunk))
                rows.extend(db.execute(q, chunk).fetchall())
            return rows

        out: dict[str, dict] = {}
        rows = self._run(read)
        for k, v in rows:
            obj = self._decode(k, v)
            if obj is not None:
                out[k] = obj
        self._warn_skipped(len(rows) - len(out))
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_many(self, stage: str, items: Iterable[tuple[str, dict]]) -> None:
        rows = [(k, stage, json.dumps(v, ensure_ascii=False)) for k, v in items]
        if not rows:
            return

        def write(db):
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO kv (key, stage, value) VALUES (?,?,?)", rows)
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise

        self._run(write)

    def put(self, stage: str, key: str, value: dict) -> None:
        self.put_many(stage, [(key, value)])

    def count(self, stage: str | None = None) -> int:
        if stage is None:
            return self._run(lambda db: db.execute("SELECT COUNT(*) FROM kv").fetchone()[0])
        return self._run(lambda db: db.execute("SELECT COUNT(*) FROM kv WHERE stage=?", (stage,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
