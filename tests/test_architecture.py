"""The layout is the architecture: imports point down, nothing imports a private name from another
module, ``import harness`` stays light, and each stage is one hop from the top of ``harness/``.

An AST walk over every module of ``harness/`` and ``plugins/`` (package ``harness_plugins``): each
module's package may import only the packages below it. Imports inside ``if TYPE_CHECKING:`` blocks
are annotations, not dependencies, and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the harness packages its modules may import (besides itself and the ``harness`` facade's
#: ``__version__`` / ``hookimpl``)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "judging": {"core"},
    "engine": {"core", "models"},
    "analysis": {"core", "models", "engine", "judging"},
    "authoring": {"core", "judging"},
    "testing": {"core", "models"},
    "harness_plugins": {"core", "models", "engine", "judging"},
    "acceptance": {"core", "models", "engine", "judging", "analysis"},
    "cli": {"core", "models", "engine", "judging", "analysis", "authoring"},
}
SUBPACKAGES = ("core", "models", "engine", "judging", "analysis", "acceptance", "cli")


def _modules():
    for path in sorted((ROOT / "harness").rglob("*.py")):
        rel = path.relative_to(ROOT / "harness").with_suffix("")
        parts = rel.parts
        pkg = parts[0] if len(parts) > 1 else ("facade" if parts[0] == "__init__" else parts[0])
        yield path, "harness." + ".".join(p for p in parts if p != "__init__"), pkg
    for path in sorted((ROOT / "plugins").glob("*.py")):
        yield path, "harness_plugins." + path.stem, "harness_plugins"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(path: Path):
    """(line, imported module, imported names) for every import outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]


def _package_of(module: str) -> str | None:
    if module.startswith("harness_plugins"):
        return "harness_plugins"
    parts = module.split(".")
    if parts[0] != "harness":
        return None
    if len(parts) == 1:
        return "facade"
    return parts[1] if parts[1] in SUBPACKAGES else parts[1]


def test_imports_point_down():
    bad = []
    for path, mod, pkg in _modules():
        if pkg == "facade":
            allowed = {"core"}
        else:
            allowed = ALLOWED.get(pkg)
        assert allowed is not None, f"{path}: package {pkg!r} has no place in the layering; add it to ALLOWED"
        for line, target, names in _imports(path):
            tpkg = _package_of(target)
            if tpkg is None or tpkg == pkg:
                continue
            if tpkg == "facade" and set(names) <= {"__version__", "hookimpl", "hookspec"}:
                continue
            if tpkg == "facade" or tpkg not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {pkg} imports {target} ({tpkg})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_module_imports_a_private_name_from_another_module():
    bad = []
    for path, mod, _ in _modules():
        for line, target, names in _imports(path):
            if not (target.startswith("harness") or target.startswith("harness_plugins")) or target == mod:
                continue
            priv = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if priv:
                bad.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(priv)}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_import_graph_test_catches_an_upward_import(tmp_path):
    """The walker sees a core module importing analysis (and a plugin's private name)."""
    f = tmp_path / "m.py"
    f.write_text("from harness.analysis.metrics import auroc\nfrom harness_plugins.traits_json import _x\n"
                 "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harness.cli.main import main\n")
    found = list(_imports(f))
    assert [(t, n) for _, t, n in found] == [("harness.analysis.metrics", ["auroc"]),
                                              ("harness_plugins.traits_json", ["_x"]), ("typing", ["TYPE_CHECKING"])]
    assert _package_of("harness.analysis.metrics") == "analysis" and "analysis" not in ALLOWED["core"]


def test_import_harness_loads_no_heavy_library():
    """``python -X importtime -c "import harness"`` imports no torch, transformers, instructor, openai or pydantic."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import harness"], capture_output=True, text=True,
                       check=True, cwd=ROOT)
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines() if "|" in line}
    heavy = {"torch", "transformers", "instructor", "openai", "pydantic", "numpy", "matplotlib", "safetensors"}
    assert not heavy & loaded, f"import harness loads {sorted(heavy & loaded)}"
    assert "harness" in loaded


@pytest.mark.parametrize("stage, where", [
    ("trait files", "harness/core/traits.py"), ("plugin manager and hooks", "harness/core/plugins.py"),
    ("pipeline", "harness/core/pipeline.py"), ("settings", "harness/core/config.py"),
    ("model loading", "harness/models/loading.py"), ("GPU engine", "harness/engine/__init__.py"),
    ("judge transport", "harness/judging/transport.py"), ("metrics", "harness/analysis/metrics.py"),
    ("acceptance checks", "harness/acceptance/__init__.py"), ("command line", "harness/cli/main.py"),
])
def test_each_stage_is_one_hop_from_the_top(stage, where):
    p = ROOT / where
    assert p.is_file(), f"{stage}: {where} is missing"
    assert len(p.relative_to(ROOT / "harness").parts) <= 2, f"{stage} is nested deeper than one sub-package"


def test_no_process_wide_autograd_switch():
    offenders = [str(p.relative_to(ROOT)) for p, _, _ in _modules()
                 if "set_grad_enabled(False)" in p.read_text(encoding="utf-8")]
    assert not offenders, f"process-wide torch.set_grad_enabled(False) in {offenders}: use torch.inference_mode()"
