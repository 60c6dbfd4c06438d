"""A config file found automatically in the working directory (``persona-harness.toml`` or
``[tool.persona-harness]`` in ``pyproject.toml``) cannot import code or send the API key elsewhere
silently: ``plugins`` is honoured only from ``--config FILE``, ``--plugin`` or the environment;
``judge_base_url`` needs ``--config`` unless its host is loopback, which gets a warning naming the
file and the host."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from harness.core.config import ConfigWarning, load_settings
from harness.core.errors import ConfigError


def _toml(tmp_path: Path, text: str, name: str = "persona-harness.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- plugins --------------------------------------------------------------------------------------
def test_discovered_file_with_plugins_is_refused_naming_file_field_and_fix(tmp_path):
    cfg = _toml(tmp_path, 'plugins = ["evil_module"]\nmax_new_tokens = 8\n')
    with pytest.raises(ConfigError) as ei:
        load_settings({}, environ={}, cwd=tmp_path)
    msg = str(ei.value)
    assert str(cfg) in msg and "'plugins'" in msg and "found automatically" in msg
    assert f"--config {cfg}" in msg and "--plugin" in msg


def test_discovered_pyproject_with_plugins_is_refused(tmp_path):
    cfg = _toml(tmp_path, '[project]\nname = "x"\n[tool.persona-harness]\nplugins = ["evil_module"]\n',
                "pyproject.toml")
    with pytest.raises(ConfigError, match=r"pyproject\.toml: \[tool\.persona-harness\] setting 'plugins'") as ei:
        load_settings({}, environ={}, cwd=tmp_path)
    assert f"--config {cfg}" in str(ei.value)


def test_plugins_are_honoured_from_an_explicit_config_file(tmp_path):
    cfg = _toml(tmp_path, 'plugins = ["some_module"]\n')
    s = load_settings({}, config_path=str(cfg), environ={}, cwd=tmp_path / "elsewhere")
    assert s.plugins == ("some_module",)
    # passing the automatically found file itself with --config is how to trust it
    s = load_settings({}, config_path=str(cfg), environ={}, cwd=tmp_path)
    assert s.plugins == ("some_module",)


def test_plugins_from_flags_and_environment_are_honoured(tmp_path):
    assert load_settings({"plugins": ("a_mod",)}, environ={}, cwd=tmp_path).plugins == ("a_mod",)
    env = {"PERSONA_HARNESS_PLUGINS": "b_mod,c_mod"}
    assert load_settings({}, environ=env, cwd=tmp_path).plugins == ("b_mod", "c_mod")


def test_discovered_file_without_plugins_still_works(tmp_path):
    _toml(tmp_path, 'max_new_tokens = 8\nplugins = []\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_settings({}, environ={}, cwd=tmp_path).max_new_tokens == 8


def test_cli_does_not_import_a_plugin_named_by_a_discovered_file(tmp_path):
    """End to end: the module would write a marker when imported; the CLI refuses before that."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_plugin_mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _toml(tmp_path, 'plugins = ["evil_plugin_mod"]\n')
    exe = Path(sys.executable).with_name("persona-harness")
    if not exe.exists():
        pytest.skip("the persona-harness console script is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_HARNESS_")}
    env["PYTHONPATH"] = str(tmp_path)  # importable if anything tried
    r = subprocess.run([str(exe), "plugins"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "persona-harness.toml" in r.stderr and "'plugins'" in r.stderr and "--config" in r.stderr
    assert not marker.exists()


# -- judge_base_url -------------------------------------------------------------------------------
def test_discovered_remote_judge_base_url_is_refused_naming_file_and_host(tmp_path):
    cfg = _toml(tmp_path, 'judge_base_url = "https://judge.attacker.example/v1"\n')
    with pytest.raises(ConfigError) as ei:
        load_settings({}, environ={}, cwd=tmp_path)
    msg = str(ei.value)
    assert str(cfg) in msg and "judge_base_url" in msg and "judge.attacker.example" in msg
    assert f"--config {cfg}" in msg and "--judge-base-url" in msg


def test_remote_judge_base_url_from_explicit_config_flag_or_env_is_honoured(tmp_path):
    url = "https://vllm.internal.example/v1"
    cfg = _toml(tmp_path, f'judge_base_url = "{url}"\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_settings({}, config_path=str(cfg), environ={}, cwd=tmp_path).judge_base_url == url
        # a flag overrides the file's value: nothing from the file is used, nothing to refuse
        s = load_settings({"judge_base_url": "http://127.0.0.1:8080/v1"}, environ={}, cwd=tmp_path)
        assert s.judge_base_url == "http://127.0.0.1:8080/v1"
        (tmp_path / "clean").mkdir()
        s = load_settings({}, environ={"PERSONA_HARNESS_JUDGE_BASE_URL": url}, cwd=tmp_path / "clean")
        assert s.judge_base_url == url
        # the environment beats the discovered file too: the file's remote URL is not used, nothing to refuse
        s = load_settings({}, environ={"PERSONA_HARNESS_JUDGE_BASE_URL": "http://127.0.0.1:8080/v1"}, cwd=tmp_path)
        assert s.judge_base_url == "http://127.0.0.1:8080/v1"


@pytest.mark.parametrize("url,host", [("http://127.0.0.1:8080/v1", "127.0.0.1"), ("http://localhost:8000/v1", "localhost"),
                                      ("http://[::1]:8000/v1", "::1")])
def test_discovered_loopback_judge_base_url_warns_naming_file_and_host(tmp_path, url, host):
    cfg = _toml(tmp_path, f'[tool.persona-harness]\njudge_base_url = "{url}"\n', "pyproject.toml")
    with pytest.warns(ConfigWarning) as rec:
        s = load_settings({}, environ={}, cwd=tmp_path)
    assert s.judge_base_url == url
    msg = str(rec[0].message)
    assert str(cfg) in msg and f"host {host}" in msg and "--config" in msg


def test_private_network_host_is_not_loopback(tmp_path):
    _toml(tmp_path, 'judge_base_url = "http://192.168.1.20:8000/v1"\n')
    with pytest.raises(ConfigError, match="192.168.1.20"):
        load_settings({}, environ={}, cwd=tmp_path)
