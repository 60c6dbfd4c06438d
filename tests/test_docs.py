"""The documentation covers what the code offers, and the README stays a first screen.

Every CLI command (with its own options), hook, setting, acceptance check and threshold key, and
every ``PERSONA_HARNESS_*`` variable the package reads is documented somewhere in ``docs/``; each
test fails naming what is missing. README.md stays short, keeps its two set-up commands, and its
examples and layout sketch match the code. README and docs carry no issue numbers or notes on how
the project was built, and every relative link points to a file (and heading) that exists.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200

#: the two set-up commands, byte for byte (users copy them; .ci/run runs the second)
SETUP_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/persona-harness run --trait sycophantic",
    "bash scripts/setup.sh && .venv/bin/python -m pytest tests/ traits/ --trait sycophantic benchmarks/ "
    "--benchmark-disable -q",
)


def doc_pages() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md"))}


def all_docs() -> str:
    return "\n".join(doc_pages().values())


def project_pages() -> dict[Path, str]:
    return {README: README.read_text(encoding="utf-8"), **doc_pages()}


def _fail_missing(what: str, missing: list[str]) -> None:
    if missing:
        pytest.fail(f"{what} not documented in docs/: {', '.join(missing)}", pytrace=False)


# -- coverage: the docs document every public surface ----------------------------------------------
def _subcommands():
    from harness.cli.main import build_parser
    from harness.core.plugins import get_plugin_manager

    parser = build_parser(get_plugin_manager(entrypoints=False))
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_cli_command_and_its_options_are_documented():
    from harness.cli.options import setting_flags

    settings_flags = {flag for flag, _ in setting_flags()} | {"--config", "-h", "--help"}
    pages = doc_pages()
    missing = []
    for name, sub in _subcommands().items():
        mention = f"persona-harness {name}"
        homes = [text for text in pages.values() if mention in text]
        if not homes:
            missing.append(f"command '{mention}'")
            continue
        for action in sub._actions:
            opts = [o for o in action.option_strings if o not in settings_flags]
            if action.option_strings and len(opts) == len(action.option_strings):
                if not any(o in text for o in opts for text in homes):
                    missing.append(f"'{mention}' option {'/'.join(opts)} (on the page that documents the command)")
    _fail_missing("CLI", missing)


def test_every_hook_is_documented():
    from harness.core import hookspecs

    docs = all_docs()
    hooks = sorted(n for n in dir(hookspecs) if n.startswith("harness_") and callable(getattr(hookspecs, n)))
    assert hooks, "no hook specs found in harness.core.hookspecs"
    _fail_missing("hooks", [h for h in hooks if h not in docs])


def test_every_setting_is_documented():
    from harness.cli.options import setting_flags
    from harness.core.config import FIELDS

    docs = all_docs()
    flags = {f.name: flag for flag, f in setting_flags()}
    missing = [f"setting `{name}`" for name in FIELDS if f"`{name}`" not in docs]
    missing += [f"flag {flag} (setting {name})" for name, flag in flags.items() if flag not in docs]
    _fail_missing("settings", missing)


def _check_keys(data, depth=0):
    """Keys of a checks.json below the top level (the top level names model blocks), notes aside."""
    if isinstance(data, dict):
        for k, v in data.items():
            if k.startswith("_"):
                continue
            if depth >= 1:
                yield k
            yield from _check_keys(v, depth + 1)
    elif isinstance(data, list):
        for v in data:
            yield from _check_keys(v, depth + 1)


def test_every_acceptance_check_and_threshold_key_is_documented():
    import harness.acceptance

    docs = all_docs()
    files = sorted((ROOT / "traits").glob("*/checks.json"))
    assert files, "no traits/*/checks.json"
    keys = sorted({k for f in files for k in _check_keys(json.loads(f.read_text(encoding="utf-8")))})
    assert keys, "no threshold keys found in traits/*/checks.json"
    checks = sorted(n for n in getattr(harness.acceptance, "__all__", dir(harness.acceptance)) if n.startswith("test_"))
    assert checks, "harness.acceptance exports no checks"
    missing = [f"checks.json key `{k}`" for k in keys if f"`{k}`" not in docs]
    missing += [f"check `{c}`" for c in checks if f"`{c}`" not in docs]
    _fail_missing("acceptance checks", missing)


def test_every_environment_variable_the_package_reads_is_documented():
    from harness.core.config import ENV_PREFIX, FIELDS

    docs = all_docs()
    settings_vars = {ENV_PREFIX + name.upper() for name in FIELDS}  # covered by PERSONA_HARNESS_<FIELD>
    found = set()
    for folder in ("harness", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(re.findall(r"\bPERSONA_HARNESS_[A-Z][A-Z0-9_]*", path.read_text(encoding="utf-8")))
    assert "PERSONA_HARNESS_<FIELD>" in docs, "docs do not explain the settings' PERSONA_HARNESS_<FIELD> variables"
    _fail_missing("environment variables", sorted(v for v in found - settings_vars if v not in docs))


# -- README: short, the two commands, examples that run, a layout sketch that matches ---------------
def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move the rest into docs/"


def test_readme_keeps_the_two_setup_commands_and_ci_runs_the_second():
    lines = README.read_text(encoding="utf-8").splitlines()
    for cmd in SETUP_COMMANDS:
        assert cmd in lines, f"README.md lost the set-up command line {cmd!r}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_args = SETUP_COMMANDS[1].split(".venv/bin/python ", 1)[1]
    assert re.search(rf"^python {re.escape(test_args)}(\s|$)", ci, re.M), \
        f".ci/run does not run the README's test command ({test_args!r})"


def test_readme_cli_table_lists_every_command():
    text = README.read_text(encoding="utf-8")
    table = text.split("\n## CLI", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in _subcommands() if f"`persona-harness {name}" not in table]
    assert not missing, f"README.md's CLI table lacks: {', '.join(missing)}"


def _layout_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Layout", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def test_readme_layout_sketch_matches_the_tree():
    lines = _layout_block().splitlines()
    assert len(lines) <= 12, f"README layout sketch has {len(lines)} lines; keep it about 10"
    listed = set()
    for line in lines:
        for part in re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(","):
            part = part.strip()
            if part:
                listed.add(part.rstrip("/"))
                assert (ROOT / part).exists(), f"README layout sketch lists {part}, which does not exist"
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "harness").glob("*/__init__.py")}
    missing = sorted(packages - listed)
    assert not missing, f"README layout sketch lacks the sub-package(s) {', '.join(missing)}"


def _python_block(text: str, marker: str) -> str:
    [code] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]
    return code


@pytest.mark.parametrize("page", ["README.md", "docs/plugin_hooks.md"])
def test_the_documented_minimal_judge_works(page):
    """The LengthJudge example registers, satisfies the Judge protocol and scores as shown."""
    from harness.core.config import Settings
    from harness.core.plugins import build_registry, get_plugin_manager
    from harness.core.records import JudgeItem

    code = _python_block((ROOT / page).read_text(encoding="utf-8"), "class LengthJudge")
    mod = types.ModuleType("docs_length_judge")
    exec(compile(code, f"{page}:LengthJudge", "exec"), mod.__dict__)
    pm = get_plugin_manager(entrypoints=False)
    pm.register(mod, name="docs_length_judge")
    judge = build_registry(pm, "judge").create("length", Settings())
    [j] = judge.judge([JudgeItem("g1", "sycophantic", "q?", "x" * 250, "rubric")], None)
    assert j.score == 25.0 and j.generation_id == "g1" and j.metric == "sycophantic"
    assert isinstance(judge.config(), dict)


# -- the names and paths the text gives exist -------------------------------------------------------
def _resolve(dotted: str) -> None:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return
    raise ImportError(dotted)


def test_documented_python_names_exist():
    """Every ``harness.x.y`` / ``harness_plugins.x`` the README and docs name can be imported."""
    bad = []
    for path, text in project_pages().items():
        for name in sorted(set(re.findall(r"(?<![\w./-])(harness(?:_plugins|_traits)?(?:\.[A-Za-z_]\w*)+)", text))):
            try:
                _resolve(name)
            except (ImportError, AttributeError) as e:
                bad.append(f"{path.relative_to(ROOT)}: {name} ({type(e).__name__}: {e})")
    assert not bad, "names that do not exist:\n" + "\n".join(bad)


def test_documented_repository_paths_exist():
    """Every `harness/...`, `plugins/...`, `tests/...` (etc.) path in backticks exists."""
    bad = []
    top = "harness|plugins|tests|benchmarks|scripts|traits|examples|docs"
    for path, text in project_pages().items():
        for rel in sorted(set(re.findall(rf"`((?:{top})/[^`\s]*)`", text))):
            if re.search(r"[<>*{}\[\]]|\.\.\.", rel):  # a pattern, not a path
                continue
            if not (ROOT / rel).exists():
                bad.append(f"{path.relative_to(ROOT)}: {rel}")
    assert not bad, "paths that do not exist:\n" + "\n".join(bad)


# -- hygiene: project text only, links that resolve -------------------------------------------------
#: issue/PR references and notes on where or how the project was built
FORBIDDEN = [
    (r"\b(?:issues?|PRs?|pull requests?|tickets?)\s*#?\d+", "an issue number"),
    (r"(?<![\w&/#])#\d+\b", "an issue number"),
    (r"\bnot lent\b", "a note on the build environment"),
    (r"\bthis workplace\b", "a note on the build environment"),
    (r"\bworkplace's\b", "a note on the build environment"),
]


def test_no_issue_numbers_or_build_notes_in_readme_and_docs():
    found = []
    for path, text in project_pages().items():
        for i, line in enumerate(text.splitlines(), 1):
            for pattern, what in FORBIDDEN:
                for m in re.finditer(pattern, line, re.I):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {what}: {m.group(0)!r}")
    assert not found, "project text must speak of the project only:\n" + "\n".join(found)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    out, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", _strip_code(text), re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def _strip_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_every_relative_link_resolves():
    bad = []
    for path, text in project_pages().items():
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _strip_code(text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                bad.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_slug_follows_github():
    assert _slug("Adding a trait: `persona-harness new-trait`") == "adding-a-trait-persona-harness-new-trait"
    assert _slug("Models too big for one GPU: device_map") == "models-too-big-for-one-gpu-device_map"
    assert _slug("Thresholds: `traits/<name>/checks.json`") == "thresholds-traitsnamechecksjson"
