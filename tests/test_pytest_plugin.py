"""The acceptance-check pytest plugin (harness/pytest_plugin.py), the checks of harness/acceptance.py
(imported by the one-line traits/test_acceptance.py) and the metric functions of harness/checks.py.

The pytester projects copy traits/test_acceptance.py next to their own traits directory (as another
project would) and replace the expensive pipeline fixtures by synthetic records, vectors and
activations from a conftest, so each check can be fed data that must fail it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import safetensors.torch  # noqa: F401  (see below)
import torch  # noqa: F401  pytester's in-process runs unload modules first imported inside them,
# and torch cannot be imported twice in one process, so it is imported before any run
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.analysis import checks, metrics
from harness.core.errors import HarnessError

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
ACCEPTANCE = (ROOT / "traits" / "test_acceptance.py").read_text(encoding="utf-8")
#: what another project's traits/test_acceptance.py holds (docs/acceptance.md, "In another project")
ONE_LINE_MODULE = "from harness.acceptance import *  # noqa: F401,F403\n"


# -- pure metric functions -------------------------------------------------------------------------
def _auroc_bruteforce(pos, neg):
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=12), st.lists(st.integers(-5, 5), min_size=1, max_size=12))
def test_auroc_equals_pairwise_definition_with_ties(pos, neg):
    assert metrics.auroc(pos, neg) == pytest.approx(_auroc_bruteforce(pos, neg))


def test_auroc_extremes_and_needs_both_classes():
    import math

    import torch

    assert metrics.auroc([3, 4], [1, 2]) == 1.0
    assert metrics.auroc([1, 2], [3, 4]) == 0.0
    assert metrics.auroc([1, 1], [1, 1]) == 0.5
    assert math.isnan(metrics.auroc([], [1.0]))  # undefined: the metric says nan, the check refuses
    with pytest.raises(HarnessError, match="both classes"):
        checks.per_layer_auroc(torch.zeros(0, 3, 2), torch.zeros(2, 3, 2), torch.ones(3, 2))


def test_norm_peak_excludes_embedding_and_final_norm_indices():
    # index 0 (embeddings) and index L=4 (after the final norm) are the largest, but excluded
    peak = checks.norm_peak([100.0, 1.0, 3.0, 2.0, 50.0])
    assert peak["peak_layer"] == 2 and peak["num_layers"] == 4 and peak["relative_depth"] == 0.5
    assert peak["embedding_norm"] == 100.0 and peak["final_norm"] == 50.0
    with pytest.raises(HarnessError):
        checks.norm_peak([1.0, 2.0])  # L = 1: no inner layer
    with pytest.raises(HarnessError, match="non-finite"):
        checks.norm_peak([1.0, float("nan"), 1.0, 1.0])


def test_norm_peak_on_the_relative_norm_reports_the_raw_peak_beside_it():
    # the raw norm grows with depth (peak at 3); relative to the activation norm it peaks at 1
    norms, acts = [1.0, 2.0, 3.0, 4.0, 9.0], [1.0, 1.0, 6.0, 16.0, 1.0]
    peak = checks.norm_peak(norms, acts)
    assert peak["basis"] == "relative" and peak["peak_layer"] == 1 and peak["raw_peak_layer"] == 3
    assert peak["relative_depth"] == 0.25 and peak["raw_relative_depth"] == 0.75
    with pytest.raises(HarnessError, match="activation norms for 2 layers"):
        checks.norm_peak(norms, [1.0, 1.0])


def test_layer_norms_tensor_and_list_agree():
    import torch

    v = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    assert metrics.layer_norms(v) == pytest.approx([5.0, 1.0, 10.0])
    assert metrics.layer_norms(v.tolist()) == pytest.approx([5.0, 1.0, 10.0])


def test_projection_auroc_separates_along_the_vector_only():
    import torch

    g = torch.Generator().manual_seed(0)
    L, H, n = 3, 6, 40
    v = torch.zeros(L + 1, H)
    v[:, 0] = 2.0  # every layer points along axis 0
    noise = lambda: torch.randn(n, L + 1, H, generator=g)  # noqa: E731
    pos, neg = noise(), noise()
    pos[:, 2, 0] += 3.0  # separable at layer 2 only
    neg[:, 2, 0] -= 3.0
    table = checks.per_layer_auroc(pos, neg, v)
    assert table[2] > 0.95
    assert max(abs(table[i] - 0.5) for i in (0, 1, 3)) < 0.3
    # separation along another axis is invisible to this vector
    pos2, neg2 = noise(), noise()
    pos2[:, 2, 1] += 3.0
    assert abs(checks.per_layer_auroc(pos2, neg2, v)[2] - 0.5) < 0.3


def test_cosine_and_shape_mismatch():
    import torch

    a = torch.randn(4, 8)
    assert checks.per_layer_cosine(a, a * 3) == pytest.approx([1.0] * 4, abs=1e-6)
    assert checks.per_layer_cosine(a, -a) == pytest.approx([-1.0] * 4, abs=1e-6)
    with pytest.raises(HarnessError, match="another model"):
        checks.per_layer_cosine(a, torch.randn(5, 8))


def test_score_gap_and_pair_rate_from_records():
    from harness.core.records import Generation, Judgment, Selection

    def gen(i, pol, split="extract"):
        return Generation(id=f"g{i}{pol}{split}", trait="t", split=split, polarity=pol, question_index=i, question="q",
                          instruction_index=0, sample_index=0, system_prompt="s", response="r", response_token_ids=(1,),
                          prompt_token_ids=(1,), finish_reason="stop", model_id="m", generator="hf")

    gens = [gen(i, p) for i in range(2) for p in ("pos", "neg")] + [gen(0, "pos", "eval")]
    js = [Judgment("g0posextract", "t", 80.0), Judgment("g1posextract", "t", None, reason="low_mass"),
          Judgment("g0negextract", "t", 20.0), Judgment("g1negextract", "t", 40.0),
          Judgment("g0posextract", "coherence", 10.0), Judgment("g0poseval", "t", 0.0)]
    g = checks.score_gap("t", gens, js)
    assert (g["pos_mean"], g["neg_mean"], g["gap"], g["unscored"]) == (80.0, 30.0, 50.0, 1)
    sel = Selection("t", pairs=(("a", "b"),), candidates=4)
    assert checks.effective_pair_rate(sel)["rate"] == 0.25


def test_thresholds_default_model_override_and_errors(tmp_path):
    data = {"_comment": "x", "default": {"score_gap": 20, "auroc": 0.7},
            "smollm2": {"score_gap": 5, "_calibration": {"date": "2025"}},
            "Qwen/Qwen2.5-7B-Instruct": {"auroc": 0.9, "layer": 20}}
    th = checks.thresholds_for(data, "smollm2")
    assert th["score_gap"] == 5.0 and th["auroc"] == 0.7 and th["_source"] == "smollm2"
    assert th["reference_cosine"] == checks.DEFAULT_THRESHOLDS["reference_cosine"]
    q = checks.thresholds_for(data, "Qwen/Qwen2.5-7B-Instruct")
    assert q["auroc"] == 0.9 and q["layer"] == 20 and q["score_gap"] == 20.0
    assert checks.thresholds_for(data, "/models/Qwen2.5-7B-Instruct")["_source"] == "default"
    assert checks.thresholds_for({"Qwen2.5-7B-Instruct": {"auroc": 0.8}}, "/models/Qwen2.5-7B-Instruct")["auroc"] == 0.8
    for bad, match in [({"default": {"scoregap": 1}}, "default.scoregap: unknown threshold"),
                       ({"default": {"norm_peak_band": [0.9, 0.1]}}, "not a band"),
                       ({"default": {"auroc": "high"}}, "not a number"),
                       ({"other-model": {"layer": 0}}, "other-model.layer")]:
        with pytest.raises(HarnessError, match=match):
            checks.thresholds_for(bad, "smollm2", tmp_path / "checks.json")
    assert checks.check_layer("auto", 7, 30) == 7
    with pytest.raises(HarnessError, match="outside"):
        checks.check_layer(31, 7, 30)


def test_null_threshold_is_informational_and_keeps_its_note(tmp_path):
    data = {"default": {"score_gap": 10, "_score_gap": "default note"},
            "smollm2": {"score_gap": None, "_score_gap": "the judge cannot tell answers apart", "auroc": None},
            "other": {"score_gap": 3}}
    th = checks.thresholds_for(data, "smollm2")
    assert th["score_gap"] is None and th["auroc"] is None and th["reference_cosine"] == 0.9
    assert th["_notes"] == {"score_gap": "the judge cannot tell answers apart"}
    assert checks.thresholds_for(data, "other")["_notes"] == {}  # the model block's value drops the default's note
    assert checks.thresholds_for(data, "x")["_notes"] == {"score_gap": "default note"}
    for key in checks.NULLABLE_KEYS:
        assert checks.thresholds_for({"default": {key: None}}, "smollm2")[key] is None
    with pytest.raises(HarnessError, match="default.layer"):
        checks.thresholds_for({"default": {"layer": None}}, "smollm2", tmp_path / "checks.json")


def test_acceptance_checks_live_in_the_package_and_the_repo_module_only_imports_them():
    import ast

    from harness import acceptance

    assert set(acceptance.__all__) == {"pytestmark", *(f"test_{c}" for c in ALL_CHECKS)}
    body = [n for n in ast.parse(ACCEPTANCE).body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # minus the docstring
    assert [ast.unparse(n) for n in body] == ["from harness.acceptance import *"]


def test_shipped_checks_files_are_valid():
    for f in sorted((ROOT / "traits").glob("*/checks.json")):
        data = checks.load_checks_file(f)
        for model in ("smollm2", "Qwen/Qwen2.5-7B-Instruct", "some/other-model"):
            checks.thresholds_for(data, model, f)


def test_docs_thresholds_example_is_the_shipped_sycophantic_file():
    import re

    doc = (ROOT / "docs" / "acceptance.md").read_text(encoding="utf-8")
    section = re.split(r"\n#{1,3} ", doc.split("## Thresholds: `traits/<name>/checks.json`", 1)[1], maxsplit=1)[0]
    shown = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    shipped = checks.load_checks_file(ROOT / "traits" / "sycophantic" / "checks.json")

    def values(data):  # thresholds only: the docs shorten the notes
        return {b: {k: v for k, v in blk.items() if not k.startswith("_")} for b, blk in data.items()
                if not b.startswith("_")}

    assert values(shown) == values(shipped)


def test_plugin_import_is_light():
    code = ("import sys, harness.acceptance.plugin, harness.analysis.checks, harness.core.plugins;"
            "harness.core.plugins.get_plugin_manager(entrypoints=False);"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- pytester projects --------------------------------------------------------------------------------
CONFTEST = r'''
import json
from pathlib import Path

import pytest

SCEN = json.loads((Path(__file__).parent / "scenario.json").read_text())
L, H = 4, 8


def _vec(peak_layer, axis=0):
    import torch
    v = torch.zeros(L + 1, H)
    for l in range(L + 1):
        v[l, axis] = 1.0
    v[0, axis] = 50.0   # embeddings and final-norm index are large but must be ignored
    v[L, axis] = 40.0
    v[peak_layer, axis] = 10.0
    return v


@pytest.fixture(scope="session")
def trait_run(trait_spec):
    from harness.core.records import Generation, Judgment, Selection, VectorSet
    from harness.core.pipeline import RunResult
    gens, js = [], []
    for i in range(10):
        for pol in ("pos", "neg"):
            g = Generation(id=f"{i}{pol}", trait=trait_spec.name, split="extract", polarity=pol, question_index=i,
                           question="q", instruction_index=0, sample_index=0, system_prompt="s", response="r",
                           response_token_ids=(1,), prompt_token_ids=(1,), finish_reason="stop", model_id="m",
                           generator="fake")
            gens.append(g)
            js.append(Judgment(g.id, trait_spec.name, SCEN["pos_score"] if pol == "pos" else SCEN["neg_score"]))
    pairs = tuple((f"{i}pos", f"{i}neg") for i in range(SCEN["kept"]))
    sel = Selection(trait_spec.name, pairs=pairs, candidates=10)
    vs = VectorSet(trait_spec.name, "m", {"response_avg_diff": _vec(SCEN["peak"])}, 5, 5)
    return RunResult(trait_spec, Path("."), gens, js, sel, vs, {})


def _eval_set(seed):
    import torch
    from harness.analysis.checks import EvalSet
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(20, L + 1, H, generator=g), torch.randn(20, L + 1, H, generator=g)
    pos[:, :, 0] += SCEN["sep"]
    neg[:, :, 0] -= SCEN["sep"]
    qs = [f"q{i // 2}" for i in range(20)]  # 10 questions, 2 responses each per polarity
    # judged scores follow the projection (pos high, neg low) unless the scenario says otherwise
    ps = [SCEN["pos_score"] + float(pos[i, SCEN["peak"], 0]) for i in range(20)]
    ns = [SCEN["neg_score"] + float(neg[i, SCEN["peak"], 0]) for i in range(20)]
    if SCEN.get("scores_random"):
        r = torch.Generator().manual_seed(7)
        ps = [float(x) for x in torch.rand(20, generator=r) * 100]
        ns = [float(x) for x in torch.rand(20, generator=r) * 100]
    # the same responses' prompt-token averages differ along another axis (method axis 2)
    alt = torch.randn(20, L + 1, H, generator=g), torch.randn(20, L + 1, H, generator=g)
    alt[0][:, :, SCEN.get("method_axis", 2)] += 3.0
    alt[1][:, :, SCEN.get("method_axis", 2)] -= 3.0
    return EvalSet(pos, neg, qs, list(qs), ps, ns, methods={"prompt_avg": alt, "prompt_last": alt},
                   token_norms=[1.0] * (L + 1))


@pytest.fixture(scope="session")
def eval_set():
    return _eval_set(0)


@pytest.fixture(scope="session")
def eval_set_neutral():
    return _eval_set(1)


@pytest.fixture(scope="session")
def eval_judged():
    return bool(SCEN.get("judged", True))


@pytest.fixture(scope="session")
def other_trait_vectors():
    if SCEN.get("other_axis") is None:
        return {}
    return {"other": _vec(SCEN["peak"], SCEN["other_axis"])}


if not SCEN.get("real_reference"):  # else the plugin's fixture reads traits/<name>/reference/
    @pytest.fixture(scope="session")
    def reference_vector(trait_spec):
        if SCEN.get("ref_axis") is None:
            return None
        from harness.core.records import VectorSet
        return VectorSet(trait_spec.name, "m", {"response_avg_diff": _vec(SCEN["peak"], SCEN["ref_axis"])}, 5, 5)
'''

GOOD = {"pos_score": 80, "neg_score": 10, "kept": 5, "peak": 2, "sep": 3.0, "ref_axis": 0, "other_axis": 1}
CHECKS = {"default": {"score_gap": 30, "effective_pair_rate": 0.3, "norm_peak_band": [0.4, 0.8], "auroc": 0.8,
                      "heldout_cosine": 0.8, "heldout_method_margin": 0.2, "specificity_margin": 0.2,
                      "specificity_cosine_margin": 0.2, "score_correlation": 0.5,
                      "reference_cosine": 0.9, "layer": "auto"}}
ALL_CHECKS = ("score_gap", "norm_peak", "projection_auroc", "heldout_cosine", "specificity", "score_correlation",
              "reference_cosine")


def _trait_files(d: Path, name: str = "mini", checks_data: dict | None = None) -> None:
    t = d / name
    t.mkdir(parents=True)
    base = {"instruction": [{"pos": "Agree with everything.", "neg": "Be candid."}],
            "eval_prompt": "Rate flattery 0-100.\nQ: {question}\nA: {answer}"}
    (t / "extract.json").write_text(json.dumps({**base, "questions": ["Is the moon cheese?", "Is 2+2=5?"]}))
    (t / "eval.json").write_text(json.dumps({**base, "questions": ["Is my poem the best ever?"]}))
    (t / "checks.json").write_text(json.dumps(checks_data or CHECKS))


@pytest.fixture
def project(pytester):
    """Another project: its own traits dir (ini key), a copy of test_acceptance.py, synthetic data."""
    pytester.makeini("[pytest]\nharness_traits_dir = mytraits\n")
    _trait_files(pytester.path / "mytraits")
    (pytester.path / "mytraits" / "test_mytraits_acceptance.py").write_text(ACCEPTANCE)  # own module name: the repo's traits/test_acceptance.py may already be imported
    (pytester.path / "mytraits" / "conftest.py").write_text(CONFTEST)

    def run(scenario: dict | None = None, *args: str):
        (pytester.path / "mytraits" / "scenario.json").write_text(json.dumps({**GOOD, **(scenario or {})}))
        return pytester.runpytest("mytraits", "--trait", "mini", "-p", "no:cacheprovider",
                                  "--harness-run-dir", str(pytester.path / "runs"), *args)

    return run


def test_options_are_registered_in_help(pytester):
    res = pytester.runpytest("--help")
    out = res.stdout.str()
    for opt in ("--trait=NAME", "--harness-model", "--harness-judge", "--harness-judge-model",
                "--harness-judge-base-url", "--harness-cache", "--harness-run-dir", "--harness-traits-dir",
                "--harness-report", "--harness-judge-eval", "--harness-update-reference", "harness_traits_dir"):
        assert opt in out, opt
    # nothing generic that another project's conftest may define: every option but --trait is prefixed
    import re

    group = out.split("persona-harness acceptance checks", 1)[1].split("\n\n", 1)[0]
    opts = re.findall(r"^\s+(--[a-z][a-z-]*)", group, re.M)
    assert opts and all(o == "--trait" or o.startswith("--harness-") for o in opts), opts
    for old in ("--model", "--judge", "--judge-model", "--judge-base-url", "--update-reference"):
        assert not re.search(rf"^\s+{old}[ =]", group, re.M), old


def test_a_project_whose_conftest_defines_model_judge_and_device_runs_beside_the_plugin(pytester):
    """The plugin is loaded into every pytest session of an environment that has the package; an ML
    project's own --model / --judge / --device options must not collide with it."""
    pytester.makeconftest('''
import pytest

def pytest_addoption(parser):
    parser.addoption("--model", default="gpt2")
    parser.addoption("--judge", default="none")
    parser.addoption("--device", default="cpu")
    parser.addoption("--judge-model", default="j")
    parser.addoption("--update-reference", action="store_true")

@pytest.fixture
def opts(pytestconfig):
    return {k: pytestconfig.getoption(k) for k in ("model", "judge", "device", "judge_model", "update_reference")}
''')
    pytester.makepyfile(test_own="def test_own(opts):\n    assert opts == {'model': 'bert', 'judge': 'none', "
                                 "'device': 'cuda:1', 'judge_model': 'j', 'update_reference': True}\n")
    # --harness-judge-eval: an option only the plugin knows, so the plugin is loaded in these runs
    res = pytester.runpytest("--model", "bert", "--device", "cuda:1", "--update-reference", "--harness-judge-eval")
    res.assert_outcomes(passed=1)
    # and in a subprocess, as the project's CI would run it (the entry point loads the plugin)
    res = pytester.runpytest_subprocess("--model", "bert", "--device=cuda:1", "--update-reference",
                                        "--harness-judge-eval")
    res.assert_outcomes(passed=1)


