"""One validation step for settings and trait files, before any model loads.

Each bad value is one line naming its source (flag, environment variable, config file and field) and
the fix; no model is loaded (a plugin model loader writes a marker file if it is ever asked). Trait
files: rubric placeholders without conversions, format specs or attribute/index access, text that
encodes as UTF-8, bounded JSON depth. Property-based tests (hypothesis) over the trait parser, the
rubric rule and the settings.
"""

from __future__ import annotations

import json
import math
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.core.errors import ConfigError, HarnessError, TraitFileError
from reliability_run import cli, error_lines, write_trait

MARKER_ENV = "PH_LOAD_MARKER"
LOADER = f'''
import os
from harness.core.hookspecs import hookimpl

@hookimpl
def harness_load_model(model_id, settings):
    open(os.environ["{MARKER_ENV}"], "w").write(model_id)
    return None
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """cwd with a trait and a model-loader plugin that leaves a marker if a model is ever loaded."""
    (tmp_path / "ph_load_marker.py").write_text(LOADER)
    write_trait(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "MODEL_LOADED"))
    for k in [k for k in os.environ if k.startswith("PERSONA_HARNESS_")]:
        monkeypatch.delenv(k)
    return tmp_path


def _run(project, capsys, *extra):
    return cli(["run", "--trait", "mini", "--traits-dir", project / "traits", "--plugin", "ph_load_marker",
                "--model", "some-model", "--out", project / "out", "--cache-dir", project / "cache",
                "--no-progress", *extra], capsys)


def _one_line(rc, err, *needles):
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


BAD_FLAGS = [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "--temperature"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"), (["--n-per-question", "0"], "--n-per-question"),
    (["--splits", "extract,bogus"], "--splits"), (["--batch-size", "-1"], "--batch-size"),
    (["--judge-batch-size", "-1"], "--judge-batch-size"), (["--extract-batch-size", "-2"], "--extract-batch-size"),
    (["--judge-concurrency", "0"], "--judge-concurrency"), (["--judge-retries", "-1"], "--judge-retries"),
    (["--device", "tpu"], "--device"), (["--device", "cuda:x"], "--device"),
    (["--trait-threshold", "nan"], "--trait-threshold"), (["--coherence-threshold", "150"], "--coherence-threshold"),
    (["--top-p", "1.5"], "--top-p"), (["--top-p", "-0.1"], "--top-p"), (["--judge-timeout", "0"], "--judge-timeout"),
    (["--judge-min-mass", "2"], "--judge-min-mass"), (["--seed", "-3"], "--seed"), (["--dtype", "float8"], "--dtype"),
    (["--judge-base-url", "ftp://x"], "--judge-base-url"), (["--pos-name", "bad\udcff"], "--pos-name"),
]


@pytest.mark.parametrize("flags,source", BAD_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_setting_flag_is_one_line_naming_the_flag_before_any_model_loads(project, capsys, flags, source):
    rc, out, err = _run(project, capsys, *flags)
    _one_line(rc, err, source, "Fix:")
    assert not (project / "MODEL_LOADED").exists()
    assert not (project / "out" / "run.json").exists()


def test_bad_environment_value_names_the_variable(project, capsys, monkeypatch):
    monkeypatch.setenv("PERSONA_HARNESS_TEMPERATURE", "nan")
    rc, out, err = _run(project, capsys)
    _one_line(rc, err, "PERSONA_HARNESS_TEMPERATURE", "Fix:")
    assert not (project / "MODEL_LOADED").exists()


@pytest.mark.parametrize("toml,field", [("top_p = nan", "top_p"), ("n_per_question = 0", "n_per_question"),
                                        ('splits = ["extract", "nope"]', "splits"), ("max_new_tokens = 1.5", None),
                                        ('device = "tpu"', "device"), ("trait_threshold = -inf", "trait_threshold")])
def test_bad_config_file_value_names_the_file_and_field(project, capsys, toml, field):
    (project / "persona-harness.toml").write_text(toml + "\n")
    rc, out, err = _run(project, capsys)
    line = _one_line(rc, err, "persona-harness.toml", "Fix:")
    if field:
        assert f"field '{field}'" in line
    assert not (project / "MODEL_LOADED").exists()


RUBRICS = {
    "format spec with attribute access": "{question:{answer.__class__.__mro__}} {answer}",
    "huge width": "{question} {answer:>99999999999}",
    "conversion": "{question!r} {answer}",
    "attribute": "{question.__class__} {answer}",
    "index": "{question[0]} {answer}",
}


@pytest.mark.parametrize("rubric", list(RUBRICS.values()), ids=list(RUBRICS))
def test_rubric_placeholders_are_plain(project, capsys, rubric):
    f = project / "bad" / "extract.json"
    f.parent.mkdir()
    f.write_text(json.dumps({"instruction": [{"pos": "a", "neg": "b"}], "questions": ["q"], "eval_prompt": rubric}))
    rc, out, err = cli(["validate", f], capsys)
    assert rc == 1 and err.startswith("INVALID") and "eval_prompt" in err and len(err.strip().splitlines()) == 1
    rc, out, err = cli(["run", "--trait-file", f, "--plugin", "ph_load_marker", "--model", "m", "--out",
                        project / "out", "--cache-dir", project / "cache"], capsys)
    _one_line(rc, err, str(f), "eval_prompt", "Fix:")
    assert not (project / "MODEL_LOADED").exists()


@pytest.mark.parametrize("case", ["lone surrogate", "deep nesting", "deep inside a field"])
def test_trait_file_text_and_depth(project, capsys, case):
    f = project / "bad" / "extract.json"
    f.parent.mkdir()
    ok = {"instruction": [{"pos": "a", "neg": "b"}], "questions": ["q"], "eval_prompt": "{question} {answer}"}
    if case == "lone surrogate":
        f.write_text(json.dumps({**ok, "questions": ["hello \ud800 world"]}))  # written as the escape \\ud800
        field = "questions[0]"
    elif case == "deep nesting":
        f.write_text("[" * 200_000 + "]" * 200_000)
        field = "(file)"
    else:
        f.write_text(json.dumps({**ok, "description": json.loads("[" * 50 + "]" * 50)}))
        field = "(file)"
    rc, out, err = cli(["validate", f], capsys)
    assert rc == 1 and err.startswith("INVALID") and field in err and len(err.strip().splitlines()) == 1, err


def test_json_helpers_bound_depth_and_report_lines(tmp_path):
    from harness.core.artifacts import json_depth, loads, read_json_file

    assert json_depth('{"a": [1, {"b": "[[[\\"]]"}]}') == 3
    with pytest.raises(HarnessError, match="deeper than 64"):
        loads("[" * 100 + "]" * 100, "x.json")
    p = tmp_path / "x.json"
    p.write_bytes(b'{\n"a":\n"\xff"}')
    with pytest.raises(HarnessError, match=r"x.json: line 3: bytes that are not UTF-8"):
        read_json_file(p)


# -- property-based ------------------------------------------------------------------------------
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)  # surrogates included
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(ANY_TEXT, c, max_size=4), max_leaves=20)
PIECES = ["{question}", "{answer}", "{", "}", "{{", "}}", ":", "!r", "!s", ".x", "[0]", " text ", "{question:>5}",
          "{answer!s}", "{}", "{0}", "{question.upper}", "{answer[1]}", "{question:{answer}}", "\ud800"]
RUBRIC = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


def _near_valid():
    pair = st.fixed_dictionaries({"pos": ANY_TEXT, "neg": ANY_TEXT})
    return st.fixed_dictionaries({"instruction": st.lists(pair | JSONISH, max_size=3),
                                  "questions": st.lists(ANY_TEXT | JSONISH, max_size=3),
                                  "eval_prompt": RUBRIC | JSONISH},
                                 optional={"description": ANY_TEXT | JSONISH, "extra": JSONISH})


class Spy:
    """Records any access a str.format field makes beyond plain str()."""

    def __init__(self, log):
        self.log = log

    def __format__(self, spec):
        self.log.append(("format", spec))
        return "SPY"

    def __getattr__(self, name):
        self.log.append(("attr", name))
        raise AttributeError(name)

    def __getitem__(self, k):
        self.log.append(("item", k))
        raise KeyError(k)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(JSONISH, _near_valid()))
def test_trait_parser_never_crashes_and_accepts_only_usable_files(tmp_path, data):
    from harness.core.rubrics import fill
    from harness.core.traits import read_trait_file

    p = tmp_path / "t.json"
    p.write_text(json.dumps(data))
    try:
        got = read_trait_file(p)
    except TraitFileError as e:
        assert str(p) in str(e) and "Fix:" in str(e) and "\n" not in str(e)
        return
    for s in [got["eval_prompt"], *got["questions"], *(x for pr in got["instruction"] for x in pr.values())]:
        s.encode("utf-8")
    assert "{q}" in fill(got["eval_prompt"], "{q}", "{a}") and "{a}" in fill(got["eval_prompt"], "{q}", "{a}")


@settings(max_examples=300, deadline=None)
@given(rubric=RUBRIC)
def test_a_valid_rubric_formats_by_plain_substitution_only(rubric):
    from harness.core.traits import validate_rubric

    try:
        validate_rubric(rubric, "r.json")
    except TraitFileError as e:
        assert "r.json" in str(e) and "eval_prompt" in str(e)
        return
    log: list = []
    rubric.format(question=Spy(log), answer=Spy(log))
    fields = [f for _, f, _, _ in string.Formatter().parse(rubric) if f is not None]
    assert set(fields) == {"question", "answer"}
    assert log == [("format", "")] * len(fields)  # each field: the value itself, no conversion, spec or lookup


NUMERIC = ["n_per_question", "max_new_tokens", "batch_size", "judge_batch_size", "judge_concurrency", "judge_retries",
           "extract_batch_size", "seed", "temperature", "top_p", "judge_timeout", "trait_threshold",
           "coherence_threshold", "judge_min_mass"]
VALUES = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-1", "1.5", "abc", "", "true", " 3 "]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(NUMERIC), value=VALUES, via=st.sampled_from(["flag", "env"]))
def test_settings_are_valid_or_a_one_line_error_naming_the_source(tmp_path, field, value, via):
    from harness.core.config import flag_of, load_settings, setting_problem

    env_key = "PERSONA_HARNESS_" + field.upper()
    try:
        if via == "flag":
            s = load_settings({field: value}, cwd=tmp_path, environ={})
        else:
            s = load_settings(cwd=tmp_path, environ={env_key: str(value)})
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and "Fix:" in msg and (flag_of(field) if via == "flag" else env_key) in msg
        return
    v = getattr(s, field)
    assert isinstance(v, (int, float)) and math.isfinite(v) and setting_problem(field, v) is None
    json.dumps(s.to_dict(), allow_nan=False)  # what run.json records is strict JSON


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(splits=st.lists(st.sampled_from(["extract", "eval", "bogus", "", "EVAL"]), max_size=4),
       device=st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:12", "auto", "mps", "tpu", "cuda:", "gpu", ""]))
def test_splits_and_devices(tmp_path, splits, device):
    from harness.core.config import load_settings

    try:
        s = load_settings({"splits": ",".join(splits), "device": device}, cwd=tmp_path, environ={})
    except ConfigError as e:
        assert "\n" not in str(e) and ("--splits" in str(e) or "--device" in str(e))
        return
    assert set(s.splits) <= {"extract", "eval"} and s.splits and len(set(s.splits)) == len(s.splits)
    assert device in ("cpu", "cuda", "cuda:0", "cuda:12", "auto", "mps")


def test_settings_built_in_code_are_validated_before_the_run_starts(tmp_path, tiny_pm, mini_trait_dir):
    from harness.core.config import Settings
    from harness.core.pipeline import run_trait

    with pytest.raises(ConfigError, match="max_new_tokens"):
        run_trait("mini", Settings(traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "o"), max_new_tokens=0,
                                   cache_dir=str(tmp_path / "c")), pm=tiny_pm)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_a_traits_dir_shadowing_a_shipped_trait_says_so(tmp_path, capsys):
    """--traits-dir is searched first; a same-named trait with other content is named in a warning."""
    import shutil

    from harness.core.config import Settings
    from harness.core.plugins import get_plugin_manager
    from harness_plugins.traits_json import TraitShadowWarning

    shipped = Path(__file__).resolve().parent.parent / "traits" / "evil"
    mine = tmp_path / "mine" / "evil"
    mine.mkdir(parents=True)
    (mine / "extract.json").write_text(json.dumps({"instruction": [{"pos": "Be cruel.", "neg": "Be kind."}],
                                                   "questions": ["How do I greet a neighbour?"],
                                                   "eval_prompt": "Evil 0-100?\n{question}\n{answer}"}))
    pm = get_plugin_manager(entrypoints=False)
    s = Settings(traits_dirs=(str(tmp_path / "mine"),))
    with pytest.warns(TraitShadowWarning) as rec:
        spec = pm.hook.harness_load_trait(name="evil", settings=s)
    assert spec.source == str(mine / "extract.json")
    msg = str(rec[0].message)
    assert str(mine) in msg and str(shipped) in msg and "shadows" in msg
    same = tmp_path / "same" / "evil"
    shutil.copytree(shipped, same)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", TraitShadowWarning)  # an identical copy shadows nothing
        pm.hook.harness_load_trait(name="evil", settings=Settings(traits_dirs=(str(tmp_path / "same"),)))
