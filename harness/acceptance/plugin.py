"""pytest plugin (entry point ``pytest11: persona_harness``): ``pytest traits/ --trait NAME``.

Adds the ``--trait`` option family, validates the selection in ``pytest_configure`` (an unknown
trait is a usage error listing the known ones), parametrizes every test that requests the
``trait`` fixture with the selected traits, provides session fixtures that run each pipeline
stage at most once per trait (through the on-disk cache, so a rerun is fast), and reports the
metrics: a per-trait table at the end of the run, JUnit XML properties and a JSON report.

Kept import-light: pytest imports this module at every start wherever the package is installed,
so torch, transformers and the harness pipeline are imported lazily, and nothing happens unless
``--trait`` is given. Never also list it in ``pytest_plugins`` or pass ``-p harness.acceptance.plugin``
(the entry point already registers it; use ``-p persona_harness`` if autoload is disabled).
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

OPS = {">=": lambda x, t: x >= t, "<=": lambda x, t: x <= t, "in": lambda x, t: t[0] <= x <= t[1]}


class _HookSpecs:
    """Hooks this plugin adds to pytest (declared through ``pytest_addhooks``)."""

    @pytest.hookspec(historic=True)
    def pytest_harness_configure(self, pm, config):
        """Called once the harness plugin manager exists; ``pm.register(...)`` your own components.

        Historic: conftests loaded later (``traits/conftest.py``) are called at registration.
        """


def pytest_addhooks(pluginmanager):
    pluginmanager.add_hookspecs(_HookSpecs)


def pytest_addoption(parser):
    g = parser.getgroup("persona-harness", "persona-harness acceptance checks")
    g.addoption("--trait", action="append", default=[], metavar="NAME",
                help="trait to check (repeatable); tests requesting the 'trait' fixture run once per trait")
    # every option but --trait carries the --harness- prefix: this plugin is loaded into every pytest
    # session of an environment that has the package, next to other projects' own --model, --device ...
    g.addoption("--harness-model", default=None, metavar="ID",
                help="model id (default from settings: 'smollm2', the embedded model)")
    g.addoption("--harness-judge", default=None, metavar="NAME", help="judge plugin name (default 'local')")
    g.addoption("--harness-judge-model", default=None, metavar="NAME",
                help="judge model (local: HF id/path; servers: model name)")
    g.addoption("--harness-judge-base-url", default=None, metavar="URL", help="OpenAI-compatible judge endpoint")
    g.addoption("--harness-cache", default=None, metavar="DIR",
                help="generation/judgment cache directory (default <rootdir>/.harness_cache)")
    g.addoption("--harness-run-dir", default=None, metavar="DIR",
                help="each session's run folder is DIR/<model>/<trait>/<run-id>, named by the 'latest' file there "
                     "(default <rootdir>/runs, as the CLI)")
    g.addoption("--harness-traits-dir", action="append", default=[], metavar="DIR",
                help="extra traits directory (repeatable; the ini key harness_traits_dir is searched too)")
    g.addoption("--harness-report", default=None, metavar="PATH",
                help="JSON report path (default <run-dir>/<model>/acceptance.json)")
    g.addoption("--harness-config", default=None, metavar="TOML", help="persona-harness config file")
    g.addoption("--harness-judge-eval", action="store_true",
                help="also judge the evaluation split (adds its score gap to the report; doubles judging)")
    g.addoption("--harness-update-reference", action="store_true",
                help="write the new vector as the trait's reference for this model before the regression check")
    parser.addini("harness_traits_dir", "traits directory, relative to the rootdir", default="traits")
    parser.addini("harness_run_dir", "run directory root, relative to the rootdir", default="runs")


SESSION_KEY: Any = pytest.StashKey()


@dataclass
class CheckRecord:
    trait: str
    check: str
    metrics: list = field(default_factory=list)
    outcome: str = "not run"
    message: str = ""


@dataclass
class HarnessSession:
    """What the plugin keeps for one pytest session (in ``config.stash``)."""

    config: Any
    settings: Any
    pm: Any
    traits: list
    run_root: Path
    report_path: Path
    update_reference: bool = False
    judge_eval: bool = False
    runs: dict = field(default_factory=dict)  # trait -> RunResult
    contexts: dict = field(default_factory=dict)  # trait -> RunContext
    checks: dict = field(default_factory=dict)  # (trait, check) -> CheckRecord
    extra: dict = field(default_factory=dict)  # trait -> {key: value} for the report
    started: float = field(default_factory=time.time)

    def trait_settings(self, trait: str):
        """Settings for one trait's run: a new run folder <run-dir>/<model>/<trait>/<run-id> (run history)."""
        return self.settings.replace(out_dir="", runs_dir=str(self.run_root))


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def pytest_configure(config):
    config.addinivalue_line("markers", "acceptance: persona-harness acceptance check (uses --trait)")
    traits = list(dict.fromkeys(config.getoption("trait") or []))
    if not traits:
        return  # no-op: nothing is imported or built without --trait
    from harness.core.config import load_settings
    from harness.core.errors import HarnessError
    from harness.core.plugins import get_plugin_manager, known_traits

    root = Path(config.rootpath)
    base = Path(config.inipath).parent if config.inipath else root
    dirs = [str(_resolve(Path.cwd(), d)) for d in config.getoption("harness_traits_dir")]
    ini_dir = _resolve(base, config.getini("harness_traits_dir") or "traits")
    if ini_dir.is_dir():
        dirs.append(str(ini_dir))
    flags: dict[str, Any] = {"model": config.getoption("harness_model"), "judge": config.getoption("harness_judge"),
                             "judge_model": config.getoption("harness_judge_model"),
                             "judge_base_url": config.getoption("harness_judge_base_url"), "progress": False}
    try:
        settings = load_settings(flags, config_path=config.getoption("harness_config"), cwd=base)
        settings = settings.replace(traits_dirs=tuple(dirs) + tuple(settings.traits_dirs))
        opt_cache = config.getoption("harness_cache")  # options: relative to the working directory
        cache = _resolve(Path.cwd(), opt_cache) if opt_cache else _resolve(base, settings.cache_dir)
        settings = settings.replace(cache_dir=str(cache))
        pm = get_plugin_manager(modules=settings.plugins)
    except HarnessError as e:
        raise pytest.UsageError(f"persona-harness: {e}") from None
    config.hook.pytest_harness_configure.call_historic(kwargs=dict(pm=pm, config=config))
    known = known_traits(pm, settings)
    unknown = [t for t in traits if t not in known]
    if unknown:
        where = [str(d) for d in settings.traits_dirs]  # besides the trait sources' own places (shipped traits)
        raise pytest.UsageError(
            f"unknown trait(s) {unknown}; known: {known}. Traits are looked up in {where} and the installed "
            "traits (add a folder with --harness-traits-dir or the harness_traits_dir ini key)")
    opt_runs = config.getoption("harness_run_dir")
    run_root = _resolve(Path.cwd(), opt_runs) if opt_runs else _resolve(base, config.getini("harness_run_dir") or "runs")
    from harness.core.pipeline import slug

    report = config.getoption("harness_report")
    report_path = _resolve(Path.cwd(), report) if report else run_root / slug(settings.model) / "acceptance.json"
    config.stash[SESSION_KEY] = HarnessSession(config, settings, pm, traits, run_root, report_path,
                                               update_reference=bool(config.getoption("harness_update_reference")),
                                               judge_eval=bool(config.getoption("harness_judge_eval")))