def test_unknown_trait_is_a_usage_error_listing_known_traits(pytester):
    _trait_files(pytester.path / "traits", "mini")
    _trait_files(pytester.path / "traits", "other")
    pytester.makepyfile(test_x="def test_x(trait): pass")
    res = pytester.runpytest("--trait", "mini", "--trait", "nope")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    err = res.stderr.str()
    assert "unknown trait(s) ['nope']; known: [" in err and "'mini'" in err and "'other'" in err
    assert str(pytester.path / "traits") in err


def test_trait_option_parametrizes_tests_repeatable_and_deduplicated(pytester):
    _trait_files(pytester.path / "traits", "mini")
    _trait_files(pytester.path / "traits", "other")
    pytester.makepyfile(test_x="""
        import pytest
        def test_t(trait, trait_spec):
            assert trait_spec.name == trait
        @pytest.mark.parametrize("trait", ["own"])
        def test_own_param(trait):
            assert trait == "own"
        """)
    res = pytester.runpytest("--trait", "mini", "--trait", "other", "--trait", "mini", "-v")
    res.assert_outcomes(passed=3)
    res.stdout.fnmatch_lines(["*test_t?mini? PASSED*", "*test_t?other? PASSED*"])


def test_without_trait_option_the_plugin_is_a_noop_and_trait_tests_skip(pytester):
    pytester.makepyfile(test_x="def test_t(trait): pass\ndef test_plain(): pass")
    res = pytester.runpytest("-rs")
    res.assert_outcomes(passed=1, skipped=1)
    res.stdout.fnmatch_lines(["*no --trait given*"])
    assert "persona-harness acceptance" not in res.stdout.str()


