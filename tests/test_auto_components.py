"""The default ``auto`` generator and extractor: fast on CUDA, the reference components elsewhere,
and the run summary and run.json say which ran and why."""

from __future__ import annotations

import json

import pytest

from harness.core.config import Settings
from harness.core.pipeline import run_trait
from harness.core.plugins import build_registry
from harness.engine import AUTO_FALLBACK, auto_component


def test_defaults_are_auto():
    s = Settings()
    assert (s.generator, s.extractor) == ("auto", "auto")


@pytest.mark.parametrize("kind", ["generator", "extractor"])
def test_decision_function(kind):
    ref = AUTO_FALLBACK[kind]
    assert auto_component(kind, "auto", cuda_available=True)[0] == "fast"
    assert auto_component(kind, "cuda:1", cuda_available=False)[0] == "fast"  # an explicit device is taken as given
    name, why = auto_component(kind, "auto", cuda_available=False)
    assert (name, why) == (ref, "device cpu: the engine's speed-up needs CUDA")
    assert auto_component(kind, "cpu", cuda_available=True) == (ref, "device cpu: the engine's speed-up needs CUDA")
    assert auto_component(kind, "mps")[0] == ref
    name, why = auto_component(kind, "cuda", "auto", cuda_available=True)
    assert name == ref and "device_map 'auto'" in why
    assert "cuda:0" in auto_component(kind, "cuda:0")[1]


def test_auto_products_are_the_chosen_components(pm):
    s = Settings(device="cpu")
    gen = build_registry(pm, "generator").create("auto", s)
    ex = build_registry(pm, "extractor").create("auto", s)
    assert gen.name == "hf" and gen.choice == {"setting": "auto", "chosen": "hf",
                                               "reason": "device cpu: the engine's speed-up needs CUDA"}
    assert ex.name == "mean-diff" and ex.choice["chosen"] == "mean-diff"
    # the same cache keys as naming the component: config() is the chosen one's
    assert gen.config() == build_registry(pm, "generator").create("hf", s).config()


def test_run_on_cpu_records_auto_choice(tmp_path, tiny_pm, mini_trait_dir, capsys):
    from harness.cli.main import print_summary

    s = Settings(model="tiny", traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"),
                 cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, device="cpu")
    res = run_trait("mini", s, pm=tiny_pm)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["generator"] == "auto" and run["config"]["extractor"] == "auto"
    comps = run["components"]
    assert comps["generator"] == "hf" and comps["extractor"] == "mean-diff"
    assert comps["choices"]["generator"] == {"setting": "auto", "chosen": "hf",
                                             "reason": "device cpu: the engine's speed-up needs CUDA"}
    assert comps["choices"]["extractor"]["chosen"] == "mean-diff"
    assert {g["generator"] for g in map(json.loads, (tmp_path / "run" / "generations.jsonl").read_text().splitlines())} == {"hf"}
    assert res.vectors.extractor == "mean-diff"
    assert res.summary["components"] == comps
    print_summary(res.summary, tmp_path / "run")
    out = capsys.readouterr().out
    assert "generator       hf (auto: device cpu: the engine's speed-up needs CUDA)" in out
    assert "extractor       mean-diff (auto:" in out


def test_explicit_component_has_no_choice(tmp_path, tiny_pm, mini_trait_dir):
    s = Settings(model="tiny", traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"),
                 cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, generator="hf", extractor="mean-diff")
    run_trait("mini", s, pm=tiny_pm)
    comps = json.loads((tmp_path / "run" / "run.json").read_text())["components"]
    assert comps["generator"] == "hf" and comps["extractor"] == "mean-diff" and "choices" not in comps


def test_fast_fallback_is_recorded(tmp_path, tiny_pm, mini_trait_dir, monkeypatch):
    """A model the engine does not run: ``fast`` falls back and run.json names the reason."""
    import harness.engine as he

    monkeypatch.setattr(he, "fast_generation_supported", lambda m: (False, "model_type 'x' is not tested"))
    s = Settings(model="tiny", traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"),
                 cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, generator="fast", extractor="mean-diff")
    with pytest.warns(UserWarning, match="using the 'hf' generator"):
        run_trait("mini", s, pm=tiny_pm)
    comps = json.loads((tmp_path / "run" / "run.json").read_text())["components"]
    assert comps["generator"] == "hf"
    assert comps["choices"]["generator"] == {"setting": "fast", "chosen": "hf", "reason": "model_type 'x' is not tested"}


def test_auto_builds_the_registered_component(pm):
    """``auto`` resolves to the component registered under the chosen name (a plugin's override too)."""
    from harness.core.hookspecs import hookimpl
    from harness_plugins.generate_hf import HFGenerator

    class MyHF(HFGenerator):
        pass

    class Plug:
        @hookimpl
        def harness_register_generators(self, register):
            register("hf", MyHF)

    pm.register(Plug(), name="my-hf")
    gen = build_registry(pm, "generator").create("auto", Settings(device="cpu"))
    assert type(gen) is MyHF and gen.choice["setting"] == "auto" and gen.choice["chosen"] == "hf"