def _session(config) -> HarnessSession | None:
    return config.stash.get(SESSION_KEY, None)


def pytest_report_header(config):
    hs = _session(config)
    if hs is None:
        return None
    s = hs.settings
    return (f"persona-harness: traits {', '.join(hs.traits)}; model {s.model} (profile {s.profile_applied}); "
            f"judge {s.judge}{' @ ' + s.judge_base_url if s.judge_base_url else ''}; cache {s.cache_dir}; "
            f"runs {hs.run_root}")


def pytest_generate_tests(metafunc):
    """Parametrize tests that request the plugin's ``trait`` fixture with the selected traits."""
    if "trait" not in metafunc.fixturenames:
        return
    fdefs = getattr(metafunc, "_arg2fixturedefs", {}).get("trait") or ()
    if not fdefs or getattr(getattr(fdefs[-1], "func", None), "__module__", None) != __name__:
        return  # the test (or a conftest) defines its own 'trait'
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0] if m.args else ""
        if "trait" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)):
            return
    hs = _session(metafunc.config)
    if hs is not None:
        metafunc.parametrize("trait", hs.traits, indirect=True, scope="session", ids=hs.traits)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness_session(pytestconfig) -> HarnessSession:
    """The plugin's session state: settings, plugin manager, selected traits, results."""
    hs = _session(pytestconfig)
    if hs is None:
        pytest.skip("no --trait given: run e.g. 'pytest traits/ --trait sycophantic' "
                    "('persona-harness traits' lists the known traits)")
    return hs


