"""Every architecture on the engine's supported list, on the CPU (the engine's eager path), in fp32: a tiny
random model with the architecture's non-default features on (``harness.engine.conformance.CONFIGS``) gives
HF ``generate``'s greedy tokens, the ``hf`` generator's sampled tokens and the reference extractor's sums.
The engine's own per-architecture pieces are each shown to matter (without them the equality fails), and
models off the list fall back to ``hf`` / ``mean-diff`` with a one-line notice naming the reason."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from harness.engine import (
    SUPPORTED_MODEL_TYPES,
    Engine,
    attention,
    fast_extraction_supported,
    fast_generation_supported,
)
from harness.engine.conformance import CONFIGS, compare, tiny_model

FP32_EXTRACT_TOL = 1e-3  # largest |engine - reference| / (|reference| + 1e-3 max|reference|) in fp32
SWAPPED = ("llama", "mistral", "qwen2", "qwen3")  # families whose norms / MLP / rotary the fused path swaps


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' rope-config advice on the tiny configs
        yield


def test_supported_list_is_exactly_the_tested_list():
    assert SUPPORTED_MODEL_TYPES == set(CONFIGS)


def test_docs_list_the_supported_architectures_and_what_their_tests_cover():
    import re
    from pathlib import Path

    from harness.engine import ARCHS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "engine.md").read_text()
    section = doc.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| ([a-z0-9_]+) \| (.+?) \|$", section, re.M))
    rows.pop("model_type", None)
    assert rows == {mt: a.tested for mt, a in ARCHS.items()}


def _assert_equal(res):
    assert res["greedy"]["equal"], res["greedy"]
    assert res["sampled"]["equal"], res["sampled"]
    assert res["extract"]["finite"] and res["extract"]["max_rel_err"] < FP32_EXTRACT_TOL, res["extract"]
    assert res["greedy"]["distinct"] >= 5, "the tiny model repeats one token: the greedy check would see little"


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_architecture_equals_hf_and_reference(model_type):
    lm = tiny_model(model_type)
    assert fast_generation_supported(lm.model) == (True, "")
    assert fast_extraction_supported(lm.model) == (True, "")
    _assert_equal(compare(lm))


@pytest.mark.parametrize("model_type", SWAPPED)
def test_architecture_equals_hf_with_the_fused_swap(model_type):
    """The fused path's replacement forwards, uncompiled (CPU), on the families they replace."""
    lm = tiny_model(model_type)
    _assert_equal(compare(lm, fused="eager"))


# the engine's own per-architecture pieces: (model type, decoder attribute, what it is set to, which check fails)
ENGINE_PIECES = [
    ("granite", "emb_mult", None, "greedy"), ("granite", "logits_div", None, "sampled"),
    ("granitemoe", "emb_mult", None, "greedy"), ("granitemoe", "logits_div", None, "sampled"),
    ("cohere", "logits_mul", None, "sampled"),
    ("gemma2", "softcap", None, "sampled"), ("gemma3_text", "softcap", None, "sampled"),
    ("gemma3_text", "rope_types", "one table", "greedy"),
] + [(mt, "windows", "full attention", "greedy") for mt in sorted(CONFIGS)
     if any(w is not None for w in (CONFIGS[mt].get("sliding_window"),))]


@pytest.mark.parametrize("model_type,attr,value,fails", ENGINE_PIECES,
                         ids=[f"{m}-{a}" for m, a, _, _ in ENGINE_PIECES])
def test_each_engine_side_feature_is_needed(model_type, attr, value, fails):
    """Without one of the engine's per-architecture pieces the check that covers it fails: the configs turn
    the feature on strongly enough for the equality tests to catch an engine that skips it."""
    lm = tiny_model(model_type)
    eng = Engine(lm)
    cur = getattr(eng.decoder, attr)
    assert cur is not None and (attr != "windows" or any(w is not None for w in cur))
    if attr == "windows":
        eng.decoder.windows = [None] * len(cur)
    elif attr == "rope_types":
        eng.decoder.rope_types = [cur[0]] * len(cur)  # every layer gets the first layer's rotary table
    else:
        setattr(eng.decoder, attr, value)
    res = compare(lm, engine=eng)
    assert not res[fails]["equal"], (attr, res[fails])


