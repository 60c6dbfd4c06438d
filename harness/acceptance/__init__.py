"""The acceptance checks for persona vectors, shipped with the package.

Any project that installs persona-harness runs them with a one-line test module in its traits
folder (``traits/test_acceptance.py`` of this repository is exactly that)::

    from harness.acceptance import *  # noqa: F401,F403

and ``pytest traits/ --trait NAME``. The tests are parametrized by ``trait`` (the ``persona_harness``
pytest plugin does it for every ``--trait``) and share one pipeline run per trait through the
plugin's session fixtures (the on-disk cache makes reruns fast). Thresholds come from
``traits/<name>/checks.json`` (a ``default`` block, overridden per model); see
``harness.analysis.checks`` for every metric and docs/acceptance.md for the whole list.

The checks measure the trait rather than the prompt: separation and specificity are computed on
the evaluation split re-encoded under one neutral prompt shared by pos and neg (the in-context
figure is reported beside it); the norm peak is taken on the norm relative to the layer's typical
activation norm; every evaluation-split metric carries a bootstrap interval over questions, and a
floor-type check passes on the interval's lower bound.

A threshold set to ``null`` makes its metric informational for that model: the metric is still
measured and printed in the summary table, the other thresholds of the check are still enforced,
and then the test is skipped with the measured value and the reason (the block's ``"_<key>"``
note). This module is not collected by itself (its name does not start with ``test_``).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.analysis import checks

__all__ = ["pytestmark", "test_score_gap", "test_norm_peak", "test_projection_auroc", "test_heldout_cosine",
           "test_specificity", "test_score_correlation", "test_reference_cosine"]

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


def _ci(r: dict) -> str:
    lo, hi = r["ci"]
    return f"{_f(r['value'], 3)} (95% CI {_f(lo, 3)}..{_f(hi, 3)})"


def _skip_if_informational(th: dict, keys: tuple, measured: str) -> None:
    msg = _informational(th, keys, measured)
    if msg:
        pytest.skip(msg)


def test_score_gap(trait, trait_generations, trait_judgments, trait_selection, trait_thresholds, acceptance):
    """1. Judge scores: mean pos - mean neg >= score_gap (on the interval's lower bound), and the
    effective-pair rate >= the minimum."""
    th = trait_thresholds
    gap = checks.score_gap(trait, trait_generations, trait_judgments, split="extract")
    ci = checks.score_gap_ci(trait, trait_generations, trait_judgments, split="extract", n_boot=checks.N_BOOT)
    rate = checks.effective_pair_rate(trait_selection)
    acceptance.metric("pos_mean", gap["pos_mean"])
    acceptance.metric("neg_mean", gap["neg_mean"])
    ok_gap = acceptance.metric("score_gap", gap["gap"], th["score_gap"], ">=", ci=ci)
    ok_rate = acceptance.metric("effective_pair_rate", rate["rate"], th["effective_pair_rate"], ">=")
    acceptance.info("score_gap_eval_split", checks.score_gap(trait, trait_generations, trait_judgments, split="eval"))
    acceptance.info("pairs", rate)
    assert ok_gap, (f"score gap {_f(gap['gap'])} (95% CI {_f(ci[0])}..{_f(ci[1])}; pos {_f(gap['pos_mean'])}, "
                    f"neg {_f(gap['neg_mean'])}): lower bound < {th['score_gap']}")
    assert ok_rate, (f"effective-pair rate {rate['rate']:.3f} ({rate['kept']} of {rate['candidates']}; "
                     f"dropped {trait_selection.dropped}) < {th['effective_pair_rate']}")
    _skip_if_informational(th, ("score_gap", "effective_pair_rate"),
                           f"score gap {_f(gap['gap'])} (95% CI {_f(ci[0])}..{_f(ci[1])}, pos mean "
                           f"{_f(gap['pos_mean'])}, neg mean {_f(gap['neg_mean'])}, extraction split), "
                           f"effective-pair rate {rate['rate']:.3f} ({rate['kept']} of {rate['candidates']})")


def test_norm_peak(trait_norm_peak, trait_thresholds, acceptance):
    """2. The layer of max ||v[l]|| / mean ||h[l]|| (inner layers 1..L-1) lies in the relative-depth
    band; the raw-norm peak is reported beside it."""
    peak = trait_norm_peak
    acceptance.metric("peak_layer", peak["peak_layer"])
    acceptance.metric("raw_peak_layer", peak["raw_peak_layer"])
    band = trait_thresholds["norm_peak_band"]
    ok = acceptance.metric("relative_depth", peak["relative_depth"], band, "in")
    acceptance.info("norm_peak", peak)
    assert ok, (f"relative-norm peak at layer {peak['peak_layer']} of {peak['num_layers']} (relative depth "
                f"{peak['relative_depth']:.3f}) is outside {band}")
    _skip_if_informational(trait_thresholds, ("norm_peak_band",), f"relative-norm peak at layer "
                           f"{peak['peak_layer']} of {peak['num_layers']} (relative depth {peak['relative_depth']:.3f})")


def test_projection_auroc(trait_vector, eval_set_neutral, eval_set, check_layer, trait_thresholds, acceptance):
    """3. Eval-split responses (never used for extraction) written under pos vs neg prompts,
    re-encoded under one neutral prompt and projected on the unit vector at the check layer,
    separate with AUROC >= the threshold (lower bound of the interval). The in-context AUROC (each
    response re-encoded under the prompt it was written under) is reported, not enforced."""
    layer = check_layer
    sep = checks.separation(eval_set_neutral, trait_vector, layer, n_boot=checks.N_BOOT)
    table = checks.per_layer_auroc(eval_set_neutral.pos, eval_set_neutral.neg, trait_vector)
    ctx_table = checks.per_layer_auroc(eval_set.pos, eval_set.neg, trait_vector)
    acceptance.metric("layer", layer)
    acceptance.metric("n_pos_n_neg", f"{sep['n_pos']}/{sep['n_neg']}")
    ok = acceptance.metric("auroc", sep["value"], trait_thresholds["auroc"], ">=", ci=sep["ci"])
    acceptance.metric("auroc_in_context", ctx_table[layer])
    best = max(range(1, len(table) - 1), key=lambda i: table[i])
    acceptance.metric("best_inner_layer_auroc", f"{table[best]:.3f} @ {best}")
    acceptance.info("auroc_per_layer", [round(a, 4) for a in table])
    acceptance.info("auroc_in_context_per_layer", [round(a, 4) for a in ctx_table])
    assert ok, f"eval-split AUROC (neutral prompt) {_ci(sep)} at layer {layer}: lower bound < {trait_thresholds['auroc']}"
    _skip_if_informational(trait_thresholds, ("auroc",), f"eval-split AUROC (neutral prompt) {_ci(sep)} at layer {layer}")


def test_heldout_cosine(trait_vector, eval_set, check_layer, trait_thresholds, acceptance):
    """4. The vector points where the evaluation split's own mean difference points: cosine at the
    check layer >= ``heldout_cosine`` (lower bound); and it matches the response-mean difference
    better than the prompt-mean and last-prompt-token differences of the same responses, by
    ``heldout_method_margin`` (a vector of the wrong extraction method does not). A flipped or random
    vector, or one from shuffled labels, fails the first."""
    th, layer = trait_thresholds, check_layer
    r = checks.heldout_cosine(eval_set, trait_vector, layer, n_boot=checks.N_BOOT)
    acceptance.metric("layer", layer)
    ok = acceptance.metric("heldout_cosine", r["value"], th["heldout_cosine"], ">=", ci=r["ci"])
    m = checks.heldout_method_margin(eval_set, trait_vector, layer, n_boot=checks.N_BOOT) if eval_set.methods else None
    ok_m = True
    if m is not None:
        ok_m = acceptance.metric("heldout_method_margin", m["value"], th["heldout_method_margin"], ">=", ci=m["ci"])
        acceptance.info("heldout_cosine_by_method", m["cosine_by_method"])
    acceptance.info("heldout_cosine_per_layer", [round(c, 4) for c in checks.per_layer_heldout_cosine(eval_set, trait_vector)])
    assert ok, f"cosine to the eval split's mean difference {_ci(r)} at layer {layer}: lower bound < {th['heldout_cosine']}"
    assert ok_m, (f"the vector is not closer to the eval split's response-mean difference than to its prompt-token "
                  f"differences ({m['cosine_by_method']}): margin {_ci(m)} at layer {layer}, lower bound < "
                  f"{th['heldout_method_margin']} (the wrong extraction method?)")
    _skip_if_informational(th, ("heldout_cosine", "heldout_method_margin"), f"held-out cosine {_ci(r)}"
                           + (f", method margin {_ci(m)}" if m else "") + f" at layer {layer}")


def test_specificity(trait, trait_vector, eval_set, eval_set_neutral, other_trait_vectors, specificity_matrix,
                     check_layer, trait_thresholds, acceptance):
    """5. The trait's vector separates its own evaluation split (neutral prompt) clearly better than
    the other installed traits' vectors do: own AUROC - best other AUROC >= the margin (lower bound).
    The trait x vector matrix of the traits run in this session is reported (and each other trait's
    vector must do better on its own split than this one does there)."""
    if not other_trait_vectors:
        pytest.skip(f"no other trait's vector for this model (run several --trait at once, or store references "
                    f"with 'persona-harness reference'): specificity of {trait!r} not measured")
    th, layer = trait_thresholds, check_layer
    r = checks.specificity(eval_set_neutral, trait_vector, other_trait_vectors, layer, n_boot=checks.N_BOOT)
    c = checks.specificity_cosine(eval_set, trait_vector, other_trait_vectors, layer, n_boot=checks.N_BOOT)
    acceptance.metric("layer", layer)
    acceptance.metric("own_auroc", r["own_auroc"])
    acceptance.metric("best_other_auroc", max(r["other_auroc"].values()))
    ok = acceptance.metric("specificity_margin", r["value"], th["specificity_margin"], ">=", ci=r["ci"])
    acceptance.metric("own_cosine", c["own_cosine"])
    acceptance.metric("best_other_cosine", max(c["other_cosine"].values()))
    ok_c = acceptance.metric("specificity_cosine_margin", c["value"], th["specificity_cosine_margin"], ">=", ci=c["ci"])
    acceptance.info("specificity_other_auroc", r["other_auroc"])
    acceptance.info("specificity_other_cosine", c["other_cosine"])
    acceptance.info("specificity_matrix", specificity_matrix)
    assert ok, (f"own AUROC {r['own_auroc']:.3f} minus best other trait's {max(r['other_auroc'].values()):.3f} "
                f"({r['other_auroc']}) = {_ci(r)} at layer {layer}: lower bound < {th['specificity_margin']}")
    assert ok_c, (f"cosine to this trait's eval mean difference {c['own_cosine']:.3f} minus best other trait's "
                  f"{max(c['other_cosine'].values()):.3f} ({c['other_cosine']}) = {_ci(c)} at layer {layer}: lower "
                  f"bound < {th['specificity_cosine_margin']} (another trait's vector?)")
    col = specificity_matrix.get("auroc", {})
    worse = [v for v, row in col.items() if v != trait and trait in row and v in row
             and row.get(trait) is not None and row.get(v) is not None and row[v] <= row[trait]]
    assert not worse, (f"on the evaluation split of {worse}, {trait!r}'s vector separates at least as well as "
                       f"their own vector ({ {v: col[v] for v in worse} })")
    _skip_if_informational(th, ("specificity_margin", "specificity_cosine_margin"),
                           f"AUROC margin {_ci(r)}, cosine margin {_ci(c)} at layer {layer}")


def test_score_correlation(trait_vector, eval_set_neutral, eval_judged, check_layer, trait_thresholds, acceptance):
    """6. Monitoring: the projection at the check layer correlates with the judged trait score over
    the evaluation responses (Pearson r >= the threshold on the lower bound; Spearman reported)."""
    if not eval_judged:
        pytest.skip("the evaluation split was not judged: pass --harness-judge-eval to measure the "
                    "projection / trait-score correlation")
    layer = check_layer
    r = checks.score_correlation(eval_set_neutral, trait_vector, layer, n_boot=checks.N_BOOT)
    acceptance.metric("layer", layer)
    acceptance.metric("n_scored", r["n_scored"])
    acceptance.metric("spearman", r["spearman"])
    ok = acceptance.metric("pearson", r["value"], trait_thresholds["score_correlation"], ">=", ci=r["ci"])
    acceptance.info("score_correlation_per_layer", checks.per_layer_correlation(eval_set_neutral, trait_vector))
    assert ok, (f"projection / trait-score Pearson r {_ci(r)} at layer {layer}: lower bound < "
                f"{trait_thresholds['score_correlation']}")
    _skip_if_informational(trait_thresholds, ("score_correlation",), f"Pearson r {_ci(r)} (Spearman "
                           f"{_f(r['spearman'], 3)}) at layer {layer}")


def test_reference_cosine(trait, trait_vector, reference_vector, reference_reproducible, trait_thresholds, acceptance):
    """7. Regression against the stored reference, at every inner layer: cosine >= the threshold; and
    when the reference was made with the same trait, settings and seed, the new vector reproduces it
    within ``reproduce_tolerance`` (relative error) at every layer."""
    if reference_vector is None:
        pytest.skip(f"no reference vector for trait {trait!r} and this model; write it with "
                    f"'persona-harness reference --trait {trait}' (or pytest --harness-update-reference)")
    ref = reference_vector[checks.REFERENCE_METHOD]
    cos = checks.per_layer_cosine(trait_vector, ref)
    inner = range(1, len(cos) - 1)
    worst = min(inner, key=lambda i: cos[i])
    acceptance.metric("worst_inner_layer", worst)
    ok = acceptance.metric("min_inner_cosine", cos[worst], trait_thresholds["reference_cosine"], ">=")
    acceptance.info("cosine_per_layer", [round(c, 4) for c in cos])
    same, why = reference_reproducible
    acceptance.metric("reproducible", same)
    acceptance.info("reproducible_why", why)
    assert ok, (f"cosine to the reference {cos[worst]:.3f} at layer {worst} < {trait_thresholds['reference_cosine']}"
                " (update it with --harness-update-reference if the change is intended)")
    if same and trait_thresholds["reproduce_tolerance"] is not None:
        err = checks.per_layer_relative_error(trait_vector, ref)
        bad = max(range(len(err)), key=lambda i: err[i])
        ok_r = acceptance.metric("max_relative_error", err[bad], trait_thresholds["reproduce_tolerance"], "<=")
        assert ok_r, (f"the reference was made with the same trait, settings and seed ({why}) but the new vector "
                      f"differs by {err[bad]:.2e} (relative) at layer {bad} > {trait_thresholds['reproduce_tolerance']}: "
                      "the pipeline is not reproducible here")
    _skip_if_informational(trait_thresholds, ("reference_cosine",), f"min inner-layer cosine to the reference "
                           f"{cos[worst]:.3f} at layer {worst}")