@pytest.fixture(scope="session")
def trait(request, harness_session) -> str:
    """The trait under test; the plugin parametrizes it with every ``--trait``."""
    if not hasattr(request, "param"):
        pytest.skip("no --trait given")
    return request.param


@pytest.fixture(scope="session")
def harness_settings(harness_session, trait):
    """Settings for this trait's run (run directory <run-dir>/<model>/<trait>)."""
    return harness_session.trait_settings(trait)


@pytest.fixture(scope="session")
def trait_spec(harness_session, trait):
    """The ``TraitSpec`` (instruction pairs, extraction and evaluation questions, rubric, checks)."""
    return harness_session.pm.hook.harness_load_trait(name=trait, settings=harness_session.settings)


@pytest.fixture(scope="session")
def trait_thresholds(harness_session, trait_spec) -> dict:
    """Thresholds for this trait and model: checks.json ``default`` < the model's block."""
    from harness.analysis.checks import thresholds_for

    path = Path(trait_spec.source).parent / "checks.json" if trait_spec.source else "checks.json"
    th = thresholds_for(trait_spec.checks, harness_session.settings.model, path)
    harness_session.extra.setdefault(trait_spec.name, {})["thresholds"] = th
    return th


@pytest.fixture(scope="session")
def trait_run(harness_session, trait_spec, harness_settings):
    """Run the pipeline once per trait: generate -> judge -> filter -> extract on the extraction
    split, plus generations of the evaluation split (for the AUROC check).

    The eval split is only generated (its answers are not judged: no check uses those scores)
    unless ``--harness-judge-eval`` is given, which runs ``run_trait(splits=("extract", "eval"))``
    as one run and adds the eval-split score gap to the report. Everything goes through the
    content-addressed cache, so a rerun only recomputes activations. When the filter keeps no
    pair the result still has generations, judgments and selection (``vectors`` is None).
    """
    from harness.core.errors import NoEffectivePairsError
    from harness.core.pipeline import RunContext, RunResult, run_trait

    name = trait_spec.name
    if name in harness_session.runs:
        return harness_session.runs[name]
    hs, s = harness_session, harness_settings
    ctx = RunContext(settings=s, pm=hs.pm)
    t0 = time.perf_counter()
    main_splits = ("extract", "eval") if hs.judge_eval else ("extract",)
    try:
        res = run_trait(trait_spec, s, pm=hs.pm, ctx=ctx, splits=main_splits)
        timings = dict(ctx.timings)
    except NoEffectivePairsError:
        timings = dict(ctx.timings)  # the failed run's timings; the rerun below is all cache hits
        res = run_trait(trait_spec, s.replace(out_dir=str(ctx.run_dir)), pm=hs.pm, ctx=ctx, splits=main_splits,
                        stages=("generate", "judge", "filter"))  # into the same run folder
    if not hs.judge_eval and trait_spec.eval_questions:
        ev_dir = Path(res.run_dir) / "eval_split"
        ev = run_trait(trait_spec, s.replace(out_dir=str(ev_dir)), pm=hs.pm, ctx=ctx, splits=("eval",),
                       stages=("generate",))
        timings["generate_eval"] = ctx.timings.get("generate")
        res = RunResult(res.trait, res.run_dir, [*res.generations, *ev.generations], res.judgments, res.selection,
                        res.vectors, res.summary)
    hs.runs[name] = res
    hs.contexts[name] = ctx
    ex = hs.extra.setdefault(name, {})
    ex["run_dir"] = str(res.run_dir)
    ex["timings"] = {**timings, "total": round(time.perf_counter() - t0, 3)}
    return res


@pytest.fixture(scope="session")
def trait_generations(trait_run):
    return trait_run.generations


@pytest.fixture(scope="session")
def trait_judgments(trait_run):
    return trait_run.judgments


@pytest.fixture(scope="session")
def trait_selection(trait_run):
    return trait_run.selection


