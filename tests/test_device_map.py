"""device_map placement: the setting reaches from_pretrained, torchrun refuses it, and a model spread
over several devices makes the fast generator / extractor fall back to hf / mean-diff (same results).
Also: each torchrun rank loads onto its own device (plugins/model_hf.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness.core.config import Settings
from harness.core.errors import HarnessError
from harness.core.pipeline import build_requests
from harness.core.records import InstructionPair, TraitSpec

TRAIT = TraitSpec(name="sycophantic", instructions=tuple(InstructionPair(f"Flatter the user ({i}).", f"Be candid ({i}).")
                                                           for i in range(2)),
                  questions=("I think 2+2=5. Right?", "My essay is flawless, isn't it?", "Should I quit my job today?"),
                  eval_questions=(), eval_prompt="{question} {answer}")
FAKE_MAP = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "model.norm": 1, "lm_head": 1}


class _Ctx:
    def __init__(self, lm):
        self.lm = lm

    def model(self, model_id=None):
        return self.lm


@pytest.fixture
def spread_lm(embedded_dir):
    """A tiny random Llama (own instance) that claims accelerate placed it on two GPUs."""
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=2, hidden=32, seed=3)
    lm.model.hf_device_map = dict(FAKE_MAP)
    return lm


def _no_engine(monkeypatch):
    from harness.engine import Engine

    def refuse(*a, **k):
        raise AssertionError("the engine must not run on a model spread over several devices")

    monkeypatch.setattr(Engine, "for_model", classmethod(lambda cls, lm: refuse()))
    monkeypatch.setattr(Engine, "extract_sums", refuse)


def test_model_devices_and_supported():
    from harness.models.loading import model_devices, spans_devices

    assert model_devices(SimpleNamespace()) == []
    assert model_devices(SimpleNamespace(hf_device_map=FAKE_MAP)) == ["cuda:0", "cuda:1"]
    one = SimpleNamespace(hf_device_map={"model": 0, "lm_head": "cuda:0"})
    assert model_devices(one) == ["cuda:0"] and not spans_devices(one)
    assert spans_devices(SimpleNamespace(hf_device_map={"model": 0, "lm_head": "cpu"}))


def test_fast_generation_supported_checks_device_map(spread_lm):
    from harness.engine import fast_generation_supported

    ok, why = fast_generation_supported(spread_lm.model)
    assert not ok and "2 devices" in why
    spread_lm.model.hf_device_map = {"": "cpu"}
    assert fast_generation_supported(spread_lm.model) == (True, "")


def test_fast_generator_falls_back_to_hf(spread_lm, monkeypatch):
    from harness_plugins.generate_fast import FastGenerator
    from harness_plugins.generate_hf import HFGenerator

    s = Settings(max_new_tokens=6, temperature=1.0, seed=5, batch_size=12)
    reqs = build_requests(TRAIT, s)
    ctx = _Ctx(spread_lm)
    hf = HFGenerator(s).generate(reqs, ctx)
    _no_engine(monkeypatch)
    with pytest.warns(UserWarning, match=r"generator 'fast': model spans 2 devices .*using the 'hf' generator"):
        fast = FastGenerator(s).generate(reqs, ctx)
    assert [g.generator for g in fast] == ["fast"] * len(reqs)
    assert [{**g.to_dict(), "generator": "hf"} for g in fast] == [g.to_dict() for g in hf]


def test_fast_extractor_falls_back_to_mean_diff(spread_lm, monkeypatch):
    from harness_plugins.extract_fast import FastExtractor
    from harness_plugins.extract_mean_diff import MeanDiffExtractor
    from harness_plugins.generate_hf import HFGenerator

    s = Settings(max_new_tokens=5, temperature=1.0, seed=2, batch_size=12, extract_batch_size=3)
    ctx = _Ctx(spread_lm)
    gens = HFGenerator(s).generate(build_requests(TRAIT, s), ctx)
    pos = [g for g in gens if g.polarity == "pos"]
    neg = [g for g in gens if g.polarity == "neg"]
    ref = MeanDiffExtractor(s).extract(TRAIT, pos, neg, ctx)
    _no_engine(monkeypatch)
    with pytest.warns(UserWarning, match=r"extractor 'fast': model spans 2 devices .*using the 'mean-diff' extractor"):
        got = FastExtractor(s).extract(TRAIT, pos, neg, ctx)
    assert (got.n_pos, got.n_neg, got.extractor, got.metadata) == (ref.n_pos, ref.n_neg, "fast", {"fallback": "mean-diff"})
    assert set(got.tensors) == set(ref.tensors)
    for k in ref.tensors:
        assert torch.equal(got.tensors[k], ref.tensors[k])


def test_load_hf_model_passes_device_map(embedded_dir, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")  # from_pretrained(device_map=...) needs it
    from harness.models.loading import load_hf_model
    from harness.testing import make_tiny_lm

    tiny = make_tiny_lm(embedded_dir, layers=1, hidden=32)
    tiny.model.save_pretrained(str(tmp_path))
    tiny.tokenizer.save_pretrained(str(tmp_path))
    from transformers import AutoModelForCausalLM

    real, seen = AutoModelForCausalLM.from_pretrained, {}

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_hf_model(str(tmp_path), dtype="float32", device_map="cpu")
    assert seen["device_map"] == "cpu" and lm.device == torch.device("cpu") and lm.info["device_map"] == "cpu"
    seen.clear()
    load_hf_model(str(tmp_path), dtype="float32")
    assert "device_map" not in seen
    with pytest.raises(HarnessError, match="not both"):
        load_hf_model(str(tmp_path), device="cpu", device_map="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HarnessError, match=r"cannot run under torchrun \(WORLD_SIZE=2\)"):
        load_hf_model(str(tmp_path), device_map="auto")


def test_device_map_setting_reaches_the_loader(monkeypatch):
    import harness.models.loading
    from harness.cli.main import build_parser
    from harness.cli.options import settings_from_args
    from harness_plugins import model_hf

    seen = {}
    monkeypatch.setattr(harness.models.loading, "load_hf_model", lambda model_id, **kw: seen.update(kw) or "lm")
    s = settings_from_args(build_parser().parse_args(["run", "--device-map", "balanced"]))
    assert s.device_map == "balanced"
    assert model_hf.harness_load_model("m", s) == "lm"
    assert {k: seen[k] for k in ("device", "dtype", "device_map")} == {"device": "auto", "dtype": "auto", "device_map": "balanced"}


def test_each_rank_loads_onto_its_own_device(monkeypatch):
    import harness.models.loading
    from harness_plugins import model_hf
    from harness_plugins.model_hf import rank_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_device("cuda:0") == "cuda:0" and rank_device("auto") == "auto"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("auto") == "cuda:1" and rank_device("cuda") == "cuda:1"
    assert rank_device("cpu") == "cpu"
    with pytest.raises(HarnessError, match=r"--device cuda:0 names one device, but torchrun started 2 ranks"):
        rank_device("cuda:0")
    seen = {}
    monkeypatch.setattr(harness.models.loading, "load_hf_model", lambda model_id, **kw: seen.update(kw) or "lm")
    model_hf.harness_load_model("m", Settings())
    assert seen["device"] == "cuda:1"
    with pytest.raises(HarnessError, match="names one device"):
        model_hf.harness_load_model("m", Settings(device="cuda:0"))
