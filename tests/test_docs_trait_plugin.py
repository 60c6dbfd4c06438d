"""docs/judges.md "Traits from elsewhere": the trait-source plugin runs exactly as documented.

The module and the commands are taken from the docs page as written; they run from a temporary
folder that holds ``my_traits_plugin.py`` and its ``traits.sqlite`` (no ``PYTHONPATH``), through the
installed ``persona-harness`` console script, as a user would run them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "judges.md"


def _section() -> str:
    text = DOC.read_text()
    start = text.index("### Traits from elsewhere")
    end = text.find("\n## ", start)
    return text[start:] if end < 0 else text[start:end]


def docs_module() -> str:
    for block in re.findall(r"```python\n(.*?)```", _section(), flags=re.S):
        if block.lstrip().startswith("# my_traits_plugin.py"):
            return block
    raise AssertionError(f"{DOC}: no python block starting with '# my_traits_plugin.py'")


def docs_commands() -> list[list[str]]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", _section(), flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("persona-harness "):
                cmds.append(shlex.split(line))
    assert cmds, f"{DOC}: no persona-harness command in the trait-source section"
    return cmds


def console_script() -> str:
    exe = Path(sys.executable).with_name("persona-harness")
    if not exe.exists():
        pytest.skip(f"the persona-harness console script is not installed next to {sys.executable}")
    return str(exe)


@pytest.fixture()
def plugin_dir(tmp_path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    (d / "my_traits_plugin.py").write_text(docs_module())
    ex = json.loads((ROOT / "traits" / "sycophantic" / "extract.json").read_text())
    ev = json.loads((ROOT / "traits" / "sycophantic" / "eval.json").read_text())
    with sqlite3.connect(d / "traits.sqlite") as db:  # the schema the docs' comment gives
        db.execute("CREATE TABLE traits (name TEXT PRIMARY KEY, extract TEXT, eval TEXT)")
        db.execute("INSERT INTO traits VALUES (?, ?, ?)", ("optimistic", json.dumps(ex), json.dumps(ev)))
    return d


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PERSONA_HARNESS_PLUGINS")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def test_docs_traits_command_lists_the_plugins_traits(plugin_dir):
    traits_cmd = next(c for c in docs_commands() if c[1] == "traits")
    assert "--plugin" in traits_cmd and "my_traits_plugin" in traits_cmd
    r = subprocess.run([console_script(), *traits_cmd[1:]], cwd=plugin_dir, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    assert "optimistic" in names  # from the database, through the plugin
    assert "sycophantic" in names  # the built-in file source still answers
    # the current directory was on sys.path only for the --plugin import; verbose shows the source
    r = subprocess.run([console_script(), *traits_cmd[1:], "-v"], cwd=plugin_dir, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0 and "traits.sqlite:optimistic" in r.stdout, r.stdout + r.stderr


def test_plugin_not_found_names_the_current_directory(tmp_path):
    r = subprocess.run([console_script(), "traits", "--plugin", "no_such_traits_plugin_xyz"], cwd=tmp_path,
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 1
    assert "no_such_traits_plugin_xyz" in r.stderr and str(tmp_path) in r.stderr and "Traceback" not in r.stderr


def test_current_directory_is_not_left_on_sys_path(plugin_dir, monkeypatch):
    from harness.cli.main import import_plugin_modules

    monkeypatch.chdir(plugin_dir)
    before = list(sys.path)
    monkeypatch.delitem(sys.modules, "my_traits_plugin", raising=False)
    try:
        import_plugin_modules(["my_traits_plugin"])
        assert "my_traits_plugin" in sys.modules
        assert sys.modules["my_traits_plugin"].__file__ == str(plugin_dir / "my_traits_plugin.py")
    finally:
        sys.modules.pop("my_traits_plugin", None)
    assert sys.path == before


def test_installed_module_wins_over_a_file_in_the_current_directory(tmp_path, monkeypatch):
    """The current directory is only a fallback: a stray json.py there does not shadow the real one."""
    from harness.cli.main import import_plugin_modules

    (tmp_path / "json.py").write_text("raise RuntimeError('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    import_plugin_modules(["json"])
    assert sys.modules["json"].__file__ != str(tmp_path / "json.py")