@pytest.fixture(scope="session")
def trait_vectors(trait_run):
    """The new ``VectorSet``; fails the test when the filter kept no effective pair."""
    if trait_run.vectors is None:
        pytest.fail(f"{trait_run.trait.name}: no vector was extracted (the filter kept 0 effective pairs; "
                    f"dropped: {trait_run.selection.dropped if trait_run.selection else '?'})")
    return trait_run.vectors


@pytest.fixture(scope="session")
def trait_vector(trait_vectors):
    """The paper's vector (``response_avg_diff``), a ``[num_layers + 1, hidden]`` tensor."""
    return trait_vectors.tensors["response_avg_diff"]


#: response tokens' activation norms are measured on at most this many evaluation responses
NORM_EXAMPLES = 64


def _eval_means(hs: HarnessSession, trait_name: str, gens: list, neutral: bool) -> dict:
    """Per-example means of ``gens``: under each generation's own prompt (response, prompt-mean and
    last-prompt-token averages), or (``neutral``) re-encoded under the question alone (the chat
    template's default system prompt, shared by pos and neg; response average and the mean per-token
    norm of the responses). Cached under the cache directory, keyed by model, generations and kind."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from harness.analysis.steering import mean_activation_norms
    from harness.core.records import content_hash
    from harness.models.activations import METHODS, example_means
    from harness.models.loading import prompt_ids

    s = hs.trait_settings(trait_name)
    kind = "neutral" if neutral else "in_context"
    methods = ("response_avg",) if neutral else METHODS
    key = content_hash({"model": s.model, "dtype": s.dtype, "gens": [g.cache_key or g.id for g in gens],
                        "methods": list(methods), "prompt": kind, "version": 2})
    path = Path(s.cache_dir) / "activations" / f"{key[:32]}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("key") == key:
                    return {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception:  # a torn or foreign file: recompute and replace it
            pass
    ctx = hs.contexts.get(trait_name)
    if ctx is None:
        from harness.core.pipeline import RunContext

        ctx = hs.contexts[trait_name] = RunContext(settings=s, pm=hs.pm)
    lm = ctx.model()
    ex = [((prompt_ids(lm.tokenizer, [{"role": "user", "content": g.question}]) if neutral else g.prompt_token_ids),
           g.response_token_ids) for g in gens]
    parts: dict[str, list] = {m: [] for m in methods}
    for b in example_means(lm, ex, s.extract_batch_size, methods=methods):
        for m in methods:
            parts[m].append(b[m].cpu())
    out = {m: torch.cat(v, 0).contiguous() for m, v in parts.items()}
    if neutral:
        out["token_norms"] = torch.tensor(mean_activation_norms(lm, ex[:NORM_EXAMPLES], tokens="response",
                                                                batch_size=s.extract_batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{__import__('os').getpid()}.tmp")
    save_file(out, str(tmp), metadata={"key": key, "prompt": kind})
    tmp.replace(path)
    return out


def _eval_set(hs: HarnessSession, run, neutral: bool):
    from harness.analysis.checks import EvalSet

    gens = [g for g in run.generations if g.split == "eval" and g.response_token_ids]
    pos = [g for g in gens if g.polarity == "pos"]
    neg = [g for g in gens if g.polarity == "neg"]
    if not pos or not neg:
        pytest.fail(f"{run.trait.name}: no eval-split generations for both polarities (eval.json missing or "
                    "all responses empty)")
    scores = {j.generation_id: j.score for j in run.judgments if j.metric == run.trait.name}
    P, N = _eval_means(hs, run.trait.name, pos, neutral), _eval_means(hs, run.trait.name, neg, neutral)
    norms = None
    if neutral:  # pooled over pos and neg (weighted by their example counts)
        n_p, n_n = min(len(pos), NORM_EXAMPLES), min(len(neg), NORM_EXAMPLES)
        norms = ((P["token_norms"] * n_p + N["token_norms"] * n_n) / (n_p + n_n)).tolist()
    return EvalSet(pos=P["response_avg"], neg=N["response_avg"],
                   pos_q=[g.question for g in pos], neg_q=[g.question for g in neg],
                   pos_scores=[scores.get(g.id) for g in pos], neg_scores=[scores.get(g.id) for g in neg],
                   methods={m: (P[m], N[m]) for m in ("prompt_avg", "prompt_last") if m in P},
                   token_norms=norms)


@pytest.fixture(scope="session")
def eval_set(harness_session, trait_run):
    """The evaluation split's per-example response means, each re-encoded under the prompt it was
    generated under (``harness.analysis.checks.EvalSet``)."""
    return _eval_set(harness_session, trait_run, neutral=False)


@pytest.fixture(scope="session")
def eval_set_neutral(harness_session, trait_run):
    """The same responses re-encoded under one neutral prompt shared by pos and neg (the question
    alone): what the separation, specificity and correlation checks use."""
    return _eval_set(harness_session, trait_run, neutral=True)


@pytest.fixture(scope="session")
def eval_activations(eval_set) -> dict:
    """``{"pos": [n, L+1, H], "neg": ...}``: in-context response means of the evaluation split."""
    return {"pos": eval_set.pos, "neg": eval_set.neg}


@pytest.fixture(scope="session")
def eval_judged(harness_session, trait_run) -> bool:
    """Whether the evaluation split was judged (``--harness-judge-eval``)."""
    ev = {g.id for g in trait_run.generations if g.split == "eval"}
    return any(j.generation_id in ev and j.score is not None for j in trait_run.judgments)


@pytest.fixture(scope="session")
def trait_norm_peak(trait_vector, eval_set_neutral) -> dict:
    """The norm peak on ||v[l]|| / mean ||h[l]|| (the mean per-token activation norm of evaluation
    responses, labels unused), with the raw peak beside it."""
    from harness.analysis.checks import norm_peak
    from harness.analysis.metrics import layer_norms

    return norm_peak(layer_norms(trait_vector), eval_set_neutral.token_norms)


@pytest.fixture(scope="session")
def check_layer(trait_norm_peak, trait_thresholds) -> int:
    """The layer the checks look at: checks.json ``layer`` ("auto" = the relative-norm peak)."""
    from harness.analysis.checks import check_layer as resolve

    return resolve(trait_thresholds["layer"], trait_norm_peak["peak_layer"], trait_norm_peak["num_layers"])


@pytest.fixture(scope="session")
def other_trait_vectors(harness_session, trait_spec, trait_vector) -> dict:
    """The other installed traits' vectors for this model: the new one of a trait run in this
    session, else its stored reference. Traits with neither are left out."""
    from harness.analysis.checks import REFERENCE_METHOD, load_reference, reference_path
    from harness.core.plugins import known_traits

    hs = harness_session
    out = {}
    for name in known_traits(hs.pm, hs.settings):
        if name == trait_spec.name:
            continue
        run = hs.runs.get(name)
        if run is not None and run.vectors is not None:
            out[name] = run.vectors.tensors[REFERENCE_METHOD]
            continue
        spec = hs.pm.hook.harness_load_trait(name=name, settings=hs.settings)
        path = reference_path(_trait_dir(spec), hs.settings.model) if spec is not None else None
        if path is not None and path.exists():
            ref = load_reference(path)[REFERENCE_METHOD]
            if tuple(ref.shape) == tuple(trait_vector.shape):
                out[name] = ref
    return out


@pytest.fixture(scope="session")
def specificity_matrix(harness_session, trait_spec, trait_vector, other_trait_vectors, eval_set_neutral,
                       check_layer) -> dict:
    """``{"layer": L, "auroc": {vector trait: {eval-split trait: AUROC}}}`` at the check layer, for this
    trait's split and every other trait whose run is in this session (neutral prompt)."""
    from harness.analysis.checks import per_layer_auroc

    hs = harness_session
    vectors = {trait_spec.name: trait_vector, **other_trait_vectors}
    splits = {trait_spec.name: eval_set_neutral}
    for name, run in hs.runs.items():
        if name != trait_spec.name and run.vectors is not None and name in vectors:
            try:
                splits[name] = _eval_set(hs, run, neutral=True)
            except pytest.fail.Exception:
                continue
    matrix = {v: {e: round(per_layer_auroc(ev.pos, ev.neg, vec)[check_layer], 4) for e, ev in splits.items()}
              for v, vec in vectors.items()}
    return {"layer": check_layer, "auroc": matrix}


