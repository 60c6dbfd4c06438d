"""Settings: command-line flags > environment (PERSONA_HARNESS_*) > config file > defaults.

The order pip and most tools use: what you type now beats what your shell exports, which beats
what a checked-in config file says. A profile (``--profile``, or the model's) only fills fields
that none of the three set.

Config files: ``--config PATH``, else ``persona-harness.toml`` in the working directory, else the
``[tool.persona-harness]`` table of ``pyproject.toml`` there. Keys are the field names below.
API keys are never settings: judges read them from the environment at call time.

Trust: a file found automatically in the working directory (a repository you just cloned) is not
trusted with what runs code or where the API key goes. Its ``plugins`` is an error (pass
``--config FILE`` to trust the file, or name modules with ``--plugin`` / ``PERSONA_HARNESS_PLUGINS``);
its ``judge_base_url`` is honoured with a ``ConfigWarning`` naming the file and host when the host is
loopback (a server on this machine), and is an error for any other host unless the file is passed
with ``--config`` or the URL is given by ``--judge-base-url`` / ``PERSONA_HARNESS_JUDGE_BASE_URL``
(which then win over the file's value anyway).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.core.errors import ConfigError
from harness.core.model_ids import EMBEDDED_ID, canonical_model_id

ENV_PREFIX = "PERSONA_HARNESS_"
DEFAULT_MODEL = EMBEDDED_ID


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
    model: str = setting(DEFAULT_MODEL, "HF model id or local path; 'smollm2' (default; also 'smollm2-135m') is the "
                                        "embedded model")
    revision: str = setting("", "hub revision of --model: branch, tag or commit (default: the hub's main)")
    generator: str = setting("auto", "generator plugin name (default auto: fast on CUDA, else hf)")
    judge: str = setting("local", "judge plugin name (default local)")
    filter: str = setting("effective-pairs", "filter plugin name (default effective-pairs)")
    extractor: str = setting("auto", "extractor plugin name (default auto: fast on CUDA, else mean-diff)")
    profile: str = setting("auto", "settings profile: auto (the model's own, else default), default, paper, embedded "
                                   "('persona-harness profiles' lists them)")
    layer: int = setting(0, "layer (hidden_states index) that steer, sweep and monitor use by default; 0 = the "
                            "recommended layer", flag="--steer-layer")
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
    chat_template: str = setting("", "Jinja chat template for --model (a file path or the template text); needed "
                                     "when the model ships none, replaces its own otherwise")
    enable_thinking: bool = setting(False, "let chat templates that read enable_thinking/thinking (Qwen3-style) "
                                           "open a thinking block in generated answers; judging always runs without")
    # judging
    judge_model: str = setting("", "judge model (local: HF id/path, default the model; servers: model name)")
    judge_base_url: str = setting("", "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    judge_api_key_env: str = setting("OPENAI_API_KEY", "NAME of the environment variable holding the judge API key")
    judge_batch_size: int = setting(0, "local judge batch size (0 = automatic: 64 on CUDA, 8 on CPU)")
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
    out_dir: str = setting("", "run directory, written exactly (default: a new RUNS_DIR/<model>/<trait>/<run-id>)",
                           flag="--out")
    runs_dir: str = setting("runs", "run history folder: each run gets RUNS_DIR/<model>/<trait>/<run-id>/ and the "
                                    "'latest' file there names it (default runs)")
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
    profile_set: dict = setting(None, "every value the applied profile set (set by the harness)", flag="", factory=dict)

    def __post_init__(self) -> None:
        # aliases are resolved here, once, before profiles, cache keys and run folders see the id
        self.model = canonical_model_id(self.model)
        if self.judge_model:
            self.judge_model = canonical_model_id(self.judge_model)

    def replace(self, **kw: Any) -> Settings:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

#: Named profiles: the values each sets (fields set explicitly by flag, environment or config file win).
PROFILES: dict[str, dict[str, Any]] = {
    # the Settings defaults, nothing changed
    "default": {},
    # Chen et al. 2025: 10 samples per question and instruction, up to 1000 new tokens, temperature 1,
    # no nucleus cut, effective pairs pos >= 50 / neg < 50 / coherence >= 50, a judge scoring from its
    # first-token log-probabilities (min mass 0.25); see docs/paper.md for every deviation
    "paper": {"n_per_question": 10, "max_new_tokens": 1000, "temperature": 1.0, "top_p": 1.0,
              "trait_threshold": 50.0, "coherence_threshold": 50.0, "judge_min_mass": 0.25},
    # SmolLM2-135M judging itself puts ~1 % of its probability on numbers for the trait rubrics
    # (~12 % for coherence) and rarely scores above 50: its score is the expectation *given* that
    # it writes a number (min mass 0). See docs/method.md "Embedded-model profile" for the measurements.
    "embedded": {"trait_threshold": 30.0, "coherence_threshold": 30.0, "judge_min_mass": 0.0,
                 "judge_exact": False, "max_new_tokens": 32, "judge_batch_size": 16},
}
#: the paper's judge over a server: scores from first-token log-probabilities (set by ``paper`` when
#: a ``judge_base_url`` is given and no judge is named)
PAPER_SERVER_JUDGE = "logprob"
#: the layer the paper projects and steers at, per model (hidden_states index)
PAPER_LAYERS: dict[str, int] = {"Qwen/Qwen2.5-7B-Instruct": 20, "meta-llama/Llama-3.1-8B-Instruct": 16}
#: canonical model id (``harness.core.model_ids.canonical_model_id``) -> profile under ``profile = "auto"``
MODEL_PROFILES = {EMBEDDED_ID: "embedded", **{m: "paper" for m in PAPER_LAYERS}}


def profile_values(name: str, settings: Settings) -> dict[str, Any]:
    """Every value profile ``name`` sets for ``settings`` (model- and endpoint-dependent ones included)."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}. Fix: use auto or one of {', '.join(sorted(PROFILES))}")
    values = dict(PROFILES[name])
    if name == "paper":
        if settings.judge_base_url:
            values["judge"] = PAPER_SERVER_JUDGE
        layer = PAPER_LAYERS.get(canonical_model_id(settings.model))
        if layer is not None:
            values["layer"] = layer
    return values


