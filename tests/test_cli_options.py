"""Settings flags are generated from the Settings fields: no setting can be forgotten in the CLI, the
config file or the environment, and each flag carries the field's help text."""

from __future__ import annotations

import pytest

from harness.cli.main import build_parser
from harness.cli.options import flags_from_args, setting_flags
from harness.core.config import FIELDS, load_settings


def _run_parser():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    return sub.choices["run"]


def test_every_setting_with_a_flag_is_on_the_command_line_with_its_help():
    run = _run_parser()
    by_dest = {a.dest: a for a in run._actions}
    flagged = {f.name for _, f in setting_flags()}
    assert flagged == {n for n, f in FIELDS.items() if f.metadata.get("flag") != ""}
    for flag, f in setting_flags():
        a = by_dest[f"set_{f.name}"]
        assert flag in a.option_strings and f.metadata["help"].split(" (")[0] in (a.help or ""), f.name
    # only the harness-internal fields have no flag
    assert {n for n, f in FIELDS.items() if f.metadata.get("flag") == ""} == {"plugin_config", "profile_applied",
                                                                              "profile_set"}


def test_every_field_has_help_text():
    missing = [n for n, f in FIELDS.items() if not f.metadata.get("help")]
    assert not missing, f"settings without help text: {missing} (declare them with harness.core.config.setting)"


@pytest.mark.parametrize("argv, want", [
    (["--max-new-tokens", "7"], {"max_new_tokens": 7}),
    (["--out", "d", "--plugin", "a", "--plugin", "b"], {"out_dir": "d", "plugins": ("a", "b")}),
    (["--no-judge-exact", "--no-progress"], {"judge_exact": False, "progress": False}),
    (["--steer-layer", "20", "--temperature", "0"], {"layer": 20, "temperature": 0.0}),
])
def test_flags_become_settings(argv, want):
    args = _run_parser().parse_args(["--trait", "x", *argv])
    flags = flags_from_args(args)
    assert {k: flags[k] for k in want} == want
    s = load_settings(flags, environ={}, cwd="/")
    assert all(getattr(s, k) == v for k, v in want.items())


def test_every_setting_reads_from_the_environment_and_a_config_file(tmp_path):
    """Each field (but the internal ones) is a PERSONA_HARNESS_<FIELD> variable and a config key."""
    samples = {bool: ("false", False), int: ("3", 3), float: ("0.5", 0.5)}
    for name, f in FIELDS.items():
        if f.metadata.get("flag") == "":
            continue
        default = f.default if not callable(f.default_factory) else f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple) or name in ("model", "judge_model", "device", "device_map", "dtype", "profile",
                                                  "judge_base_url", "judge_api_key_env", "chat_template",
                                                  "judge_mode", "revision", "splits"):
            continue  # values with their own validation rules: covered by their own tests
        raw, want = samples.get(type(default), ("abc", "abc"))
        s = load_settings({}, environ={f"PERSONA_HARNESS_{name.upper()}": raw}, cwd=str(tmp_path))
        assert getattr(s, name) == want, name
        (tmp_path / "persona-harness.toml").write_text(f"{name} = {raw if type(default) in samples else repr(raw)}\n"
                                                       .replace("'", '"'))
        s = load_settings({}, environ={}, cwd=str(tmp_path))
        assert getattr(s, name) == want, name