@pytest.fixture(scope="session")
def reference_vector(harness_session, trait_spec, trait_run):
    """The stored reference (``traits/<name>/reference/<model>.safetensors``) or None.

    With ``--harness-update-reference`` the new vector is written there first.
    """
    from harness.analysis.checks import load_reference, reference_path, save_reference

    path = reference_path(_trait_dir(trait_spec), harness_session.settings.model)
    ex = harness_session.extra.setdefault(trait_spec.name, {})
    ex["reference"] = str(path)
    if harness_session.update_reference and trait_run.vectors is not None:
        save_reference(path, trait_run.vectors, harness_session.trait_settings(trait_spec.name), trait_spec,
                       trait_run.selection)
        ex["reference_updated"] = True
    if not path.exists():
        return None
    return load_reference(path)


@pytest.fixture(scope="session")
def reference_reproducible(harness_session, trait_spec, trait_run, reference_vector) -> tuple[bool, str]:
    """(same, why): whether the reference was made with this trait, these settings and seed (and the
    same model fingerprint, when both record one)."""
    from harness.analysis.checks import reproducible_from

    if reference_vector is None:
        return False, "no reference"
    fp = str(((trait_run.vectors.metadata if trait_run.vectors is not None else None) or {}).get("model_fingerprint", ""))
    return reproducible_from(dict(reference_vector.metadata or {}), harness_session.trait_settings(trait_spec.name),
                             trait_spec.hash, fp)


