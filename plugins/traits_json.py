"""Trait source: persona_vectors JSON files (``instruction``, ``questions``, ``eval_prompt``).

Looks in, for each traits directory:
  <dir>/<name>/extract.json + <dir>/<name>/eval.json (+ optional checks.json)   project layout
  <dir>/trait_data_extract/<name>.json + <dir>/trait_data_eval/<name>.json      persona_vectors layout
and in any file named with ``--trait-file`` (its eval split is found beside it when present).
The file format itself (reading, validation) is ``harness.core.traits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.hookspecs import hookimpl
from harness.core.traits import load_trait_path, trait_name_for


def _installed_trait_dirs() -> list[Path]:
    """The shipped traits inside an installed wheel (package ``harness_traits``, data only)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("harness_traits")
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []


def default_trait_dirs(settings: Any) -> list[Path]:
    dirs = [Path(d) for d in getattr(settings, "traits_dirs", ()) or ()]
    cwd_traits = Path.cwd() / "traits"
    repo_traits = Path(__file__).resolve().parent.parent / "traits"
    for d in (cwd_traits, repo_traits, *_installed_trait_dirs()):
        if d.is_dir() and all(d.resolve() != x.resolve() for x in dirs):
            dirs.append(d)
    return dirs


def _find(settings: Any) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in getattr(settings, "trait_files", ()) or ():
        p = Path(f)
        found.setdefault(trait_name_for(p) if p.is_file() else p.name, p)
    for d in default_trait_dirs(settings):
        for sub in sorted(d.iterdir()):
            if sub.is_dir() and (sub / "extract.json").exists():
                found.setdefault(sub.name, sub)
        pv = d / "trait_data_extract"
        if pv.is_dir():
            for f in sorted(pv.glob("*.json")):
                found.setdefault(f.stem, f)
    return found


@hookimpl(trylast=True)
def harness_list_traits(settings):
    return sorted(_find(settings))


@hookimpl(trylast=True)
def harness_load_trait(name, settings):
    path = _find(settings).get(name)
    return None if path is None else load_trait_path(path)