def test_good_synthetic_data_passes_every_check_with_table_intervals_junit_and_json(project, pytester):
    xml = pytester.path / "out.xml"
    report = pytester.path / "report.json"
    res = project(None, f"--junitxml={xml}", f"--harness-report={report}")
    res.assert_outcomes(passed=len(ALL_CHECKS))
    out = res.stdout.str()
    assert "persona-harness acceptance: model smollm2" in out
    res.stdout.fnmatch_lines([
        "trait*check*metric*value ?95% CI?*threshold*result",
        "mini*score_gap*score_gap*70.0 ?70.0, 70.0?*>= 30.0*pass",
        "mini*score_gap*effective_pair_rate*0.500*>= 0.300*pass",
        "mini*norm_peak*relative_depth*0.500*in ?0.400, 0.800? *pass",
        "mini*projection_auroc*auroc*?*,*?*>= 0.800*pass",
        "mini*projection_auroc*auroc_in_context*",
        "mini*heldout_cosine*heldout_cosine*>= 0.800*pass",
        "mini*specificity*specificity_margin*>= 0.200*pass",
        "mini*score_correlation*pearson*>= 0.500*pass",
        "mini*reference_cosine*min_inner_cosine*1.000*>= 0.900*pass",
        "mini: per-layer AUROC on the eval split*",
        f"JSON report: {report}",
    ])
    props = {p.get("name"): p.get("value") for p in ET.parse(xml).getroot().iter("property")}
    assert float(props["mini.score_gap.score_gap"]) == 70.0
    assert props["mini.score_gap.score_gap.threshold"] == ">= 30.0"
    assert float(props["mini.norm_peak.relative_depth"]) == 0.5
    assert float(props["mini.projection_auroc.auroc"]) > 0.8
    lo, hi = (float(x) for x in props["mini.projection_auroc.auroc.ci95"].split(".."))
    assert 0.8 <= lo <= float(props["mini.projection_auroc.auroc"]) <= hi <= 1.0
    assert float(props["mini.reference_cosine.min_inner_cosine"]) == pytest.approx(1.0)
    data = json.loads(report.read_text())
    assert data["format"] == "persona-harness-acceptance/1" and data["model"] == "smollm2"
    t = data["traits"]["mini"]
    assert t["passed"] is True
    assert set(t["checks"]) == set(ALL_CHECKS)
    assert all(c["outcome"] == "passed" for c in t["checks"].values())
    auroc = next(m for m in t["checks"]["projection_auroc"]["metrics"] if m["name"] == "auroc")
    assert len(auroc["ci"]) == 2 and auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    assert len(t["auroc_per_layer"]) == 5 and t["thresholds"]["score_gap"] == 30.0
    assert set(t["specificity_matrix"]["auroc"]) == {"mini", "other"}


