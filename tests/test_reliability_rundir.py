"""A run directory is data, not configuration.

Commands that take RUN_DIR read from its run.json only what is needed to read the run (model, trait,
generation and judging settings). A hostile run.json -- plugins naming a module that writes a marker
file when imported, a judge server URL pointing at a real listener on 127.0.0.1 that records the
Authorization header, its own key variable, a cache folder elsewhere -- gets none of that honoured:
plugins, judge endpoint, key variable and cache come from the command line, the environment or a
``--config`` the user names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from echo_server import EchoServer
from reliability_run import PLUGIN, cli, copy_run, edit_run_json, error_lines, make_run

HOSTILE_SECRET = "sk-hostile-run-json-key-0123456789abcdef"
USER_SECRET = "sk-user-own-key-fedcba9876543210"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_lm):
    return make_run(tmp_path_factory.mktemp("rundir"), tiny_lm)


@pytest.fixture
def hostile(base_run, tmp_path, monkeypatch):
    """A copy of the run whose run.json names a code-running plugin, a judge listener and a cache elsewhere."""
    mods = tmp_path / "mods"
    mods.mkdir()
    marker = tmp_path / "PLUGIN_WAS_IMPORTED"
    (mods / "ph_hostile_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(mods))
    monkeypatch.setenv("PH_HOSTILE_KEY", HOSTILE_SECRET)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for k in [k for k in __import__("os").environ if k.startswith("PERSONA_HARNESS_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)  # no config file is found in the working directory
    run = copy_run(base_run, tmp_path / "run")
    with EchoServer(status=401) as listener:
        edit_run_json(run, plugins=["ph_hostile_plugin"], judge="logprob", judge_base_url=listener.url,
                      judge_api_key_env="PH_HOSTILE_KEY", judge_model="m", cache_dir=str(tmp_path / "hostile_cache"),
                      plugin_config={"hf": {"ignore_eos": True}}, traits_dirs=[str(tmp_path / "nowhere")])
        yield {"run": run, "marker": marker, "listener": listener, "hostile_cache": tmp_path / "hostile_cache",
               "cache": tmp_path / "cache", "tmp": tmp_path}


def _assert_nothing_honoured(h):
    assert not h["marker"].exists(), "a plugin named by run.json was imported"
    assert h["listener"].requests == [], "the judge URL in run.json was contacted"
    assert not h["hostile_cache"].exists(), "the cache_dir in run.json was used"


@pytest.mark.parametrize("argv", [
    ["steer", "{run}", "--layer", "1", "--coef", "1", "--questions", "1", "--max-new-tokens", "2"],
    ["lens", "{run}", "--layer", "1", "-k", "3"],
    ["monitor", "{run}"],
    ["layers", "{run}"],
    ["report", "{run}", "--no-compute"],
    ["export", "{run}", "--format", "pt"],
], ids=lambda a: a[0])
def test_commands_on_a_hostile_run_dir_honour_nothing_it_names(hostile, capsys, argv):
    settings = argv[0] in ("steer", "lens", "monitor", "report")  # commands with the settings flags
    args = [a.format(run=hostile["run"]) for a in argv] + (PLUGIN + ["--cache-dir", hostile["cache"]]) * settings
    args += ["--no-progress"] if argv[0] == "steer" else []
    rc, out, err = cli(args, capsys)
    assert rc == 0, err[-2000:]
    _assert_nothing_honoured(hostile)


def test_sweep_on_a_hostile_run_dir_never_sends_a_key_to_its_judge_url(hostile, capsys):
    """The judge named by run.json (logprob) is kept, its server and key variable are not: without a
    --judge-base-url the default endpoint needs OPENAI_API_KEY, which is unset: a one-line error."""
    rc, out, err = cli(["sweep", hostile["run"], *PLUGIN, "--layers", "1", "--coefs", "1", "--questions", "1",
                        "--max-new-tokens", "2", "--cache-dir", hostile["cache"], "--no-progress"], capsys)
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 1 and "OPENAI_API_KEY is not set" in lines[0], err[-2000:]
    _assert_nothing_honoured(hostile)
    assert HOSTILE_SECRET not in err + out


def test_sweep_sends_the_key_only_where_the_command_line_says(hostile, capsys, monkeypatch):
    monkeypatch.setenv("PH_USER_KEY", USER_SECRET)
    with EchoServer(status=401) as mine:
        rc, out, err = cli(["sweep", hostile["run"], *PLUGIN, "--layers", "1", "--coefs", "1", "--questions", "1",
                            "--max-new-tokens", "2", "--cache-dir", hostile["cache"], "--no-progress",
                            "--judge-base-url", mine.url, "--judge-api-key-env", "PH_USER_KEY"], capsys)
    assert rc == 1 and "refused the request with HTTP 401" in err
    assert mine.requests and {r["authorization"] for r in mine.requests} == {f"Bearer {USER_SECRET}"}
    assert all(HOSTILE_SECRET not in json.dumps(r) for r in mine.requests)
    _assert_nothing_honoured(hostile)
    assert hostile["cache"].is_dir()  # the command line's --cache-dir was used


def test_a_config_file_the_user_names_is_trusted_for_run_dir_commands(hostile, capsys):
    trusted_marker = hostile["tmp"] / "TRUSTED_PLUGIN_IMPORTED"
    (hostile["tmp"] / "mods" / "ph_trusted_plugin.py").write_text(f"open({str(trusted_marker)!r}, 'w').write('x')\n")
    cfg = hostile["tmp"] / "mine.toml"
    cfg.write_text(f'plugins = ["kill_plugin", "ph_trusted_plugin"]\ncache_dir = "{hostile["cache"]}"\n')
    rc, out, err = cli(["lens", hostile["run"], "--layer", "1", "-k", "2", "--config", cfg], capsys)
    assert rc == 0, err[-2000:]
    assert trusted_marker.exists()
    _assert_nothing_honoured(hostile)


def test_every_setting_is_either_read_from_a_run_or_never():
    """A new setting cannot be forgotten: it is in exactly one of the two lists."""
    from harness.analysis.sweep import NOT_FROM_RUN, RUN_SETTINGS
    from harness.core.config import FIELDS

    assert not set(RUN_SETTINGS) & set(NOT_FROM_RUN)
    missing = set(FIELDS) - set(RUN_SETTINGS) - set(NOT_FROM_RUN)
    assert not missing, f"classify {sorted(missing)} in harness/analysis/sweep.py RUN_SETTINGS or NOT_FROM_RUN"
    for name in ("plugins", "plugin_config", "judge_base_url", "judge_api_key_env", "cache_dir"):
        assert name in NOT_FROM_RUN


def test_run_settings_come_from_run_json_and_flags_win(hostile):
    from harness.analysis.sweep import settings_for_run

    s = settings_for_run(hostile["run"], {"temperature": 0.5}, environ={}, cwd=hostile["tmp"])
    assert s.model == "tiny" and s.judge == "logprob" and s.judge_model == "m" and s.temperature == 0.5
    assert s.plugins == () and s.judge_base_url == "" and s.judge_api_key_env == "OPENAI_API_KEY"
    assert s.cache_dir == ".harness_cache" and s.plugin_config == {} and s.traits_dirs == ()
    env = {"PERSONA_HARNESS_CACHE_DIR": "/tmp/from-env", "PERSONA_HARNESS_JUDGE_BASE_URL": "http://127.0.0.1:9/v1"}
    s = settings_for_run(hostile["run"], environ=env, cwd=hostile["tmp"])
    assert s.cache_dir == "/tmp/from-env" and s.judge_base_url == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", float("nan"), "'config.temperature'"),
    ("n_per_question", 0, "'config.n_per_question'"),
    ("splits", ["extract", "bogus"], "unknown split 'bogus'"),
    ("top_p", 7, "'config.top_p'"),
])
def test_bad_values_in_run_json_are_one_line_errors_naming_the_file_and_field(hostile, capsys, field, value, needle):
    rj = hostile["run"] / "run.json"
    data = json.loads(rj.read_text())
    data["config"][field] = value
    rj.write_text(json.dumps(data))  # json.dumps writes NaN as the (invalid) token NaN, as a careless tool would
    rc, out, err = cli(["lens", hostile["run"], *PLUGIN, "--layer", "1"], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and str(rj) in lines[0] and needle in lines[0] and "Fix:" in lines[0], err
    _assert_nothing_honoured(hostile)


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, '{"config": 1', "\xff\xfe garbage"])
def test_broken_run_json_is_a_one_line_error(hostile, capsys, text):
    (hostile["run"] / "run.json").write_bytes(text.encode("latin-1"))
    rc, out, err = cli(["lens", hostile["run"], *PLUGIN, "--layer", "1"], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "run.json" in lines[0] and "Traceback" not in err, err[-2000:]


def test_run_json_never_holds_nan(base_run, tmp_path):
    """Strict JSON: a non-finite number anywhere in a record is written as null."""
    from harness.core.artifacts import atomic_write_json, write_jsonl

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    strict((base_run / "run.json").read_text())
    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}})
    assert strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}}
    write_jsonl(tmp_path / "x.jsonl", [{"s": float("nan")}])
    assert strict((tmp_path / "x.jsonl").read_text()) == {"s": None}
