"""Trait source: persona_vectors JSON files (``instruction``, ``questions``, ``eval_prompt``).

Looks in, for each traits directory:
  <dir>/<name>/extract.json + <dir>/<name>/eval.json (+ optional checks.json)   project layout
  <dir>/trait_data_extract/<name>.json + <dir>/trait_data_eval/<name>.json      persona_vectors layout
and in any file named with ``--trait-file`` (its eval split is found beside it when present).
The file format itself (reading, validation) is ``harness.core.traits``.
"""

from __future__ import annotations

import warnings
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


class TraitShadowWarning(UserWarning):
    """A trait name is found in more than one place with different content; the first one is used."""


def _canon(p: Path) -> Path:
    """A trait's folder for ``<folder>/extract.json``; else the path itself, resolved."""
    return (p.parent if p.name == "extract.json" else p).resolve()


def _content(p: Path) -> bytes:
    p = _canon(p)
    files = [p / "extract.json", p / "eval.json"] if p.is_dir() else [p]
    try:
        return b"\0".join(f.read_bytes() if f.is_file() else b"" for f in files)
    except OSError:
        return b""


def _add(found: dict[str, Path], name: str, path: Path) -> None:
    """First place wins (--trait-file, --traits-dir, ./traits, the shipped traits); a later trait of the same
    name with other content is named in a warning, never shadowed silently."""
    first = found.setdefault(name, path)
    if first is not path and _canon(first) != _canon(path) and _content(first) != _content(path):
        warnings.warn(f"trait {name!r}: {first} is used; it shadows another trait of that name at {path}, which "
                      "differs. Rename one of them to run both", TraitShadowWarning, stacklevel=2)


def _find(settings: Any) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in getattr(settings, "trait_files", ()) or ():
        p = Path(f)
        _add(found, trait_name_for(p) if p.is_file() else p.name, p)
    for d in default_trait_dirs(settings):
        for sub in sorted(d.iterdir()):
            if sub.is_dir() and (sub / "extract.json").exists():
                _add(found, sub.name, sub)
        pv = d / "trait_data_extract"
        if pv.is_dir():
            for f in sorted(pv.glob("*.json")):
                _add(found, f.stem, f)
    return found


@hookimpl(trylast=True)
def harness_list_traits(settings):
    return sorted(_find(settings))


@hookimpl(trylast=True)
def harness_load_trait(name, settings):
    path = _find(settings).get(name)
    return None if path is None else load_trait_path(path)