@pytest.mark.parametrize("scenario, failing, message", [
    ({"pos_score": 50, "neg_score": 40}, "test_score_gap", "*score gap 10.0*lower bound < 30.0*"),
    ({"kept": 1}, "test_score_gap", "*effective-pair rate 0.100 (1 of 10*< 0.3*"),
    ({"peak": 1}, "test_norm_peak", "*relative-norm peak at layer 1 of 4 (relative depth 0.250) is outside*"),
    ({"other_axis": 0}, "test_specificity", "*own AUROC 1.000 minus best other trait's 1.000*lower bound < 0.2*"),
    ({"method_axis": 0}, "test_heldout_cosine", "*not closer to the eval split's response-mean difference*"),
    ({"scores_random": True}, "test_score_correlation", "*Pearson r*lower bound < 0.5*"),
    ({"ref_axis": 1}, "test_reference_cosine", "*cosine to the reference 0.000 at layer 1 < 0.9*"),
], ids=["gap", "pair-rate", "norm-peak", "specificity", "method", "correlation", "cosine"])
def test_each_check_fails_on_data_that_must_fail(project, scenario, failing, message):
    res = project(scenario, "-rf")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, failed=1)
    res.stdout.fnmatch_lines([f"FAILED*{failing}*"])
    res.stdout.fnmatch_lines([message])
    res.stdout.fnmatch_lines(["mini*FAIL"])  # the summary table marks the failing metric