def apply_profile(settings: Settings, explicit: set[str] | None = None) -> Settings:
    """Apply the named (or, for ``auto``, the model's) profile without overriding explicitly set
    fields; ``profile_applied`` names it and ``profile_set`` holds every value it set."""
    explicit = explicit or set()
    name = settings.profile
    if name == "auto":
        name = MODEL_PROFILES.get(canonical_model_id(settings.model), "default")
    updates = {k: v for k, v in profile_values(name, settings).items() if k not in explicit}
    return settings.replace(profile_applied=name, profile_set=dict(updates), **updates)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def coerce(name: str, value: Any, source: str) -> Any:
    """``value`` (a string from a flag or the environment, or a config-file value) as setting ``name``'s
    type; ``source`` names where it came from in the error."""
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                v = value.strip().lower()
                if v not in _TRUE + _FALSE:
                    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")
                return v in _TRUE
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise TypeError("expected true or false")
            return bool(value)
        if isinstance(value, bool) and isinstance(default, (int, float)):
            raise TypeError("expected a number, not true/false")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected a whole number")
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
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{source}: setting '{name}' = {_shown(value)}: {e}. Fix: give a value like the "
                          f"default ({_shown(default)})") from None


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


def _check_discovered_file(values: dict[str, Any], file_name: str, overridden: set[str]) -> None:
    """Refuse what an automatically found config file may not do silently (see the module docstring).

    ``overridden``: the fields the environment or the command line set (they win over the file)."""
    table = "[tool.persona-harness] " if Path(file_name).name == "pyproject.toml" else ""
    if values.get("plugins"):
        raise ConfigError(
            f"{file_name}: {table}setting 'plugins' would import code, and this config file was found "
            "automatically in the working directory, so it is not trusted to do that. "
            f"Fix: pass --config {file_name} to trust this file, or load the modules with --plugin MODULE "
            "(or PERSONA_HARNESS_PLUGINS)")
    url = values.get("judge_base_url")
    if url and "judge_base_url" not in overridden:
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
    """Merge defaults < config file < environment < flags (later wins), then apply the profile.

    ``flags``: field -> value from the command line (None = not given); ``config_path``: the
    ``--config`` file (else one found in ``cwd``); ``environ``: the ``PERSONA_HARNESS_<FIELD>``
    variables (default ``os.environ``). Every field set by any of the three counts as explicit, so
    the profile never overrides it.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    sources: dict[str, str] = {}
    file_values, file_name, file_explicit = find_config_file(config_path, cwd)
    from_file: dict[str, Any] = {}
    for name, value in file_values.items():
        name = name.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{file_name}: unknown setting '{name}'. Known: {', '.join(sorted(FIELDS))}")
        from_file[name] = values[name] = coerce(name, value, file_name)
        explicit.add(name)
        sources[name] = f"{file_name}: field '{name}'"
    overridden: set[str] = set()
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ and name not in ("plugin_config", "profile_applied", "profile_set"):
            values[name] = coerce(name, environ[key], f"environment {key}")
            explicit.add(name)
            sources[name] = f"environment variable {key}"
            overridden.add(name)
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = coerce(name, value, flag_of(name))
        explicit.add(name)
        sources[name] = flag_of(name)
        overridden.add(name)
    if from_file and not file_explicit:
        _check_discovered_file({k: v for k, v in from_file.items() if k not in overridden}, file_name, overridden)
    validate_settings(values, sources, environ=environ)  # before Settings() sees the values
    settings = apply_profile(Settings(**values), explicit)
    validate_settings(settings, sources, environ=environ)
    return settings


# -- validation -----------------------------------------------------------------------------------
#: splits a trait has, devices and dtypes a model loads with
SPLITS = ("extract", "eval")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")
_INT_MAX = 2**31 - 1
#: field -> (min, max, what it is, how to fix): numbers must be finite and inside [min, max]
_RANGES: dict[str, tuple[float, float, str]] = {
    "n_per_question": (1, _INT_MAX, "a count of samples"),
    "max_new_tokens": (1, _INT_MAX, "a length in tokens"),
    "batch_size": (0, _INT_MAX, "a batch size (0 = automatic)"),
    "judge_batch_size": (0, _INT_MAX, "a batch size (0 = automatic)"),
    "judge_concurrency": (1, _INT_MAX, "a number of requests in flight"),
    "judge_retries": (0, 1000, "a number of retries"),
    "extract_batch_size": (1, _INT_MAX, "a batch size"),
    "seed": (0, 2**63 - 1, "a seed"),
    "layer": (0, 100_000, "a layer (hidden_states index; 0 = the recommended layer)"),
    "temperature": (0.0, 1e6, "a sampling temperature (0 = greedy)"),
    "top_p": (0.0, 1.0, "a probability"),
    "judge_timeout": (1e-3, 1e6, "a number of seconds"),
    "trait_threshold": (0.0, 100.0, "a score threshold on the 0-100 scale"),
    "coherence_threshold": (0.0, 100.0, "a score threshold on the 0-100 scale"),
    "judge_min_mass": (-1.0, 1.0, "a probability (or -1 for the judge's default)"),
}


def flag_of(name: str) -> str:
    """The command-line spelling of a setting (``--out`` for ``out_dir``)."""
    flag = FIELDS[name].metadata.get("flag") if name in FIELDS else None
    return flag or f"--{name.replace('_', '-')}"


def _shown(value: Any) -> str:
    """A value as it may appear in a message (never a key-shaped judge_api_key_env: see below)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _not_text(value: str) -> int | None:
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def setting_problem(name: str, value: Any, environ: Any = None) -> str | None:
    """What is wrong with ``value`` for setting ``name`` (problem and fix), or None when it is valid."""
    from harness.core.redact import is_env_var_name

    texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
        if isinstance(value, (tuple, list)) else []
    for t in texts:
        at = _not_text(t)
        if at is not None:
            return ("holds a character that is not valid Unicode at position "
                    f"{at} (a lone surrogate, e.g. from bytes that are not UTF-8). Fix: pass UTF-8 text")
    if name == "judge_api_key_env":
        env = os.environ if environ is None else environ
        ok = isinstance(value, str) and bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value or "_")) and (
            not value or is_env_var_name(value) or value in env)
        if not ok:  # never echo the value: it may be the key itself, typed in the wrong place
            return ("must be the NAME of an environment variable (upper-case letters, digits and '_', such as "
                    "OPENAI_API_KEY), not the key itself; the value given is not repeated here. "
                    "Fix: export MY_JUDGE_KEY=...; then --judge-api-key-env MY_JUDGE_KEY")
        return None
    if name in _RANGES:
        lo, hi, what = _RANGES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"= {_shown(value)} is not a number. Fix: give {what}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"= {value} is not a finite number. Fix: give {what} between {_num(lo)} and {_num(hi)}"
        if not lo <= value <= hi:
            if name == "judge_min_mass" and value < 0 and value != -1:
                return f"= {value:g} is out of range. Fix: give a probability 0..1, or -1 for the judge's default"
            return f"= {_num(value)} is out of range. Fix: give {what} between {_num(lo)} and {_num(hi)}"
        if name == "judge_min_mass" and -1 < value < 0:
            return f"= {value:g} is out of range. Fix: give a probability 0..1, or -1 for the judge's default"
        return None
    if name == "splits":
        bad = [x for x in value if x not in SPLITS]
        if bad or not value:
            return (f"= {','.join(value) or '(empty)'}: " + (f"unknown split {bad[0]!r}" if bad else "no split")
                    + f". Fix: a comma list of {', '.join(SPLITS)}")
        if len(set(value)) != len(value):
            return f"= {','.join(value)} names a split twice. Fix: name each split once"
        return None
    if name == "device":
        if not _DEVICE.match(value or ""):
            return f"= {_shown(value)} is not a known device. Fix: use cpu, cuda, cuda:N, mps or auto"
        return None
    if name == "dtype":
        if value not in DTYPES:
            return f"= {_shown(value)} is not a known dtype. Fix: use float32, bfloat16, float16 or auto"
        return None
    if name == "profile":
        if value != "auto" and value not in PROFILES:
            return f"= {_shown(value)} is not a profile. Fix: use auto or one of {', '.join(sorted(PROFILES))}"
        return None
    if name == "judge_base_url" and value:
        u = urlparse(value)
        if u.scheme not in ("http", "https") or not u.hostname or any(c.isspace() for c in value):
            return f"= {_shown(value)} is not an http(s) URL. Fix: give e.g. http://127.0.0.1:8000/v1"
        return None
    if name in ("generator", "judge", "filter", "extractor") and not value:
        return "is empty. Fix: name a plugin (see 'persona-harness plugins')"
    return None


def validate_settings(settings: Settings | dict, sources: dict[str, str] | None = None, *,
                      environ: Any = None) -> None:
    """One check of every setting before any model loads; the first problem is a ``ConfigError``
    naming where the value came from (flag, environment variable, config file and field, run.json)."""
    values = settings.to_dict() if isinstance(settings, Settings) else settings
    sources = sources or {}
    for name, value in values.items():
        if name not in FIELDS:
            continue
        problem = setting_problem(name, value, environ)
        if problem is not None:
            where = sources.get(name) or ("profile " + str(values.get("profile_applied")) if values.get(
                "profile_applied") else "default")
            sep = " " if problem.startswith("=") else ": "
            raise ConfigError(f"{where}: setting '{name}'{sep}{problem}")
