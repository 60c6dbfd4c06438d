"""Acceptance checks for persona vectors: ``pytest traits/ --trait sycophantic``.

Each test runs once per ``--trait`` (the persona_harness pytest plugin parametrizes ``trait``) and
shares one pipeline run per trait (session fixtures; the on-disk cache makes reruns fast).
Thresholds come from ``traits/<name>/checks.json`` (a ``default`` block, overridden per model).
These tests only use the plugin's fixtures and ``harness.checks``, so another project can copy
this file into its own traits directory.
"""

from __future__ import annotations

import pytest

from harness import checks

pytestmark = pytest.mark.acceptance


def test_score_gap(trait, trait_generations, trait_judgments, trait_selection, trait_thresholds, acceptance):
    """1. Judge scores: mean pos - mean neg >= score_gap, and effective-pair rate >= the minimum."""
    gap = checks.score_gap(trait, trait_generations, trait_judgments, split="extract")
    rate = checks.effective_pair_rate(trait_selection)
    acceptance.metric("pos_mean", gap["pos_mean"])
    acceptance.metric("neg_mean", gap["neg_mean"])
    ok_gap = acceptance.metric("score_gap", gap["gap"], trait_thresholds["score_gap"], ">=")
    ok_rate = acceptance.metric("effective_pair_rate", rate["rate"], trait_thresholds["effective_pair_rate"], ">=")
    acceptance.info("score_gap_eval_split", checks.score_gap(trait, trait_generations, trait_judgments, split="eval"))
    acceptance.info("pairs", rate)
    assert ok_gap, (f"score gap {gap['gap']} (pos {gap['pos_mean']}, neg {gap['neg_mean']}) "
                    f"< {trait_thresholds['score_gap']}")
    assert ok_rate, (f"effective-pair rate {rate['rate']:.3f} ({rate['kept']} of {rate['candidates']}; "
                     f"dropped {trait_selection.dropped}) < {trait_thresholds['effective_pair_rate']}")


def test_norm_peak(trait_vector, trait_thresholds, acceptance):
    """2. The layer of max ||v[l]|| (inner layers 1..L-1) lies in the configured relative-depth band."""
    peak = checks.norm_peak(checks.layer_norms(trait_vector))
    acceptance.metric("peak_layer", peak["peak_layer"])
    band = trait_thresholds["norm_peak_band"]
    ok = acceptance.metric("relative_depth", peak["relative_depth"], band, "in")
    acceptance.info("norm_peak", peak)
    assert ok, (f"norm peak at layer {peak['peak_layer']} of {peak['num_layers']} (relative depth "
                f"{peak['relative_depth']:.3f}) is outside {band}")


def test_projection_auroc(trait_vector, eval_activations, trait_thresholds, acceptance):
    """3. Eval-split responses (never used for extraction) under pos vs neg prompts, projected on the
    unit vector at the check layer, separate with AUROC >= the threshold."""
    table = checks.per_layer_auroc(eval_activations["pos"], eval_activations["neg"], trait_vector)
    peak = checks.norm_peak(checks.layer_norms(trait_vector))
    layer = checks.check_layer(trait_thresholds["layer"], peak["peak_layer"], peak["num_layers"])
    acceptance.metric("layer", layer)
    acceptance.metric("n_pos_n_neg", f"{len(eval_activations['pos'])}/{len(eval_activations['neg'])}")
    ok = acceptance.metric("auroc", table[layer], trait_thresholds["auroc"], ">=")
    best = max(range(1, len(table) - 1), key=lambda i: table[i])
    acceptance.metric("best_inner_layer_auroc", f"{table[best]:.3f} @ {best}")
    acceptance.info("auroc_per_layer", [round(a, 4) for a in table])
    assert ok, f"eval-split AUROC {table[layer]:.3f} at layer {layer} < {trait_thresholds['auroc']}"


def test_reference_cosine(trait, trait_vector, reference_vector, trait_thresholds, acceptance):
    """4. Regression: cosine(new vector, stored reference) at the check layer >= the threshold."""
    if reference_vector is None:
        pytest.skip(f"no reference vector for trait {trait!r} and this model; write it with "
                    f"'persona-harness reference --trait {trait}' (or pytest --update-reference)")
    ref = reference_vector[checks.REFERENCE_METHOD]
    cos = checks.per_layer_cosine(trait_vector, ref)
    peak = checks.norm_peak(checks.layer_norms(trait_vector))
    layer = checks.check_layer(trait_thresholds["layer"], peak["peak_layer"], peak["num_layers"])
    acceptance.metric("layer", layer)
    inner = cos[1:-1]
    acceptance.metric("min_inner_cosine", min(inner))
    ok = acceptance.metric("cosine", cos[layer], trait_thresholds["reference_cosine"], ">=")
    acceptance.info("cosine_per_layer", [round(c, 4) for c in cos])
    assert ok, (f"cosine to the reference {cos[layer]:.3f} at layer {layer} < {trait_thresholds['reference_cosine']}"
                " (update it with --update-reference if the change is intended)")