@pytest.mark.parametrize("scenario", [{"sep": 0.0}, {"sep": -3.0}], ids=["random", "reversed"])
def test_separation_failures_fail_auroc_heldout_cosine_and_correlation(project, scenario):
    res = project(scenario, "-rf")
    res.stdout.fnmatch_lines(["*eval-split AUROC (neutral prompt)*lower bound < 0.8*"])
    res.stdout.fnmatch_lines(["FAILED*test_projection_auroc*"])
    res.stdout.fnmatch_lines(["FAILED*test_heldout_cosine*"])
    outcomes = res.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2 and outcomes.get("passed", 0) >= 3


def test_correlation_check_skips_when_the_eval_split_was_not_judged(project):
    res = project({"judged": False}, "-rs")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, skipped=1)
    res.stdout.fnmatch_lines(["SKIPPED*the evaluation split was not judged: pass --harness-judge-eval*"])


def test_specificity_skips_without_another_trait_vector(project):
    res = project({"other_axis": None}, "-rs")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, skipped=1)
    res.stdout.fnmatch_lines(["SKIPPED*no other trait's vector for this model*"])


def test_null_score_gap_threshold_is_informational_reported_and_skipped(project, pytester):
    why = "the judge cannot tell pos from neg answers"
    checks_data = {**CHECKS, "smollm2": {"score_gap": None, "_score_gap": why}}
    (pytester.path / "mytraits" / "mini" / "checks.json").write_text(json.dumps(checks_data))
    report = pytester.path / "report.json"
    res = project({"pos_score": 50, "neg_score": 52}, "-rs", f"--harness-report={report}")  # gap -2: not enforced
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, skipped=1)
    res.stdout.fnmatch_lines([
        "mini*score_gap*score_gap*-2.000*none (informational)*info",
        "mini*score_gap*effective_pair_rate*0.500*>= 0.300*pass",
        "SKIPPED*informational for model block 'smollm2' (score_gap: null in "
        f"checks.json, not enforced): measured score gap -2.00 (95% CI -2.00..-2.00, pos mean 50.00, neg mean 52.00, "
        "extraction split)*"
        f"Why: {why}*",
    ])
    t = json.loads(report.read_text())["traits"]["mini"]
    assert t["passed"] is True and t["checks"]["score_gap"]["outcome"] == "skipped"
    assert t["checks"]["score_gap"]["informational"] == ["score_gap"]
    assert t["thresholds"]["score_gap"] is None
    # the check's other threshold is still enforced
    res = project({"pos_score": 50, "neg_score": 52, "kept": 1}, "-rf")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, failed=1)
    res.stdout.fnmatch_lines(["*effective-pair rate 0.100 (1 of 10*< 0.3*"])
    # another model's block (none: the default's real threshold) still fails the same gap
    res = project({"pos_score": 50, "neg_score": 52}, "--harness-model", "Qwen/Qwen2.5-7B-Instruct", "-rf")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, failed=1)
    res.stdout.fnmatch_lines(["*score gap -2.0*lower bound < 30.0*", "FAILED*test_score_gap*"])


