"""Acceptance-check metrics: pure functions over records, vectors and activations.

Each function computes one check's metric; the pytest plugin (``harness.acceptance.plugin``) and the
tests in ``harness.acceptance`` (imported by ``traits/test_acceptance.py``) compare them with
per-trait, per-model thresholds from ``traits/<name>/checks.json``. Nothing here runs a model.
torch is only imported inside the functions that take tensors, so ``import harness.analysis.checks`` stays
light.

Layer convention (hidden_states): index 0 is the embedding output, index l in 1..L the output of
``model.layers[l-1]``; HF applies the final norm to index L. The norm peak and the automatic
check layer are chosen among the *inner* indices 1..L-1 only: index 0 carries no
trait-conditioned computation yet, and index L is rescaled by the final norm, so its norm is not
comparable with the others.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from harness.core.errors import HarnessError

#: Threshold keys a checks.json block may hold, with their meaning.
THRESHOLD_KEYS: dict[str, str] = {
    "score_gap": "mean pos trait score - mean neg trait score on the extraction split must be >= this",
    "effective_pair_rate": "effective pairs kept / candidate pairs on the extraction split must be >= this",
    "norm_peak_band": "[lo, hi]: relative depth (peak layer / L) of max ||v[l]|| over l in 1..L-1 must lie inside",
    "auroc": "AUROC of eval-split projections (pos vs neg responses) at the check layer must be >= this",
    "reference_cosine": "cosine(new vector, stored reference) at the check layer must be >= this",
    "layer": "check layer: 'auto' (the norm-peak layer, chosen from extraction data only) or an int in 1..L",
}
#: Thresholds that may be ``null``: the metric is still measured and reported, but not enforced (the
#: check is skipped with the measured value and the reason, taken from the block's ``"_<key>"`` note).
NULLABLE_KEYS = ("score_gap", "effective_pair_rate", "norm_peak_band", "auroc", "reference_cosine")
DEFAULT_THRESHOLDS: dict[str, Any] = {
    "score_gap": 10.0,
    "effective_pair_rate": 0.05,
    "norm_peak_band": [0.2, 0.97],
    "auroc": 0.6,
    "reference_cosine": 0.9,
    "layer": "auto",
}


def _err(path: str | Path, field: str, problem: str, fix: str) -> HarnessError:
    return HarnessError(f"{path}: {field}: {problem}. Fix: {fix}")


def validate_block(block: Any, path: str | Path, where: str) -> dict[str, Any]:
    """Check one thresholds block (``default`` or a model's) and return it."""
    if not isinstance(block, dict):
        raise _err(path, where, f"expected an object, got {type(block).__name__}", "write {\"score_gap\": 10, ...}")
    out: dict[str, Any] = {}
    for k, v in block.items():
        if k.startswith("_"):
            continue  # comments / notes
        f = f"{where}.{k}"
        if k not in THRESHOLD_KEYS:
            raise _err(path, f, "unknown threshold", f"use one of {', '.join(THRESHOLD_KEYS)}")
        if v is None and k in NULLABLE_KEYS:
            out[k] = None  # informational: measured and reported, not enforced
        elif k == "norm_peak_band":
            if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v)
                    or not 0.0 <= v[0] <= v[1] <= 1.0):
                raise _err(path, f, f"{v!r} is not a band", "write [lo, hi] with 0 <= lo <= hi <= 1")
            out[k] = [float(v[0]), float(v[1])]
        elif k == "layer":
            if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise _err(path, f, f"{v!r} is not a layer", "write \"auto\" or a hidden_states index >= 1")
            out[k] = v
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise _err(path, f, f"{v!r} is not a number", "write a number")
            out[k] = float(v)
    return out