def test_attention_soft_capping_is_needed(monkeypatch):
    """Gemma 2's attention soft-capping (applied by the engine's attention function): ignoring it fails."""
    lm = tiny_model("gemma2")
    eager = attention.probs_eager
    monkeypatch.setattr(attention, "probs_eager", lambda s, mask, scale, dt, softcap=None: eager(s, mask, scale, dt))
    res = compare(lm)
    assert not (res["greedy"]["equal"] and res["sampled"]["equal"])


# -- off the list: fall back, saying why ----------------------------------------------------------
LONGROPE = dict(original_max_position_embeddings=16, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
    "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 8.0]})


@pytest.mark.parametrize("model_type,overrides,reason", [
    ("phi3", dict(LONGROPE), "rope_type 'longrope'"),
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "rope_type 'dynamic'"),
    ("exaone4", dict(sliding_window=5), "model_type 'exaone4' is not among the architectures the engine is tested on"),
])
def test_untested_variants_are_not_supported(model_type, overrides, reason):
    lm = tiny_model(model_type, overrides=overrides)
    for fn in (fast_generation_supported, fast_extraction_supported):
        ok, why = fn(lm.model)
        assert not ok and reason in why, why


def test_longrope_is_why_phi3_longrope_is_refused():
    """What the refusal protects against: with longrope, HF's vectors depend on the batch (the factors follow
    the longest sequence in it) and HF generate re-runs the whole prefix once a sequence passes
    original_max_position_embeddings, so the engine reproduces neither."""
    res = compare(tiny_model("phi3", overrides=LONGROPE))
    assert res["extract"]["max_rel_err"] > FP32_EXTRACT_TOL and not res["greedy"]["equal"]


@pytest.fixture
def unlisted(embedded_dir, pm):
    """A model type off the list (real chat template), served by a plugin manager."""
    from harness.core.config import Settings
    from harness.core.pipeline import RunContext, build_requests
    from harness.core.records import InstructionPair, TraitSpec
    from harness.testing import StaticModelPlugin, make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=32, seed=3, model_type="exaone4")
    pm.register(StaticModelPlugin(lm), name="test-static-model")
    s = Settings(model="tiny", max_new_tokens=5, temperature=1.0, seed=2, batch_size=8, extract_batch_size=3,
                 progress=False)
    trait = TraitSpec(name="t", instructions=(InstructionPair("Flatter the user.", "Be candid."),),
                      questions=("Is my plan perfect?", "Am I right?"), eval_questions=(), eval_prompt="{question} {answer}")
    return lm, s, trait, RunContext(settings=s, pm=pm), build_requests(trait, s)


def test_fast_generator_and_extractor_fall_back_naming_the_reason(unlisted):
    from harness_plugins.extract_fast import FastExtractor
    from harness_plugins.extract_mean_diff import MeanDiffExtractor
    from harness_plugins.generate_fast import FastGenerator
    from harness_plugins.generate_hf import HFGenerator

    _, s, trait, ctx, reqs = unlisted
    hf = HFGenerator(s).generate(reqs, ctx)
    with pytest.warns(UserWarning, match=r"generator 'fast': model_type 'exaone4' is not among .*using the 'hf' generator"):
        fast = FastGenerator(s).generate(reqs, ctx)
    assert [{**g.to_dict(), "generator": "hf"} for g in fast] == [g.to_dict() for g in hf]
    pos = [g for g in hf if g.polarity == "pos"]
    neg = [g for g in hf if g.polarity == "neg"]
    ref = MeanDiffExtractor(s).extract(trait, pos, neg, ctx)
    with pytest.warns(UserWarning, match=r"extractor 'fast': model_type 'exaone4' is not among .*'mean-diff' extractor"):
        got = FastExtractor(s).extract(trait, pos, neg, ctx)
    assert got.metadata == {"fallback": "mean-diff"} and got.extractor == "fast"
    for k in ref.tensors:
        assert torch.equal(got.tensors[k], ref.tensors[k])


def test_gpu_arch_check_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_arch_check.py (run on the GPU runner) works and writes its JSON: a CPU smoke run."""
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_arch_check.py"
    main = runpy.run_path(str(script))["main"]
    out = tmp_path / "arch.json"
    assert main([str(out), "--device", "cpu", "--types", "granite", "--dtypes", "float32", "--fused", "off"]) == 0
    rep = json.loads(out.read_text())
    res = rep["results"]["granite/float32/fused=off"]
    assert rep["fp32_failures"] == [] and res["ok"] is True and res["greedy"]["equal"]