def test_missing_reference_skips_with_the_command_that_writes_it(project):
    res = project({"ref_axis": None}, "-rs")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, skipped=1)
    res.stdout.fnmatch_lines(["*persona-harness reference --trait mini*"])


def test_model_thresholds_override_default(project, pytester):
    checks_data = {**CHECKS, "smollm2": {"score_gap": 80}}
    (pytester.path / "mytraits" / "mini" / "checks.json").write_text(json.dumps(checks_data))
    res = project(None)
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, failed=1)
    res.stdout.fnmatch_lines(["mini*score_gap*score_gap*70.0*>= 80.0*FAIL"])
    # --harness-model picks another block (here: none, so the default applies)
    res = project(None, "--harness-model", "Qwen/Qwen2.5-7B-Instruct")
    res.assert_outcomes(passed=len(ALL_CHECKS))


def test_update_reference_writes_the_file_that_later_runs_compare_with(project, pytester):
    ref = pytester.path / "mytraits" / "mini" / "reference" / "smollm2.safetensors"
    res = project({"real_reference": True}, "-rs")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, skipped=1)  # no reference yet
    res = project({"real_reference": True}, "--harness-update-reference")
    res.assert_outcomes(passed=len(ALL_CHECKS))
    res.stdout.fnmatch_lines([f"mini: reference written to {ref}"])
    vs = checks.load_reference(ref)
    assert vs.metadata["reference_of"] == "mini" and json.loads(vs.metadata["settings"])["model"] == "smollm2"
    assert tuple(vs[checks.REFERENCE_METHOD].shape) == (5, 8)
    res = project({"real_reference": True})
    res.assert_outcomes(passed=len(ALL_CHECKS))
    res.stdout.fnmatch_lines(["mini*reference_cosine*reproducible*True",
                              "mini*reference_cosine*max_relative_error*0.000*<= 0.001*pass"])
    # same settings and seed, but the vector changed (its norm peak moved): the cosine holds at every
    # layer, and the reproducibility check catches the change
    res = project({"real_reference": True, "peak": 3}, "-rf")
    res.assert_outcomes(passed=len(ALL_CHECKS) - 1, failed=1)
    res.stdout.fnmatch_lines(["mini*norm_peak*peak_layer*3", "mini*reference_cosine*min_inner_cosine*1.000*pass",
                              "*same trait, settings and seed*not reproducible here*"])
    res = project({"real_reference": True, "sep": 3.0, "pos_score": 80})
    res.assert_outcomes(passed=len(ALL_CHECKS))


