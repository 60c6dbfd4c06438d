"""The metrics every check, monitor and report uses: one implementation each.

Pure Python over sequences of floats (no torch needed), except the helpers that take tensors
(``layer_norms``, ``projections``, ``cosine``). Undefined values are ``nan`` (never an exception),
so callers decide: a check treats ``nan`` as a failure, a report prints "n/a".

Layer convention: ``hidden_states`` indices 0..L; index 0 is the embedding output and index L comes
after the final norm, so the rules that pick a layer look at the *inner* indices 1..L-1
(``inner_layers``).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

from harness.core.records import inner_layers, peak_layer

__all__ = ["inner_layers", "peak_layer", "layer_norms", "auroc", "cohens_d", "pearson", "ranks", "spearman",
           "cosine", "projections", "bootstrap_ci", "finite_or_none"]

NAN = float("nan")


# -- layers (the inner-layer rule itself lives with the layer convention, in harness.core.records) --
def layer_norms(vector: Any) -> list[float]:
    """||v[l]|| for every hidden_states index of a ``[L+1, H]`` tensor (or nested list)."""
    if hasattr(vector, "float"):
        return [float(x) for x in vector.float().norm(dim=-1).tolist()]
    return [math.sqrt(sum(float(x) ** 2 for x in row)) for row in vector]


# -- two-class separation --------------------------------------------------------------------------
def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(pos > neg) + 0.5 P(pos == neg) over all pairs: the Mann-Whitney U statistic / (n_pos n_neg),
    from average ranks (ties share their mean rank). ``nan`` when a class is empty or a value is nan."""
    pos, neg = [float(x) for x in pos], [float(x) for x in neg]
    if not pos or not neg or any(math.isnan(x) for x in (*pos, *neg)):
        return NAN
    allv = sorted([(x, 1) for x in pos] + [(x, 0) for x in neg], key=lambda t: t[0])
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based mean rank of the tie block
        rank_sum += avg * sum(1 for k in range(i, j + 1) if allv[k][1] == 1)
        i = j + 1
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def cohens_d(pos: Sequence[float], neg: Sequence[float]) -> float:
    """(mean_pos - mean_neg) / pooled SD (sample variances); ``nan`` when undefined."""
    n1, n2 = len(pos), len(neg)
    if n1 < 2 or n2 < 2:
        return NAN
    m1, m2 = sum(pos) / n1, sum(neg) / n2
    v1 = sum((x - m1) ** 2 for x in pos) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in neg) / (n2 - 1)
    sp = math.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    if sp == 0:
        return NAN if m1 == m2 else math.copysign(float("inf"), m1 - m2)
    return (m1 - m2) / sp


# -- correlation -----------------------------------------------------------------------------------
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; ``nan`` for fewer than 3 points or a constant series."""
    n = len(x)
    if n < 3 or len(y) != n or len(set(x)) < 2 or len(set(y)) < 2:  # constant: exact, not via rounding
        return NAN
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else NAN


def ranks(x: Sequence[float]) -> list[float]:
    """1-based average ranks (ties share their mean rank)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    if len(x) != len(y):
        return NAN
    return pearson(ranks(x), ranks(y))


# -- vectors ---------------------------------------------------------------------------------------
def cosine(a: Any, b: Any) -> float:
    """Cosine of two tensors (flattened); 0 when either is zero."""
    a, b = a.float().flatten(), b.float().flatten()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else 0.0


def projections(means: Any, vector: Any) -> Any:
    """Projections of per-example means ``[n, L+1, H]`` on the unit vector of each layer: ``[n, L+1]``.
    A layer whose vector is zero projects to 0."""
    v = vector.float()
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (means.float() * unit[None]).sum(-1)


# -- uncertainty -----------------------------------------------------------------------------------
def bootstrap_ci(groups: Sequence[Any], statistic: Callable[[list], float], *, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resampled ``groups`` (e.g. one group per
    evaluation question: resampling questions, not responses, keeps the responses to one question
    together). Resamples whose statistic is nan are dropped; ``(nan, nan)`` when none is left."""
    groups = list(groups)
    if not groups:
        return NAN, NAN
    rng = random.Random(seed)
    vals = []
    for _ in range(n_boot):
        v = statistic([groups[rng.randrange(len(groups))] for _ in groups])
        if v is not None and not math.isnan(v):
            vals.append(v)
    if not vals:
        return NAN, NAN
    vals.sort()
    lo = vals[int(math.floor(alpha / 2 * (len(vals) - 1)))]
    hi = vals[int(math.ceil((1 - alpha / 2) * (len(vals) - 1)))]
    return float(lo), float(hi)


def finite_or_none(x: Any, nd: int = 6) -> float | None:
    """``x`` rounded for JSON, or None when it is missing or not finite."""
    return None if x is None or not math.isfinite(float(x)) else round(float(x), nd)
