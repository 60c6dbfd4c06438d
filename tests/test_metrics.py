"""One implementation of every metric (harness.analysis.metrics), cross-checked against
scikit-learn and SciPy (test-only dependencies), and the bootstrap intervals the checks use."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.analysis import metrics as M

values = st.lists(st.integers(-6, 6) | st.floats(-5, 5, allow_nan=False, width=32), min_size=1, max_size=25)


@settings(max_examples=80, deadline=None)
@given(values, values)
def test_auroc_equals_scikit_learn_with_ties(pos, neg):
    from sklearn.metrics import roc_auc_score

    want = roc_auc_score([1] * len(pos) + [0] * len(neg), [float(x) for x in pos + neg])
    assert M.auroc(pos, neg) == pytest.approx(want, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 100, allow_nan=False), st.integers(-3, 3)), min_size=3, max_size=30))
def test_pearson_and_spearman_equal_scipy(pairs):
    from scipy import stats

    x, y = [p[0] for p in pairs], [float(p[1]) for p in pairs]
    if len(set(x)) < 2 or len(set(y)) < 2:
        assert math.isnan(M.pearson(x, y)) and math.isnan(M.spearman(x, y))
        return
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-9)
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)


def test_undefined_metrics_are_nan_not_errors():
    assert math.isnan(M.auroc([], [1.0])) and math.isnan(M.auroc([float("nan")], [1.0]))
    assert math.isnan(M.pearson([1, 2], [3, 4])) and math.isnan(M.cohens_d([1], [2, 3]))


def test_inner_layers_and_peak_follow_the_layer_convention():
    assert list(M.inner_layers(5)) == [1, 2, 3] and list(M.inner_layers(2)) == [0, 1]
    assert M.peak_layer([100.0, 1.0, 3.0, 3.0, 50.0]) == 2  # ends excluded, first of a tie


def test_bootstrap_interval_covers_the_statistic_and_shrinks_with_more_groups():
    rng = random.Random(0)
    small = [rng.gauss(0, 1) for _ in range(10)]
    big = [rng.gauss(0, 1) for _ in range(400)]

    def mean(xs):
        return sum(xs) / len(xs)

    lo_s, hi_s = M.bootstrap_ci(small, mean, n_boot=500)
    lo_b, hi_b = M.bootstrap_ci(big, mean, n_boot=500)
    assert lo_s <= mean(small) <= hi_s and lo_b <= mean(big) <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 3
    assert M.bootstrap_ci(small, mean, n_boot=200, seed=1) == M.bootstrap_ci(small, mean, n_boot=200, seed=1)
    assert all(math.isnan(x) for x in M.bootstrap_ci([], mean))
    # a constant statistic has a degenerate interval
    assert M.bootstrap_ci(small, lambda xs: 3.0, n_boot=50) == (3.0, 3.0)


def test_metric_rules_live_in_one_module():
    """No other module of the harness defines its own AUROC, correlation or inner-layer rule."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pat = re.compile(r"^def (auroc|pearson|spearman|cohens_d|inner_layers|peak_layer|_inner)\(", re.M)
    where = {str(p.relative_to(root)) for p in [*root.joinpath("harness").rglob("*.py"), *root.joinpath("plugins").glob("*.py")]
             if pat.search(p.read_text(encoding="utf-8"))}
    assert where == {"harness/analysis/metrics.py", "harness/core/records.py"}