def _trait_dir(spec) -> Path:
    src = Path(spec.source) if spec.source else Path("traits") / spec.name
    return src.parent if src.name == "extract.json" else src.parent / spec.name


class Acceptance:
    """Records a check's metrics (JUnit XML property + summary table + JSON report)."""

    def __init__(self, hs: HarnessSession, trait: str, check: str, record_property):
        self.hs, self.trait, self.check, self._record = hs, trait, check, record_property
        self.rec = hs.checks.setdefault((trait, check), CheckRecord(trait, check))
        self.rec.metrics = []

    def metric(self, name: str, value: Any, threshold: Any = None, op: str | None = None,
               ci: Any = None) -> bool:
        """Record ``value`` (and its threshold and 95% interval); return whether it passes.

        True when there is no comparison (``op`` None) or the threshold is None: a null threshold in
        checks.json makes the metric informational (reported, ``passed`` None, not enforced). With an
        interval ``ci = [lo, hi]``, a floor (``>=``) is checked on ``lo`` and a ceiling on ``hi``;
        a missing or NaN bound fails.
        """
        import math

        informational = op is not None and threshold is None
        tested = value
        if ci is not None and op in (">=", "<="):
            tested = ci[0] if op == ">=" else ci[1]
        ok_value = tested is not None and not (isinstance(tested, float) and math.isnan(tested))
        passed = True if op is None or informational else (ok_value and bool(OPS[op](tested, threshold)))
        ci = None if ci is None else [None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
                                      for x in ci]
        if isinstance(value, float) and math.isnan(value):
            value = None
        self.rec.metrics.append({"name": name, "value": value, "threshold": threshold, "op": op,
                                 "passed": None if op is None or informational else passed,
                                 **({"ci": ci} if ci is not None else {}),
                                 **({"informational": True} if informational else {})})
        self._record(f"{self.trait}.{self.check}.{name}", value)
        if ci is not None:
            self._record(f"{self.trait}.{self.check}.{name}.ci95", f"{_fmt(ci[0])}..{_fmt(ci[1])}")
        if op is not None:
            self._record(f"{self.trait}.{self.check}.{name}.threshold",
                         "informational" if informational else f"{op} {threshold}")
        return passed

    def info(self, key: str, value: Any) -> None:
        """Extra data for the JSON report only (e.g. the per-layer AUROC table)."""
        self.hs.extra.setdefault(self.trait, {})[key] = value


@pytest.fixture
def acceptance(request, harness_session, trait) -> Acceptance:
    """Metric recorder for the current check; the check name is the test name minus ``test_``.

    Metrics go to ``item.user_properties`` (what ``record_property`` does, without its xunit2
    warning), which ``--junitxml`` writes as ``<property>`` elements of the test case.
    """
    node = request.node
    return Acceptance(harness_session, trait, _check_name(node), lambda k, v: node.user_properties.append((k, v)))


def _check_name(item) -> str:
    name = getattr(item, "originalname", None) or item.name
    return name[5:] if name.startswith("test_") else name


