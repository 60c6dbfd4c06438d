"""Settings: command-line flags > config file > environment (PERSONA_HARNESS_*) > defaults.

Config files: ``--config PATH``, else ``persona-harness.toml`` in the working directory, else the
``[tool.persona-harness]`` table of ``pyproject.toml`` there. Keys are the field names below.
API keys are never settings: judges read them from the environment at call time.

Trust: a file found automatically in the working directory (a repository you just cloned) is not
trusted with what runs code or where the API key goes. Its ``plugins`` is an error (pass
``--config FILE`` to trust the file, or name modules with ``--plugin`` / ``PERSONA_HARNESS_PLUGINS``);
its ``judge_base_url`` is honoured with a ``ConfigWarning`` naming the file and host when the host is
loopback (a server on this machine), and is an error for any other host unless the file is passed
with ``--config`` or the URL is given by ``--judge-base-url`` / ``PERSONA_HARNESS_JUDGE_BASE_URL``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.core.errors import ConfigError

ENV_PREFIX = "PERSONA_HARNESS_"
DEFAULT_MODEL = "smollm2"


class ConfigWarning(UserWarning):
    """A setting from a config file found automatically in the working directory that deserves a look."""


def setting(default: Any, help: str, *, flag: str | None = None, kind: str = "", factory: Any = None) -> Any:
    """A ``Settings`` field with its help text: the one place the CLI, config files and the
    environment learn about it. ``flag``: the command-line spelling (default ``--field-name``;
    ``""`` for no flag); ``kind``: ``append`` (repeatable flag) or ``comma`` (comma list) for tuples."""
    meta = {"help": help, "flag": flag, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    # what to run
    model: str = setting(DEFAULT_MODEL, "HF model id or local path; 'smollm2' (default) is the embedded model")
    generator: str = setting("hf", "generator plugin name (default hf)")
    judge: str = setting("local", "judge plugin name (default local)")
    filter: str = setting("effective-pairs", "filter plugin name (default effective-pairs)")
    extractor: str = setting("mean-diff", "extractor plugin name (default mean-diff)")
    profile: str = setting("auto", "settings profile: auto (per model), paper, embedded")
    # generation
    n_per_question: int = setting(1, "samples per question and instruction")
    temperature: float = setting(1.0, "sampling temperature (0 = greedy)")
    top_p: float = setting(1.0, "nucleus sampling (1 = off)")
    max_new_tokens: int = setting(48, "response length limit")
    seed: int = setting(0, "sampling seed")
    batch_size: int = setting(0, "generation batch size (0 = automatic)")
    pos_name: str = setting("", "assistant name in pos prompts (default: the trait)")
    neg_name: str = setting("helpful", "assistant name in neg prompts (default: helpful)")
    splits: tuple[str, ...] = setting(("extract",), "comma list of question splits to run: extract,eval", kind="comma")
    # judging
    judge_model: str = setting("", "judge model (local: HF id/path, default the model; servers: model name)")
    judge_base_url: str = setting("", "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    judge_api_key_env: str = setting("OPENAI_API_KEY", "NAME of the environment variable holding the judge API key")
    judge_batch_size: int = setting(8, "local judge batch size")
    judge_concurrency: int = setting(8, "judge requests in flight")
    judge_timeout: float = setting(60.0, "seconds per judge request")
    judge_retries: int = setting(4, "judge retries before an item is unscored")
    judge_mode: str = setting("", "instructor mode: tools, json_schema, json, md_json (default per server kind)")
    judge_min_mass: float = setting(-1.0, "min probability on numbers for a logprob score (-1: the judge's default, 0.25)")
    judge_exact: bool = setting(True, "local judge: score every number's full token sequence")
    # filtering (paper defaults)
    trait_threshold: float = setting(50.0, "T: keep pos >= T and neg < 100 - T")
    coherence_threshold: float = setting(50.0, "C: keep pairs with both coherence >= C")
    # extraction
    extract_batch_size: int = setting(8, "extraction batch size")
    # places
    out_dir: str = setting("", "run directory (default runs/<model>/<trait>)", flag="--out")
    cache_dir: str = setting(".harness_cache", "cache directory (default .harness_cache)")
    traits_dirs: tuple[str, ...] = setting((), "extra traits folder (repeatable)", flag="--traits-dir", kind="append")
    trait_files: tuple[str, ...] = setting((), "run a trait from this file (repeatable)", flag="--trait-file",
                                           kind="append")
    # environment
    device: str = setting("auto", "cpu, cuda, cuda:1, auto")
    device_map: str = setting("", "from_pretrained device_map (auto, balanced, ...): one model over this host's "
                                  "GPUs; not under torchrun")
    dtype: str = setting("auto", "float32, bfloat16, float16, auto")
    plugins: tuple[str, ...] = setting((), "load this plugin module (installed, else MODULE.py in the current "
                                           "directory; repeatable)", flag="--plugin", kind="append")
    progress: bool = setting(True, "progress bars")
    plugin_config: dict = setting(None, "per-plugin settings table (config file only)", flag="", factory=dict)
    profile_applied: str = setting("", "the profile apply_profile applied (set by the harness)", flag="")

    def replace(self, **kw: Any) -> Settings:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

#: Named profiles. A model id maps to its profile when ``profile="auto"``.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    # SmolLM2-135M judging itself puts ~1 % of its probability on numbers for the trait rubrics
    # (~12 % for coherence) and rarely scores above 50: its score is the expectation *given* that
    # it writes a number (min mass 0). See README "Embedded-model profile" for the measurements.
    "embedded": {"trait_threshold": 30.0, "coherence_threshold": 30.0, "judge_min_mass": 0.0,
                 "judge_exact": False, "max_new_tokens": 32, "judge_batch_size": 16},
}
MODEL_PROFILES = {"smollm2": "embedded"}


def apply_profile(settings: Settings, explicit: set[str] | None = None) -> Settings:
    """Apply the named (or the model's) profile without overriding explicitly set fields."""
    explicit = explicit or set()
    name = settings.profile
    if name == "auto":
        name = MODEL_PROFILES.get(settings.model, "paper")
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    updates = {k: v for k, v in PROFILES[name].items() if k not in explicit}
    return settings.replace(profile_applied=name, **updates)


def _coerce(name: str, value: Any, source: str) -> Any:
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise TypeError("expected a table")
            return value
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: setting '{name}' = {value!r}: {e}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None


def find_config_file(path: str | None = None, cwd: str | Path = ".") -> tuple[dict[str, Any], str, bool]:
    """(values, file name, explicit): ``explicit`` is True for ``--config PATH``, False for a file
    found automatically in ``cwd`` (``persona-harness.toml``, then ``pyproject.toml``)."""
    if path:
        data = _read_toml(Path(path))
        return data.get("tool", {}).get("persona-harness", data), str(path), True
    cand = Path(cwd) / "persona-harness.toml"
    if cand.exists():
        return _read_toml(cand), str(cand), False
    pyproject = Path(cwd) / "pyproject.toml"
    if pyproject.exists():
        data = _read_toml(pyproject).get("tool", {}).get("persona-harness")
        if data:
            return data, str(pyproject), False
    return {}, "", False


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_discovered_file(values: dict[str, Any], file_name: str, flags: dict[str, Any]) -> None:
    """Refuse what an automatically found config file may not do silently (see the module docstring)."""
    table = "[tool.persona-harness] " if Path(file_name).name == "pyproject.toml" else ""
    if values.get("plugins"):
        raise ConfigError(
            f"{file_name}: {table}setting 'plugins' would import code, and this config file was found "
            "automatically in the working directory, so it is not trusted to do that. "
            f"Fix: pass --config {file_name} to trust this file, or load the modules with --plugin MODULE "
            "(or PERSONA_HARNESS_PLUGINS)")
    url = values.get("judge_base_url")
    if url and flags.get("judge_base_url") is None:
        host = urlparse(str(url)).hostname or str(url)
        if _is_loopback(host):
            warnings.warn(
                f"{file_name}: {table}judge_base_url sends judge requests (with the API key from "
                f"the judge_api_key_env variable, if set) to host {host}; this config file was found "
                f"automatically in the working directory. Pass --config {file_name} to silence this warning",
                ConfigWarning, stacklevel=3)
        else:
            raise ConfigError(
                f"{file_name}: {table}setting 'judge_base_url' would send judge requests and the API key to host "
                f"{host}, and this config file was found automatically in the working directory, so it is not "
                f"trusted to do that. Fix: pass --config {file_name} to trust this file, or give "
                "--judge-base-url URL (or PERSONA_HARNESS_JUDGE_BASE_URL)")


def load_settings(
    flags: dict[str, Any] | None = None,
    *,
    config_path: str | None = None,
    environ: dict[str, str] | None = None,
    cwd: str | Path = ".",
) -> Settings:
    """Merge defaults < environment < config file < flags, then apply the profile."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ and name not in ("plugin_config", "profile_applied"):
            values[name] = _coerce(name, environ[key], f"environment {key}")
            explicit.add(name)
    file_values, file_name, file_explicit = find_config_file(config_path, cwd)
    from_file: dict[str, Any] = {}
    for name, value in file_values.items():
        name = name.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{file_name}: unknown setting '{name}'. Known: {', '.join(sorted(FIELDS))}")
        from_file[name] = values[name] = _coerce(name, value, file_name)
        explicit.add(name)
    if from_file and not file_explicit:
        _check_discovered_file(from_file, file_name, flags or {})
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
        explicit.add(name)
    env_name = str(values.get("judge_api_key_env", "OPENAI_API_KEY"))
    if env_name and (not env_name.replace("_", "a").isalnum() or not env_name.isascii() or env_name[:1].isdigit()):
        # never echo the value: it may be a key typed in the wrong place
        raise ConfigError("judge_api_key_env must be the NAME of an environment variable (letters, digits, '_'), "
                          "not the key itself. Fix: export MY_JUDGE_KEY=...; then --judge-api-key-env MY_JUDGE_KEY")
    return apply_profile(Settings(**values), explicit)