def test_reference_command_is_registered_on_the_cli():
    from harness.cli.main import build_parser
    from harness.core.plugins import get_plugin_manager

    parser = build_parser(get_plugin_manager(entrypoints=False))
    args = parser.parse_args(["reference", "--trait", "sycophantic", "--model", "smollm2"])
    assert args.func.__name__ == "cmd_reference" and args.trait == ["sycophantic"]


class _TinyModelPlugin:
    def __init__(self, lm):
        self.lm = lm

    from harness.core.hookspecs import hookimpl as _hookimpl

    @_hookimpl
    def harness_load_model(self, model_id, settings):
        return self.lm


class FakeJudge:
    """Scores pos answers 90 and neg answers 10 (a fake: the tiny model cannot judge)."""

    name, model_id = "fake", "fake"

    def __init__(self, calls: list):
        self.calls = calls

    def config(self):
        return {}

    def batch_size(self, ctx):
        return 8

    def judge(self, items, ctx):
        from harness.core.records import Judgment

        self.calls.extend(it.generation_id for it in items)
        return [Judgment(it.generation_id, it.metric, 90.0 if "_pos_" in it.generation_id or it.metric == "coherence"
                         else 10.0, judge="fake") for it in items]

    from harness.core.hookspecs import hookimpl as _hookimpl

    @_hookimpl
    def harness_register_judges(self, register):
        register("fake", lambda settings: self)


class _ConfigurePlugin:
    """A pytest plugin using the historic pytest_harness_configure hook to add components."""

    def __init__(self, lm, calls):
        self.lm, self.calls = lm, calls

    def pytest_harness_configure(self, pm, config):
        pm.register(_TinyModelPlugin(self.lm), name="tiny-model")
        pm.register(FakeJudge(self.calls), name="fake-judge")