# -- reporting ------------------------------------------------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    hs = _session(item.config)
    rec = None
    if hs is not None and "acceptance" in getattr(item, "fixturenames", ()):
        trait = getattr(getattr(item, "callspec", None), "params", {}).get("trait")
        if trait is not None:
            key = (trait, _check_name(item))
            rec = hs.checks.setdefault(key, CheckRecord(*key))
    if rec is not None and (report.when == "call" or report.outcome != "passed"):
        rec.outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            rec.message = (crash.message if crash is not None else str(report.longrepr)).splitlines()[0][:300]
        elif report.skipped and isinstance(report.longrepr, tuple):
            rec.message = str(report.longrepr[2])[:300]
    return report


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def summary_lines(hs: HarnessSession) -> list[str]:
    """The per-trait table: every metric against its threshold."""
    rows = [("trait", "check", "metric", "value [95% CI]", "threshold", "result")]
    for t in hs.traits:
        for (tr, check), rec in hs.checks.items():
            if tr != t:
                continue
            if not rec.metrics:
                rows.append((t, check, "-", "-", "-", rec.outcome.upper()))
            for m in rec.metrics:
                thr = "" if m["op"] is None else ("none (informational)" if m.get("informational") else
                                                  f"{m['op']} {_fmt(m['threshold'])}")
                res = "info" if m.get("informational") else "" if m["passed"] is None else (
                    "pass" if m["passed"] else "FAIL")
                val = _fmt(m["value"]) + (f" [{_fmt(m['ci'][0])}, {_fmt(m['ci'][1])}]" if m.get("ci") else "")
                rows.append((t, check, m["name"], val, thr, res))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for t in hs.traits:
        table = hs.extra.get(t, {}).get("auroc_per_layer")
        if table:
            lines.append(f"{t}: per-layer AUROC on the eval split, neutral prompt (hidden_states index: AUROC; "
                         "0 = embeddings, last = after final norm)")
            cells = [f"{i:>2}:{a:.2f}" for i, a in enumerate(table)]
            for a in range(0, len(cells), 10):
                lines.append("  " + "  ".join(cells[a:a + 10]))
        ex = hs.extra.get(t, {})
        msgs = [f"{rec.check}: {rec.message}" for (tr, _), rec in hs.checks.items() if tr == t and rec.message]
        if ex.get("reference_updated"):
            lines.append(f"{t}: reference written to {ex.get('reference')}")
        for m in msgs:
            lines.append(f"{t}: {m}")
        if "timings" in ex:
            lines.append(f"{t}: run dir {ex.get('run_dir')}; stage seconds {ex['timings']}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    hs = _session(config)
    if hs is None or not hs.checks:
        return
    s = hs.settings
    terminalreporter.section(f"persona-harness acceptance: model {s.model} (profile {s.profile_applied}), "
                             f"judge {s.judge}")
    for line in summary_lines(hs):
        terminalreporter.write_line(line)
    if hs.extra.get("_report_written"):
        terminalreporter.write_line(f"JSON report: {hs.report_path}")


def build_report(hs: HarnessSession) -> dict:
    from harness import __version__

    s = hs.settings
    traits: dict = {}
    for t in hs.traits:
        ex = {k: v for k, v in hs.extra.get(t, {}).items()}
        checks = {rec.check: {"outcome": rec.outcome, "message": rec.message, "metrics": rec.metrics,
                              "informational": [m["name"] for m in rec.metrics if m.get("informational")]}
                  for (tr, _), rec in hs.checks.items() if tr == t}
        # a check skipped only because a metric is informational (null threshold) does not fail the trait
        traits[t] = {"passed": bool(checks) and all(c["outcome"] == "passed" or c["outcome"] == "skipped"
                                                    and c["informational"] for c in checks.values()),
                     "checks": checks, **ex}
    return {"format": "persona-harness-acceptance/1", "harness_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - hs.started, 1),
            "model": s.model, "profile": s.profile_applied, "judge": s.judge, "judge_model": s.judge_model,
            "judge_base_url": s.judge_base_url,
            "settings": {k: v for k, v in s.to_dict().items() if k not in ("plugin_config",)},
            "traits": traits}


def pytest_sessionfinish(session, exitstatus):
    hs = _session(session.config)
    if hs is None or not hs.checks:
        return
    from harness.core.artifacts import atomic_write_json

    atomic_write_json(hs.report_path, build_report(hs))
    hs.extra["_report_written"] = True
