"""The four acceptance checks for persona vectors, shipped with the package.

Any project that installs persona-harness runs them with a one-line test module in its traits
folder (``traits/test_acceptance.py`` of this repository is exactly that)::

    from harness.acceptance import *  # noqa: F401,F403

and ``pytest traits/ --trait NAME``. The tests are parametrized by ``trait`` (the ``persona_harness``
pytest plugin does it for every ``--trait``) and share one pipeline run per trait through the
plugin's session fixtures (the on-disk cache makes reruns fast). Thresholds come from
``traits/<name>/checks.json`` (a ``default`` block, overridden per model); see ``harness.analysis.checks``.

A threshold set to ``null`` makes its metric informational for that model: the metric is still
measured and printed in the summary table, the other thresholds of the check are still enforced,
and then the test is skipped with the measured value and the reason (the block's ``"_<key>"``
note). This module is not collected by itself (its name does not start with ``test_``).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.analysis import checks

__all__ = ["pytestmark", "test_score_gap", "test_norm_peak", "test_projection_auroc", "test_reference_cosine"]

pytestmark = pytest.mark.acceptance


def _informational(thresholds: dict, keys: tuple, measured: str) -> str | None:
    """The skip message when some of the check's thresholds are null (informational for this model)."""
    null = [k for k in keys if thresholds.get(k) is None]
    if not null:
        return None
    notes = thresholds.get("_notes") or {}
    why = " ".join(f"{notes[k]}" for k in null if notes.get(k)) or "no '_<key>' note in checks.json says why."
    return (f"informational for model block {thresholds.get('_source')!r} ({', '.join(null)}: null in "
            f"checks.json, not enforced): measured {measured}. Why: {why}")


def _f(x: Any, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def test_score_gap(trait, trait_generations, trait_judgments, trait_selection, trait_thresholds, acceptance):
    """1. Judge scores: mean pos - mean neg >= score_gap, and effective-pair rate >= the minimum."""
    th = trait_thresholds
    gap = checks.score_gap(trait, trait_generations, trait_judgments, split="extract")
    rate = checks.effective_pair_rate(trait_selection)
    acceptance.metric("pos_mean", gap["pos_mean"])
    acceptance.metric("neg_mean", gap["neg_mean"])
    ok_gap = acceptance.metric("score_gap", gap["gap"], th["score_gap"], ">=")
    ok_rate = acceptance.metric("effective_pair_rate", rate["rate"], th["effective_pair_rate"], ">=")
    acceptance.info("score_gap_eval_split", checks.score_gap(trait, trait_generations, trait_judgments, split="eval"))
    acceptance.info("pairs", rate)
    assert ok_gap, f"score gap {gap['gap']} (pos {gap['pos_mean']}, neg {gap['neg_mean']}) < {th['score_gap']}"
    assert ok_rate, (f"effective-pair rate {rate['rate']:.3f} ({rate['kept']} of {rate['candidates']}; "
                     f"dropped {trait_selection.dropped}) < {th['effective_pair_rate']}")
    msg = _informational(th, ("score_gap", "effective_pair_rate"),
                         f"score gap {_f(gap['gap'])} (pos mean {_f(gap['pos_mean'])}, neg mean "
                         f"{_f(gap['neg_mean'])}, extraction split), effective-pair rate {rate['rate']:.3f} "
                         f"({rate['kept']} of {rate['candidates']})")
    if msg:
        pytest.skip(msg)


def test_norm_peak(trait_vector, trait_thresholds, acceptance):
    """2. The layer of max ||v[l]|| (inner layers 1..L-1) lies in the configured relative-depth band."""
    peak = checks.norm_peak(checks.layer_norms(trait_vector))
    acceptance.metric("peak_layer", peak["peak_layer"])
    band = trait_thresholds["norm_peak_band"]
    ok = acceptance.metric("relative_depth", peak["relative_depth"], band, "in")
    acceptance.info("norm_peak", peak)
    assert ok, (f"norm peak at layer {peak['peak_layer']} of {peak['num_layers']} (relative depth "
                f"{peak['relative_depth']:.3f}) is outside {band}")
    msg = _informational(trait_thresholds, ("norm_peak_band",), f"norm peak at layer {peak['peak_layer']} of "
                         f"{peak['num_layers']} (relative depth {peak['relative_depth']:.3f})")
    if msg:
        pytest.skip(msg)


def _layer(trait_vector, trait_thresholds) -> int:
    peak = checks.norm_peak(checks.layer_norms(trait_vector))
    return checks.check_layer(trait_thresholds["layer"], peak["peak_layer"], peak["num_layers"])


def test_projection_auroc(trait_vector, eval_activations, trait_thresholds, acceptance):
    """3. Eval-split responses (never used for extraction) under pos vs neg prompts, projected on the
    unit vector at the check layer, separate with AUROC >= the threshold."""
    table = checks.per_layer_auroc(eval_activations["pos"], eval_activations["neg"], trait_vector)
    layer = _layer(trait_vector, trait_thresholds)
    acceptance.metric("layer", layer)
    acceptance.metric("n_pos_n_neg", f"{len(eval_activations['pos'])}/{len(eval_activations['neg'])}")
    ok = acceptance.metric("auroc", table[layer], trait_thresholds["auroc"], ">=")
    best = max(range(1, len(table) - 1), key=lambda i: table[i])
    acceptance.metric("best_inner_layer_auroc", f"{table[best]:.3f} @ {best}")
    acceptance.info("auroc_per_layer", [round(a, 4) for a in table])
    assert ok, f"eval-split AUROC {table[layer]:.3f} at layer {layer} < {trait_thresholds['auroc']}"
    msg = _informational(trait_thresholds, ("auroc",), f"eval-split AUROC {table[layer]:.3f} at layer {layer}")
    if msg:
        pytest.skip(msg)


def test_reference_cosine(trait, trait_vector, reference_vector, trait_thresholds, acceptance):
    """4. Regression: cosine(new vector, stored reference) at the check layer >= the threshold."""
    if reference_vector is None:
        pytest.skip(f"no reference vector for trait {trait!r} and this model; write it with "
                    f"'persona-harness reference --trait {trait}' (or pytest --update-reference)")
    ref = reference_vector[checks.REFERENCE_METHOD]
    cos = checks.per_layer_cosine(trait_vector, ref)
    layer = _layer(trait_vector, trait_thresholds)
    acceptance.metric("layer", layer)
    inner = cos[1:-1]
    acceptance.metric("min_inner_cosine", min(inner))
    ok = acceptance.metric("cosine", cos[layer], trait_thresholds["reference_cosine"], ">=")
    acceptance.info("cosine_per_layer", [round(c, 4) for c in cos])
    assert ok, (f"cosine to the reference {cos[layer]:.3f} at layer {layer} < {trait_thresholds['reference_cosine']}"
                " (update it with --update-reference if the change is intended)")
    msg = _informational(trait_thresholds, ("reference_cosine",), f"cosine to the reference {cos[layer]:.3f} "
                         f"at layer {layer}")
    if msg:
        pytest.skip(msg)