def thresholds_for(checks: Mapping[str, Any], model: str, path: str | Path = "checks.json") -> dict[str, Any]:
    """Thresholds for ``model``: built-in defaults < the file's ``"default"`` block < the model's block.

    A model block is the top-level key equal to the model id (``"Qwen/Qwen2.5-7B-Instruct"``,
    ``"smollm2"``) or to its last path component (``"Qwen2.5-7B-Instruct"``). Keys starting with
    ``_`` are notes (``"_calibration"``, ``"_comment"``) and are not thresholds. A threshold set to
    ``null`` (see ``NULLABLE_KEYS``) is informational: the check reports the metric and is skipped;
    a ``"_<key>"`` note of the same block says why and ends up in ``out["_notes"][key]``.
    """
    checks = dict(checks or {})
    out = dict(DEFAULT_THRESHOLDS)
    notes: dict[str, str] = {}

    def merge(block: Any, where: str) -> None:
        out.update(validate_block(block, path, where))
        for k in THRESHOLD_KEYS:
            if k in block:
                notes.pop(k, None)
            if isinstance(block.get(f"_{k}"), str):
                notes[k] = block[f"_{k}"]

    merge(checks.get("default", {}), "default")
    source = "default"
    for cand in (model, model.rstrip("/").split("/")[-1]):
        if cand in checks and cand != "default" and not cand.startswith("_"):
            merge(checks[cand], cand)
            source = cand
            break
    for k, v in checks.items():  # validate the other blocks too, so a typo fails on every model
        if k != "default" and not k.startswith("_"):
            validate_block(v, path, k)
    out["_source"] = source
    out["_notes"] = notes
    return out


def load_checks_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(path, "(file)", f"not valid JSON ({e})", "fix the JSON syntax") from None
    if not isinstance(data, dict):
        raise _err(path, "(top level)", "expected an object", "see docs 'Acceptance checks'")
    return data


# -- check 1: score gap and effective-pair rate ------------------------------------------
def score_gap(trait: str, generations: Iterable[Any], judgments: Iterable[Any], split: str = "extract") -> dict:
    """Mean trait score of pos minus neg generations of ``split`` (unscored judgments skipped)."""
    pol = {g.id: g.polarity for g in generations if g.split == split}
    xs: dict[str, list[float]] = {"pos": [], "neg": []}
    unscored = 0
    for j in judgments:
        p = pol.get(j.generation_id)
        if p is None or j.metric != trait:
            continue
        if j.score is None:
            unscored += 1
        else:
            xs[p].append(float(j.score))
    pos = sum(xs["pos"]) / len(xs["pos"]) if xs["pos"] else None
    neg = sum(xs["neg"]) / len(xs["neg"]) if xs["neg"] else None
    gap = None if pos is None or neg is None else pos - neg
    return {"split": split, "pos_mean": pos, "neg_mean": neg, "gap": gap, "n_pos": len(xs["pos"]),
            "n_neg": len(xs["neg"]), "unscored": unscored}


def effective_pair_rate(selection: Any) -> dict:
    kept = len(selection.pairs)
    cand = int(selection.candidates)
    return {"kept": kept, "candidates": cand, "rate": kept / cand if cand else 0.0}


# -- check 2: norm peak ----------------------------------------------------------------------
def layer_norms(vector: Any) -> list[float]:
    """||v[l]|| for every hidden_states index of a ``[L+1, H]`` tensor (or nested list)."""
    if hasattr(vector, "float"):
        return [float(x) for x in vector.float().norm(dim=-1).tolist()]
    return [math.sqrt(sum(float(x) ** 2 for x in row)) for row in vector]


def norm_peak(norms: Sequence[float]) -> dict:
    """Peak of ||v[l]|| over the inner indices 1..L-1 (index 0 = embeddings and index L = after the
    final norm are excluded); relative depth = peak / L. Needs L >= 2."""
    L = len(norms) - 1
    if L < 2:
        raise HarnessError(f"norm peak needs at least 2 layers (got {len(norms)} hidden_states indices)")
    if not all(math.isfinite(x) for x in norms):
        raise HarnessError("vector has non-finite norms; the extraction is broken")
    peak = max(range(1, L), key=lambda i: norms[i])
    return {"peak_layer": peak, "num_layers": L, "relative_depth": peak / L, "peak_norm": norms[peak],
            "embedding_norm": norms[0], "final_norm_index": L, "final_norm": norms[L]}


def in_band(x: float, band: Sequence[float]) -> bool:
    return band[0] <= x <= band[1]


