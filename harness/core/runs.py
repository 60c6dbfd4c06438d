"""Run history: every run gets its own folder, ``RUNS_DIR/<model>/<trait>/<run-id>/``.

``<run-id>`` is the UTC start time, ``YYYYMMDD-HHMMSS`` (``-2``, ``-3`` ... when two runs of one
trait start in the same second), so ids sort in time order. Next to the run folders, the text file
``latest`` holds the id of the newest run that wrote its ``run.json`` (a plain file rather than a
symlink, so it works on every file system and survives copying and archiving).

Every command that takes a run directory accepts, through ``resolve_run_dir``: the run folder
itself, the trait folder (``runs/smollm2/sycophantic``: its latest run), or the ``latest`` file.
A folder with a ``run.json`` of its own (``--out DIR``, which writes exactly ``DIR``, or a run made
before run history existed) is a run directory as it is, unless it also holds a ``latest`` file.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.artifacts import atomic_write_text
from harness.core.errors import HarnessError

LATEST = "latest"
RUN_FILE = "run.json"
ID_FORMAT = "%Y%m%d-%H%M%S"
_ID = re.compile(r"^\d{8}-\d{6}(-\d+)?$")


def new_run_id(now: _dt.datetime | None = None) -> str:
    """The id a run started at ``now`` (default: the current UTC time) gets, before de-duplication."""
    return (now or _dt.datetime.now(_dt.timezone.utc)).strftime(ID_FORMAT)


def is_run_id(name: str) -> bool:
    return bool(_ID.match(name))


def allocate_run_dir(trait_root: str | Path, now: _dt.datetime | None = None) -> Path:
    """Create and return a new, empty run folder under ``trait_root`` (atomic: never shared)."""
    root = Path(trait_root)
    root.mkdir(parents=True, exist_ok=True)
    base = new_run_id(now)
    for n in range(1, 10_000):
        d = root / (base if n == 1 else f"{base}-{n}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        return d
    raise HarnessError(f"{root}: cannot allocate a run folder for {base}")  # pragma: no cover


def write_latest(run_dir: str | Path) -> None:
    """Point ``<trait folder>/latest`` at ``run_dir`` (a run folder made by ``allocate_run_dir``)."""
    run_dir = Path(run_dir)
    if is_run_id(run_dir.name):
        atomic_write_text(run_dir.parent / LATEST, run_dir.name + "\n")


def read_latest(trait_root: str | Path) -> Path | None:
    """The run folder ``trait_root/latest`` names, or None when there is no ``latest`` file."""
    p = Path(trait_root) / LATEST
    if not p.is_file():
        return None
    rid = p.read_text(encoding="utf-8", errors="replace").strip()
    if not is_run_id(rid):
        raise HarnessError(f"{p}: {rid[:40]!r} is not a run id (YYYYMMDD-HHMMSS). Fix: write the id of a run "
                           f"folder of {p.parent} into it, or delete it")
    d = p.parent / rid
    if not (d / RUN_FILE).is_file():
        raise HarnessError(f"{p} names run {rid}, but {d / RUN_FILE} does not exist. Fix: write the id of an existing "
                           f"run folder of {p.parent} into it, or delete it")
    return d


def resolve_run_dir(path: str | Path) -> Path:
    """A run folder from a run folder, a trait folder (its latest run) or a ``latest`` file.

    Anything else is returned unchanged (the caller says what is missing)."""
    p = Path(path)
    if p.name == LATEST and p.is_file():
        return read_latest(p.parent) or p
    if (p / LATEST).is_file():  # a trait folder (its latest run wins over a run.json of an older layout there)
        return read_latest(p) or p
    return p


def trait_root(runs_dir: str | Path, model_slug: str, trait: str) -> Path:
    return Path(runs_dir) / model_slug / trait


@dataclass
class RunInfo:
    """One run folder, as ``persona-harness runs`` lists it."""

    path: Path
    model: str
    trait: str
    run_id: str
    latest: bool
    header: dict

    def row(self) -> dict[str, Any]:
        h, summ = self.header, self.header.get("summary") or {}
        peak = (summ.get("norm_peak") or {}).get("peak_layer")
        return {"model": self.model, "trait": self.trait, "run_id": self.run_id, "latest": self.latest,
                "status": h.get("status", "?"), "created": (h.get("run") or {}).get("created"),
                "pairs_kept": summ.get("pairs_kept"), "pairs_candidates": summ.get("pairs_candidates"),
                "peak_layer": peak, "harness_version": h.get("harness_version"), "path": str(self.path)}


def _header(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": "unreadable run.json"}
    return data if isinstance(data, dict) else {"status": "unreadable run.json"}


def list_runs(runs_dir: str | Path, *, model: str | None = None, trait: str | None = None) -> list[RunInfo]:
    """Every run under ``runs_dir`` (``<model>/<trait>/<run-id>/run.json``, and the older
    ``<model>/<trait>/run.json``), sorted by model, trait and id (oldest first)."""
    root = Path(runs_dir)
    out: list[RunInfo] = []
    if not root.is_dir():
        return out
    for mdir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model is not None and mdir.name != model:
            continue
        for tdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
            if trait is not None and tdir.name != trait:
                continue
            try:
                latest = read_latest(tdir)
            except HarnessError:
                latest = None
            if (tdir / RUN_FILE).is_file():  # a run written before run history, or with --out
                out.append(RunInfo(tdir, mdir.name, tdir.name, "-", latest is None, _header(tdir)))
            for rdir in sorted(p for p in tdir.iterdir() if p.is_dir() and is_run_id(p.name)):
                if (rdir / RUN_FILE).is_file():
                    out.append(RunInfo(rdir, mdir.name, tdir.name, rdir.name, latest == rdir, _header(rdir)))
    return out
