"""The pipeline end to end on a tiny random model: run directory, records, cache reuse."""

from __future__ import annotations

import json

from harness.core.artifacts import load_vectors, read_jsonl
from harness.core.config import Settings
from harness.core.pipeline import run_trait


def _settings(tmp_path, mini_trait_dir, **kw):
    base = dict(model="tiny", traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"),
                cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                judge_min_mass=0.0, max_new_tokens=6, progress=False, profile="paper")
    base.update(kw)
    return Settings(**base)


def test_run_writes_run_directory(tmp_path, tiny_pm, mini_trait_dir):
    s = _settings(tmp_path, mini_trait_dir)
    res = run_trait("mini", s, pm=tiny_pm)
    d = tmp_path / "run"
    for name in ("run.json", "generations.jsonl", "judgments.jsonl", "selection.json", "vectors.safetensors"):
        assert (d / name).exists(), name
    gens = list(read_jsonl(d / "generations.jsonl"))
    assert len(gens) == 3 * 5 * 2
    assert {g["polarity"] for g in gens} == {"pos", "neg"}
    assert all("response_token_ids" in g and "prompt_token_ids" in g for g in gens)
    judg = list(read_jsonl(d / "judgments.jsonl"))
    assert len(judg) == 2 * len(gens)
    vs = load_vectors(d / "vectors.safetensors")
    L, H = res.vectors.tensors["response_avg_diff"].shape
    assert (L, H) == (3 + 1, 64)
    assert set(vs.tensors) == {"response_avg_diff", "prompt_avg_diff", "prompt_last_diff"}
    assert vs.trait == "mini" and vs.model_id
    assert "layer_convention" in vs.metadata or vs.layer_convention.startswith("hidden_states")
    run = json.loads((d / "run.json").read_text())
    assert run["counts"]["generations"] == 30
    assert run["summary"]["pairs_kept"] == res.summary["pairs_kept"] > 0
    assert {"generate", "judge", "filter", "extract", "total"} <= set(run["timings"])
    assert any(p["name"] == "harness_plugins.generate_hf" for p in run["plugins"])


def test_rerun_hits_cache_and_recomputes_nothing(tmp_path, tiny_pm, mini_trait_dir):
    s = _settings(tmp_path, mini_trait_dir)
    first = run_trait("mini", s, pm=tiny_pm)

    from harness_plugins.generate_hf import HFGenerator

    class Boom(HFGenerator):  # the hf generator's config (its version): the same cache keys
        name = "hf"

        def generate(self, requests, ctx):  # pragma: no cover - must not run
            raise AssertionError(f"regenerated {len(requests)} requests")

    from harness.core.hookspecs import hookimpl

    class Override:
        @hookimpl
        def harness_register_generators(self, register):
            register("hf", Boom)

    tiny_pm.register(Override(), name="boom")
    second = run_trait("mini", s, pm=tiny_pm)
    assert [g.response for g in second.generations] == [g.response for g in first.generations]
    assert second.summary["pairs_kept"] == first.summary["pairs_kept"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["timings"]["generate_cached"] == 30 and run["timings"]["judge_cached"] == 60
    import torch

    assert torch.equal(second.vectors["response_avg_diff"], first.vectors["response_avg_diff"])


def test_rerun_that_keeps_no_pairs_leaves_no_stale_vector(tmp_path, tiny_pm, mini_trait_dir):
    """A rerun into the same run directory that keeps 0 pairs: clear error, no vectors.safetensors
    beside the new records (the earlier vector is kept as vectors.previous.safetensors), run.json failed."""
    import pytest

    from harness.core.errors import NoEffectivePairsError

    run_trait("mini", _settings(tmp_path, mini_trait_dir), pm=tiny_pm)
    d = tmp_path / "run"
    before = (d / "vectors.safetensors").read_bytes()
    with pytest.raises(NoEffectivePairsError, match="kept 0 of"):
        run_trait("mini", _settings(tmp_path, mini_trait_dir, trait_threshold=100.0), pm=tiny_pm)
    assert not (d / "vectors.safetensors").exists()
    assert (d / "vectors.previous.safetensors").read_bytes() == before
    run = json.loads((d / "run.json").read_text())
    assert run["status"] == "failed: no effective pairs"
    assert "vectors.safetensors" not in run["summary"]["files"]