def check_layer(setting: Any, peak_layer: int, num_layers: int) -> int:
    """Resolve the ``layer`` threshold: "auto" -> the norm-peak layer; an int is range-checked."""
    if setting == "auto":
        return int(peak_layer)
    layer = int(setting)
    if not 1 <= layer <= num_layers:
        raise HarnessError(f"checks.json layer {layer} is outside 1..{num_layers} for this model. "
                           "Fix: use \"auto\" or a layer of this model")
    return layer


# -- check 3: projection separation on the eval split --------------------------------------
def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score(pos) > score(neg)) + 0.5 P(tie): the Mann-Whitney U statistic / (n_pos n_neg),
    computed from average ranks (ties share their mean rank)."""
    n1, n0 = len(pos), len(neg)
    if n1 == 0 or n0 == 0:
        raise HarnessError(f"AUROC needs both classes (pos={n1}, neg={n0})")
    allv = sorted([(float(x), 1) for x in pos] + [(float(x), 0) for x in neg], key=lambda t: t[0])
    rank_sum = 0.0
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based mean rank of the tie block
        rank_sum += avg * sum(1 for k in range(i, j + 1) if allv[k][1] == 1)
        i = j + 1
    u = rank_sum - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def projections(means: Any, vector: Any) -> Any:
    """Projections of per-example means ``[n, L+1, H]`` on the unit vector of each layer: ``[n, L+1]``.
    A layer whose vector is zero projects to 0."""
    v = vector.float()
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (means.float() * unit[None]).sum(-1)


def per_layer_auroc(pos_means: Any, neg_means: Any, vector: Any) -> list[float]:
    """AUROC of pos vs neg projections for every hidden_states index (0..L)."""
    pp, nn_ = projections(pos_means, vector), projections(neg_means, vector)
    return [auroc(pp[:, i].tolist(), nn_[:, i].tolist()) for i in range(pp.shape[1])]


# -- check 4: regression against a stored reference -----------------------------------------
def cosine(a: Any, b: Any) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else 0.0


def per_layer_cosine(new: Any, ref: Any) -> list[float]:
    if tuple(new.shape) != tuple(ref.shape):
        raise HarnessError(f"reference vector has shape {tuple(ref.shape)} but the new one {tuple(new.shape)}: "
                           "it was written for another model. Fix: write a reference for this model")
    return [cosine(new[i], ref[i]) for i in range(new.shape[0])]


def reference_path(trait_dir: str | Path, model: str) -> Path:
    """``traits/<name>/reference/<model-slug>.safetensors``."""
    from harness.core.pipeline import slug

    return Path(trait_dir) / "reference" / f"{slug(model)}.safetensors"


# -- reference files -----------------------------------------------------------------------------
REFERENCE_METHOD = "response_avg_diff"


def save_reference(path: str | Path, vectors: Any, settings: Any, spec: Any, selection: Any = None) -> Path:
    """Write ``vectors``' paper method as the reference, with what produced it in the metadata."""
    import datetime as _dt

    from harness import __version__
    from harness.core.artifacts import save_vectors
    from harness.core.records import VectorSet

    s = settings
    meta = {
        "reference_of": spec.name, "trait_hash": spec.hash, "harness_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: getattr(s, k) for k in ("model", "profile_applied", "judge", "judge_model", "n_per_question",
                                                "temperature", "top_p", "max_new_tokens", "seed",
                                                "trait_threshold", "coherence_threshold", "judge_min_mass")},
        "pairs": len(selection.pairs) if selection is not None else vectors.n_pos,
    }
    ref = VectorSet(trait=spec.name, model_id=vectors.model_id, tensors={REFERENCE_METHOD: vectors[REFERENCE_METHOD]},
                    n_pos=vectors.n_pos, n_neg=vectors.n_neg, extractor=vectors.extractor, metadata=meta)
    save_vectors(path, ref)
    return Path(path)


def load_reference(path: str | Path) -> Any:
    """The reference ``VectorSet`` (one tensor, ``response_avg_diff``)."""
    from harness.core.artifacts import load_vectors

    vs = load_vectors(path)
    if REFERENCE_METHOD not in vs.tensors:
        raise HarnessError(f"{path}: no {REFERENCE_METHOD!r} tensor. Fix: rewrite it with "
                           "'persona-harness reference --trait NAME'")
    return vs
