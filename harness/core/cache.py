"""Content-addressed cache of finished generations and judgments (stdlib sqlite3).

Keys are sha256 of canonical JSON over everything that determines a result (stage, component,
model, messages, parameters, seed, sample index). Each put is its own committed transaction,
so a killed process loses at most the record it was writing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

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


class Cache:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "cache.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        # Switching a fresh file to WAL takes an exclusive lock and sqlite answers SQLITE_BUSY at
        # once (no busy handler) when another process opens the same new cache at that moment --
        # e.g. the ranks of a torchrun job. Retry with backoff for as long as `timeout`.
        _retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        _retry_locked(lambda: self._db.execute("PRAGMA synchronous=NORMAL"))
        _retry_locked(lambda: self._db.execute(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, stage TEXT, value TEXT)"))
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        keys = list(keys)
        out: dict[str, dict] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                q = "SELECT key, value FROM kv WHERE key IN (%s)" % ",".join("?" * len(chunk))
                for k, v in self._db.execute(q, chunk):
                    out[k] = json.loads(v)
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_many(self, stage: str, items: Iterable[tuple[str, dict]]) -> None:
        rows = [(k, stage, json.dumps(v, ensure_ascii=False)) for k, v in items]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO kv (key, stage, value) VALUES (?,?,?)", rows)
            self._db.execute("COMMIT")

    def put(self, stage: str, key: str, value: dict) -> None:
        self.put_many(stage, [(key, value)])

    def count(self, stage: str | None = None) -> int:
        with self._lock:
            if stage is None:
                return self._db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM kv WHERE stage=?", (stage,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