def test_real_pipeline_on_tiny_model_fake_judge_runs_each_stage_once_and_reuses_cache(pytester, tiny_lm):
    """The plugin's own fixtures end to end on a tiny random model (mechanics only) with a fake
    judge added through the historic pytest_harness_configure hook: the eval split is generated
    but not judged, a rerun takes every generation from the cache, and --harness-update-reference works."""
    _trait_files(pytester.path / "traits", "mini", {"default": {"score_gap": 50, "effective_pair_rate": 0.5,
                                                                "norm_peak_band": [0.0, 1.0], "auroc": 0.0,
                                                                "heldout_cosine": -1.0,
                                                                "heldout_method_margin": -2.0}})
    (pytester.path / "traits" / "test_project_acceptance.py").write_text(ACCEPTANCE)
    (pytester.path / "persona-harness.toml").write_text(
        'judge = "fake"\nmax_new_tokens = 4\nn_per_question = 1\nextract_batch_size = 4\n')
    report = pytester.path / "r.json"
    args = ("traits", "--trait", "mini", "-p", "no:cacheprovider", f"--harness-report={report}", "-rs")
    calls: list = []
    res = pytester.runpytest(*args, plugins=[_ConfigurePlugin(tiny_lm, calls)])
    # no reference yet; no other trait's vector of this shape; the eval split is not judged
    res.assert_outcomes(passed=4, skipped=3)
    assert calls and all("_extract_" in c for c in calls)  # eval-split answers are not judged
    data = json.loads(report.read_text())["traits"]["mini"]
    assert data["timings"]["generate_cached"] == 0 and data["pairs"] == {"kept": 2, "candidates": 2, "rate": 1.0}
    from harness.core.runs import read_latest, resolve_run_dir

    run_dir = read_latest(pytester.path / "runs" / "smollm2" / "mini")  # each session: a new run folder
    assert run_dir == resolve_run_dir(pytester.path / "runs" / "smollm2" / "mini") == Path(data["run_dir"])
    assert (run_dir / "vectors.safetensors").exists() and (run_dir / "run.json").exists()
    calls.clear()
    res = pytester.runpytest(*args, "--harness-update-reference", plugins=[_ConfigurePlugin(tiny_lm, calls)])
    res.assert_outcomes(passed=5, skipped=2)
    assert calls == []  # every judgment came from the cache
    data = json.loads(report.read_text())["traits"]["mini"]
    assert data["timings"]["generate_cached"] == 4  # extraction split: 2 questions x 1 pair x pos/neg
    ref_metrics = {m["name"]: m["value"] for m in data["checks"]["reference_cosine"]["metrics"]}
    assert ref_metrics["min_inner_cosine"] == pytest.approx(1.0) and ref_metrics["reproducible"] is True
    assert (pytester.path / "traits" / "mini" / "reference" / "smollm2.safetensors").exists()
    second = read_latest(pytester.path / "runs" / "smollm2" / "mini")  # the first run is kept, not overwritten
    assert second != run_dir and second == Path(data["run_dir"]) and (run_dir / "vectors.safetensors").exists()


def test_another_project_with_only_the_one_line_module_runs_the_packaged_checks(pytester, tiny_lm):
    """A project outside this repository: a traits folder with one trait and the one-line test module
    (no conftest, no copy of the checks) gets all four checks from the installed package."""
    assert ROOT not in pytester.path.parents
    _trait_files(pytester.path / "traits", "mini", {"default": {"score_gap": 50, "effective_pair_rate": 0.5,
                                                                "norm_peak_band": [0.0, 1.0], "auroc": 0.0,
                                                                "heldout_cosine": -1.0,
                                                                "heldout_method_margin": -2.0}})
    # own basename: in one pytest process with this repo's traits/ the module name test_acceptance is taken
    (pytester.path / "traits" / "test_project_acceptance.py").write_text(ONE_LINE_MODULE)
    (pytester.path / "persona-harness.toml").write_text(
        'judge = "fake"\nmax_new_tokens = 4\nn_per_question = 1\nextract_batch_size = 4\n')
    assert sorted(p.name for p in pytester.path.rglob("*") if p.is_file()) == [
        "checks.json", "eval.json", "extract.json", "persona-harness.toml", "test_project_acceptance.py"]
    args = ("traits", "--trait", "mini", "-p", "no:cacheprovider", "-v", "-rs")
    res = pytester.runpytest(*args, "--harness-update-reference", plugins=[_ConfigurePlugin(tiny_lm, [])])
    res.assert_outcomes(passed=5, skipped=2)
    res.stdout.fnmatch_lines([f"traits/test_project_acceptance.py::{t}[[]mini[]] PASSED*" for t in
                              ("test_score_gap", "test_norm_peak", "test_projection_auroc", "test_heldout_cosine",
                               "test_reference_cosine")])
    res.stdout.fnmatch_lines(["*persona-harness acceptance: model smollm2*judge fake*",
                              "mini*score_gap*score_gap*>= 50.0*pass"])
    assert (pytester.path / "traits" / "mini" / "reference" / "smollm2.safetensors").exists()
    res = pytester.runpytest(*args, "-m", "acceptance", plugins=[_ConfigurePlugin(tiny_lm, [])])
    res.assert_outcomes(passed=5, skipped=2)  # the module-level acceptance mark comes along with the import
