"""One writer per run directory: a lock file holding the writer's pid, stale locks taken over.

``hold_run_dir(run_dir)`` creates the folder (a path that cannot be a folder is a one-line error
naming it and the problem) and takes ``<run_dir>/.persona-harness.lock``. Another process that
holds it is named in the refusal (pid, host, command, since when). The lock is an exclusive
``flock`` on that file where the platform has it, so the kernel drops it when its holder dies; the
pid in the file is then stale and the next writer takes over with a warning. Without ``flock``,
a lock whose pid no longer runs on this host is stale.

The lock is held until ``release()``; ``run_lock_scope`` (a decorator) releases every lock taken
while the decorated call runs, and a process releases what it still holds when it exits. Taking a
lock this process already holds is a no-op, so nested writers in one process do not refuse each other.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import functools
import json
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

from harness.core.errors import HarnessError

LOCK_NAME = ".persona-harness.lock"
F = TypeVar("F", bound=Callable[..., Any])

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunDirLocked(HarnessError):
    """Another process is writing this run directory."""


_held: dict[str, RunLock] = {}
_held_lock = threading.Lock()
_scopes = threading.local()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("command"):
        parts.append(f"({holder['command']})")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return " ".join(parts)


def make_dir(path: str | Path, what: str = "run directory") -> Path:
    """``mkdir -p`` with a one-line error naming the path and the problem."""
    from harness.core.artifacts import os_error_message

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{what} {path} is a file, not a folder. Fix: give another path, or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarnessError(os_error_message(path, e, f"cannot create the {what}")) from None
    return path


class RunLock:
    """The lock on one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        from harness.core.artifacts import os_error_message

        for _ in range(20):  # a lock file replaced between open and flock: try again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise HarnessError(os_error_message(self.path, e, "cannot create the run directory's lock file")) from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise HarnessError(os_error_message(self.path, e, "cannot lock the run directory")) from None
                    raise self._refusal(_read_holder(self.path)) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # its holder removed it while we waited for the lock
                    os.close(fd)
                    continue
            else:  # pragma: no cover - no flock: the pid decides
                holder = _read_holder(self.path)
                if holder.get("pid") and holder.get("pid") != os.getpid() and _pid_alive(int(holder["pid"])) \
                        and holder.get("host") == socket.gethostname():
                    os.close(fd)
                    raise self._refusal(holder)
            old = _read_holder(self.path)
            if old.get("pid") and old.get("pid") != os.getpid():
                warnings.warn(f"{self.run_dir}: took over a stale lock of {_describe(old)}, which no longer holds "
                              "it (it ended without releasing it)", stacklevel=4)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3])[:200],
                    "since": _dt.datetime.now().isoformat(timespec="seconds")}
            data = json.dumps(info).encode()
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, data)
            except OSError as e:
                os.close(fd)
                raise HarnessError(os_error_message(self.path, e, "cannot write the run directory's lock file")) from None
            self.fd = fd
            return self
        raise RunDirLocked(f"{self.run_dir}: the lock file {self.path} keeps being replaced. Fix: make sure one "
                           "process writes this run directory")  # pragma: no cover

    def _refusal(self, holder: dict) -> RunDirLocked:
        return RunDirLocked(
            f"{self.run_dir} is being written by another process ({_describe(holder)}). Fix: wait for it to finish, "
            "or give this run its own folder (--out DIR)")

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if _read_holder(self.path).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock
            with _held_lock:
                if _held.get(str(self.run_dir.resolve())) is self:
                    del _held[str(self.run_dir.resolve())]


def hold_run_dir(run_dir: str | Path) -> RunLock:
    """Create ``run_dir`` if needed and lock it for this process (see the module docstring)."""
    run_dir = make_dir(run_dir)
    key = str(run_dir.resolve())
    with _held_lock:
        lock = _held.get(key)
        if lock is not None:
            return lock
        lock = RunLock(run_dir).acquire()
        _held[key] = lock
    stack = getattr(_scopes, "stack", None)
    if stack:
        stack[-1].append(lock)
    return lock


def run_lock_scope(fn: F) -> F:
    """Decorator: release the run-directory locks that ``fn`` took, when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = getattr(_scopes, "stack", None)
        if stack is None:
            stack = _scopes.stack = []
        stack.append([])
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in stack.pop():
                lock.release()

    return wrapper  # type: ignore[return-value]


@atexit.register
def _release_all() -> None:  # pragma: no cover - process exit
    for lock in list(_held.values()):
        lock.release()
