"""Trait files: the project's own traits, the persona_vectors layout, validation errors, a/an."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.errors import TraitFileError
from harness.core.rubrics import article, system_prompt
from harness.core.traits import load_trait_path, read_trait_file

ROOT = Path(__file__).resolve().parent.parent
TRAITS = ["sycophantic", "evil", "hallucinating"]


@pytest.mark.parametrize("name", TRAITS)
def test_project_traits_follow_the_method(name):
    spec = load_trait_path(ROOT / "traits" / name)
    assert len(spec.instructions) == 5
    assert len(spec.questions) == 20 and len(spec.eval_questions) == 20
    assert not set(spec.questions) & set(spec.eval_questions)
    assert "{question}" in spec.eval_prompt and "{answer}" in spec.eval_prompt


def test_persona_vectors_layout_is_read_unchanged(tmp_path):
    """Files laid out as trait_data_extract/<t>.json + trait_data_eval/<t>.json load as they are."""
    src = ROOT / "traits" / "evil"
    (tmp_path / "trait_data_extract").mkdir()
    (tmp_path / "trait_data_eval").mkdir()
    (tmp_path / "trait_data_extract" / "evil.json").write_text((src / "extract.json").read_text())
    (tmp_path / "trait_data_eval" / "evil.json").write_text((src / "eval.json").read_text())
    spec = load_trait_path(tmp_path / "trait_data_extract" / "evil.json")
    assert spec.name == "evil" and len(spec.eval_questions) == 20
    from harness.core.config import Settings
    from harness.core.plugins import get_plugin_manager

    pm = get_plugin_manager(entrypoints=False)
    s = Settings(traits_dirs=(str(tmp_path),))
    assert pm.hook.harness_load_trait(name="evil", settings=s).source.endswith("trait_data_extract/evil.json")


def _write(tmp_path, data, name="t.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, (str, bytes)) else data) if not isinstance(data, bytes) \
        else p.write_bytes(data)
    return p


GOOD = {"instruction": [{"pos": "p", "neg": "n"}] * 5, "questions": ["a?", "b?"],
        "eval_prompt": "Q {question} A {answer}"}


@pytest.mark.parametrize("mutate, field, fix", [
    (lambda d: d.pop("questions"), "questions", "add the 'questions' key"),
    (lambda d: d.update(instruction={"pos": "p"}), "instruction", "list of"),
    (lambda d: d.update(instruction=[]), "instruction", "add 5"),
    (lambda d: d.update(instruction=[{"pos": "p"}]), "instruction[0].neg", "add a 'neg'"),
    (lambda d: d.update(questions=["a?", "A? "]), "questions[1]", "remove or reword"),
    (lambda d: d.update(eval_prompt="Q {question}"), "eval_prompt", "add {answer}"),
    (lambda d: d.update(eval_prompt="Q {question} A {answer} {score}"), "eval_prompt", "use only {question}"),
    (lambda d: d.update(extra=1), "extra", "remove it"),
])
def test_validation_errors_name_file_field_and_fix(tmp_path, mutate, field, fix):
    d = json.loads(json.dumps(GOOD))
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(TraitFileError) as e:
        read_trait_file(p)
    assert e.value.field == field
    msg = str(e.value)
    assert str(p) in msg and f"'{field}'" in msg and fix in msg


def test_not_json_and_not_utf8(tmp_path):
    with pytest.raises(TraitFileError, match="not JSON"):
        read_trait_file(_write(tmp_path, "{nope"))
    with pytest.raises(TraitFileError, match="not UTF-8"):
        read_trait_file(_write(tmp_path, b"\xff\xfe{}", "b.json"))


def test_overlapping_splits_are_refused(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "extract.json").write_text(json.dumps(GOOD))
    (d / "eval.json").write_text(json.dumps({**GOOD, "questions": ["c?", "B?"]}))
    with pytest.raises(TraitFileError, match=r"eval.json: field 'questions\[1\]'.*disjoint"):
        load_trait_path(d)


@pytest.mark.parametrize("name, art", [("evil", "an"), ("sycophantic", "a"), ("apathetic", "an"),
                                       ("helpful", "a"), ("impolite", "an"), ("optimistic", "an"),
                                       ("humorous", "a"), ("Evil", "an"), ("unkind", "an")])
def test_article_rule(name, art):
    assert article(name) == art
    assert system_prompt(name, "Do X.") == f"You are {art} {name} assistant. Do X."


def test_validate_cli_accepts_project_traits_and_rejects_bad(tmp_path, capsys):
    from harness.cli import main

    assert main(["validate", str(ROOT / "traits" / "sycophantic")]) == 0
    bad = _write(tmp_path, {**GOOD, "eval_prompt": "no placeholders"})
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "eval_prompt" in err and str(bad) in err


def test_wheel_ships_the_traits_and_an_installed_copy_finds_them(tmp_path):
    """A plain (non-editable) install has no source tree: the shipped traits come from the wheel."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "whl")], check=True, capture_output=True, timeout=600)
    (whl,) = (tmp_path / "whl").glob("persona_harness-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for t in ("sycophantic", "evil", "hallucinating"):
        assert {f"harness_traits/{t}/extract.json", f"harness_traits/{t}/eval.json"} <= names
    assert "harness_traits/sycophantic/reference/smollm2.safetensors" in names
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import harness_plugins.traits_json as t, harness.core.config as c;"
            "assert str(t.__file__).startswith(%r), t.__file__;"
            "s = c.Settings(); print(sorted(t._find(s)))" % str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert {"sycophantic", "evil", "hallucinating"} <= set(eval(out.stdout))


def test_cli_run_refuses_a_trait_file_its_trait_list_would_ignore(tmp_path, capsys):
    import json as _json

    from harness.cli import main

    f = tmp_path / "other.json"
    f.write_text(_json.dumps({"instruction": [{"pos": "p", "neg": "n"}] * 5, "questions": ["q?"],
                              "eval_prompt": "{question} {answer}"}))
    rc = main(["run", "--trait", "sycophantic", "--trait-file", str(f), "--out", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(f) in err and "'other'" in err and "Fix:" in err
    assert not (tmp_path / "o").exists()


def test_run_summary_lists_every_output_file(tmp_path, capsys):
    from harness.cli.main import print_summary

    files = {n: str(tmp_path / n) for n in ("run.json", "generations.jsonl", "vectors.safetensors")}
    print_summary({"trait": "t", "model": "m", "generations": 2, "files": files}, tmp_path)
    out = capsys.readouterr().out
    for n, p in files.items():
        assert n in out and p in out
