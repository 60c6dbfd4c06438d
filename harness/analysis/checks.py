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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from harness.analysis.metrics import auroc, bootstrap_ci, cosine, pearson, peak_layer, projections, spearman
from harness.core.errors import HarnessError

#: Threshold keys a checks.json block may hold, with their meaning.
THRESHOLD_KEYS: dict[str, str] = {
    "score_gap": "mean pos - mean neg trait score on the extraction split: the interval's lower bound must be >= this",
    "effective_pair_rate": "effective pairs kept / candidate pairs on the extraction split must be >= this",
    "norm_peak_band": "[lo, hi]: relative depth (peak layer / L) of max ||v[l]|| / mean ||h[l]|| over l in 1..L-1 "
                      "must lie inside",
    "auroc": "AUROC of eval-split projections (pos vs neg responses re-encoded under one neutral prompt) at the "
             "check layer: the interval's lower bound must be >= this",
    "heldout_cosine": "cosine at the check layer between the vector and the eval split's own mean difference: the "
                      "interval's lower bound must be >= this",
    "heldout_method_margin": "cosine to the eval split's response-mean difference minus the best cosine to its "
                             "prompt-mean / last-prompt-token differences at the check layer: lower bound >= this",
    "specificity_margin": "own AUROC minus the best other trait vector's AUROC on this trait's eval split (neutral "
                          "prompt): the interval's lower bound must be >= this",
    "specificity_cosine_margin": "cosine of this trait's vector to its eval split's mean difference minus the best "
                                 "other trait vector's cosine to it: the interval's lower bound must be >= this",
    "score_correlation": "Pearson r between the projection at the check layer and the judged trait score on the "
                         "eval split (needs --harness-judge-eval): the interval's lower bound must be >= this",
    "reference_cosine": "cosine(new vector, stored reference) at every inner layer must be >= this",
    "reproduce_tolerance": "when the reference was made with the same trait, settings, seed (and model "
                           "fingerprint): ||new - ref|| / ||ref|| at every layer must be <= this",
    "layer": "check layer: 'auto' (the relative-norm peak, chosen without eval labels) or an int in 1..L",
}
#: Thresholds that may be ``null``: the metric is still measured and reported, but not enforced (the
#: check is skipped with the measured value and the reason, taken from the block's ``"_<key>"`` note).
NULLABLE_KEYS = ("score_gap", "effective_pair_rate", "norm_peak_band", "auroc", "heldout_cosine",
                 "heldout_method_margin", "specificity_margin", "specificity_cosine_margin", "score_correlation",
                 "reference_cosine", "reproduce_tolerance")
DEFAULT_THRESHOLDS: dict[str, Any] = {
    "score_gap": 10.0,
    "effective_pair_rate": 0.05,
    "norm_peak_band": [0.2, 0.97],
    "auroc": 0.6,
    "heldout_cosine": 0.5,
    "heldout_method_margin": 0.0,
    "specificity_margin": 0.05,
    "specificity_cosine_margin": 0.0,
    "score_correlation": 0.3,
    "reference_cosine": 0.9,
    "reproduce_tolerance": 1e-3,
    "layer": "auto",
}
#: bootstrap resamples (over evaluation questions) behind every interval
N_BOOT = 1000


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
def norm_peak(norms: Sequence[float], act_norms: Sequence[float] | None = None) -> dict:
    """Peak of the vector's norm over the inner indices 1..L-1 (index 0 = embeddings and index L =
    after the final norm are excluded). With ``act_norms`` (the typical activation norm per layer)
    the peak is taken on the *relative* norm ||v[l]|| / mean ||h[l]||, which does not grow with depth
    the way the raw norm does; the raw peak is reported beside it. Relative depth = peak / L."""
    L = len(norms) - 1
    if L < 2:
        raise HarnessError(f"norm peak needs at least 2 layers (got {len(norms)} hidden_states indices)")
    if not all(math.isfinite(x) for x in norms):
        raise HarnessError("vector has non-finite norms; the extraction is broken")
    raw_peak = peak_layer(norms)
    out = {"num_layers": L, "raw_peak_layer": raw_peak, "raw_relative_depth": raw_peak / L,
           "embedding_norm": norms[0], "final_norm_index": L, "final_norm": norms[L],
           "norms": [round(float(x), 6) for x in norms]}
    if act_norms is not None:
        if len(act_norms) != len(norms):
            raise HarnessError(f"activation norms for {len(act_norms)} layers, vector has {len(norms)}")
        rel = [float(n) / float(a) if a > 0 else 0.0 for n, a in zip(norms, act_norms)]
        peak = peak_layer(rel)
        out.update(relative_norms=[round(x, 6) for x in rel], basis="relative")
    else:
        peak, out["basis"] = raw_peak, "raw"
    out.update(peak_layer=peak, relative_depth=peak / L, peak_norm=norms[peak])
    return out


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


# -- evaluation-split metrics, each with a bootstrap interval over questions ----------------
@dataclass
class EvalSet:
    """Per-example response means of one trait's evaluation split.

    ``pos``/``neg``: ``[n, L+1, H]``; ``pos_q``/``neg_q``: the question of each row (the bootstrap
    resamples questions); ``pos_scores``/``neg_scores``: judged trait scores (None: unscored or not
    judged)."""

    pos: Any
    neg: Any
    pos_q: list
    neg_q: list
    pos_scores: list = field(default_factory=list)
    neg_scores: list = field(default_factory=list)
    #: other token averages of the same responses, ``{"prompt_avg": (pos, neg), "prompt_last": ...}``
    #: (in-context only): what a vector of the wrong extraction method would match
    methods: dict = field(default_factory=dict)
    #: mean per-token activation norm of the responses per layer (labels unused)
    token_norms: list | None = None

    def questions(self) -> list:
        return list(dict.fromkeys([*self.pos_q, *self.neg_q]))

    def rows(self, sample: Sequence[Any]) -> tuple[list[int], list[int]]:
        """Row indices of pos and neg for a (re)sample of questions (a question drawn twice counts twice)."""
        pi: dict[Any, list[int]] = {}
        ni: dict[Any, list[int]] = {}
        for i, q in enumerate(self.pos_q):
            pi.setdefault(q, []).append(i)
        for i, q in enumerate(self.neg_q):
            ni.setdefault(q, []).append(i)
        return ([i for q in sample for i in pi.get(q, [])], [i for q in sample for i in ni.get(q, [])])


def _with_ci(ev: EvalSet, stat: Callable[[list[int], list[int]], float], *, n_boot: int, seed: int) -> dict:
    qs = ev.questions()
    p, n = ev.rows(qs)
    value = stat(p, n)

    def on_sample(sample: list) -> float:
        return stat(*ev.rows(sample))

    lo, hi = bootstrap_ci(qs, on_sample, n_boot=n_boot, seed=seed) if n_boot else (math.nan, math.nan)
    return {"value": value, "ci": [lo, hi], "n_questions": len(qs), "n_pos": len(p), "n_neg": len(n)}


def separation(ev: EvalSet, vector: Any, layer: int, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC of pos vs neg projections on the unit vector at ``layer``, with its interval."""
    pp = projections(ev.pos, vector)[:, layer].tolist()
    nn_ = projections(ev.neg, vector)[:, layer].tolist()
    return _with_ci(ev, lambda p, n: auroc([pp[i] for i in p], [nn_[i] for i in n]), n_boot=n_boot, seed=seed)


def per_layer_auroc(pos_means: Any, neg_means: Any, vector: Any) -> list[float]:
    """AUROC of pos vs neg projections for every hidden_states index (0..L)."""
    if len(pos_means) == 0 or len(neg_means) == 0:
        raise HarnessError(f"AUROC needs both classes (pos={len(pos_means)}, neg={len(neg_means)})")
    pp, nn_ = projections(pos_means, vector), projections(neg_means, vector)
    return [auroc(pp[:, i].tolist(), nn_[:, i].tolist()) for i in range(pp.shape[1])]


def heldout_cosine(ev: EvalSet, vector: Any, layer: int, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Cosine at ``layer`` between the vector and the evaluation split's own mean difference
    (mean pos response - mean neg response, questions never used for extraction)."""
    P, N, v = ev.pos[:, layer].float(), ev.neg[:, layer].float(), vector[layer].float()

    def stat(p: list[int], n: list[int]) -> float:
        if not p or not n:
            return math.nan
        return cosine(P[p].mean(0) - N[n].mean(0), v)

    return _with_ci(ev, stat, n_boot=n_boot, seed=seed)


def heldout_method_margin(ev: EvalSet, vector: Any, layer: int, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Cosine to the evaluation split's response-mean difference minus the best cosine to its
    prompt-mean or last-prompt-token differences: positive when the vector was averaged over the
    response tokens, as the paper's method is, and not over the prompt."""
    if not ev.methods:
        raise HarnessError("the evaluation set has no prompt-token averages to compare the method with")
    v = vector[layer].float()
    P, N = ev.pos[:, layer].float(), ev.neg[:, layer].float()
    alt = {m: (pp[:, layer].float(), nn_[:, layer].float()) for m, (pp, nn_) in ev.methods.items()}

    def stat(p: list[int], n: list[int]) -> float:
        if not p or not n:
            return math.nan
        own = cosine(P[p].mean(0) - N[n].mean(0), v)
        return own - max(cosine(a[p].mean(0) - b[n].mean(0), v) for a, b in alt.values())

    res = _with_ci(ev, stat, n_boot=n_boot, seed=seed)
    res["cosine_by_method"] = {"response_avg": cosine(P.mean(0) - N.mean(0), v),
                               **{m: cosine(a.mean(0) - b.mean(0), v) for m, (a, b) in alt.items()}}
    return res


def specificity_cosine(ev: EvalSet, vector: Any, others: Mapping[str, Any], layer: int, *, n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """Cosine between this trait's vector and its evaluation split's own response-mean difference,
    minus the best cosine another trait's vector reaches with that difference."""
    P, N, v = ev.pos[:, layer].float(), ev.neg[:, layer].float(), vector[layer].float()
    oth = {k: o[layer].float() for k, o in others.items()}

    def stat(p: list[int], n: list[int]) -> float:
        if not p or not n or not oth:
            return math.nan
        d = P[p].mean(0) - N[n].mean(0)
        return cosine(d, v) - max(cosine(d, o) for o in oth.values())

    res = _with_ci(ev, stat, n_boot=n_boot, seed=seed)
    d = P.mean(0) - N.mean(0)
    res["own_cosine"] = cosine(d, v)
    res["other_cosine"] = {k: cosine(d, o) for k, o in oth.items()}
    return res


def per_layer_heldout_cosine(ev: EvalSet, vector: Any) -> list[float]:
    d = ev.pos.float().mean(0) - ev.neg.float().mean(0)
    return [cosine(d[i], vector[i]) for i in range(d.shape[0])]


def specificity(ev: EvalSet, vector: Any, others: Mapping[str, Any], layer: int, *, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """AUROC of this trait's vector on its own evaluation split minus the best AUROC that another
    trait's vector reaches there, all at the same ``layer`` (the per-trait AUROCs are reported too)."""
    own = projections(ev.pos, vector)[:, layer].tolist(), projections(ev.neg, vector)[:, layer].tolist()
    oth = {k: (projections(ev.pos, o)[:, layer].tolist(), projections(ev.neg, o)[:, layer].tolist())
           for k, o in others.items()}

    def a(pn: tuple, p: list[int], n: list[int]) -> float:
        return auroc([pn[0][i] for i in p], [pn[1][i] for i in n])

    def stat(p: list[int], n: list[int]) -> float:
        if not oth:
            return math.nan
        return a(own, p, n) - max(a(o, p, n) for o in oth.values())

    res = _with_ci(ev, stat, n_boot=n_boot, seed=seed)
    qs = ev.questions()
    p, n = ev.rows(qs)
    res["own_auroc"] = a(own, p, n)
    res["other_auroc"] = {k: a(o, p, n) for k, o in oth.items()}
    return res


def score_correlation(ev: EvalSet, vector: Any, layer: int, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pearson (with interval) and Spearman correlation between the projection at ``layer`` and the
    judged trait score, over every scored evaluation response (pos and neg pooled)."""
    proj = projections(ev.pos, vector)[:, layer].tolist() + projections(ev.neg, vector)[:, layer].tolist()
    scores = list(ev.pos_scores or [None] * len(ev.pos_q)) + list(ev.neg_scores or [None] * len(ev.neg_q))
    npos = len(ev.pos_q)

    def pairs(p: list[int], n: list[int]) -> tuple[list[float], list[float]]:
        idx = [*p, *(npos + i for i in n)]
        kept = [(proj[i], scores[i]) for i in idx if scores[i] is not None]
        return [x for x, _ in kept], [float(s) for _, s in kept]

    res = _with_ci(ev, lambda p, n: pearson(*pairs(p, n)), n_boot=n_boot, seed=seed)
    x, y = pairs(*ev.rows(ev.questions()))
    res.update(spearman=spearman(x, y), n_scored=len(x))
    return res


def per_layer_correlation(ev: EvalSet, vector: Any) -> dict:
    """Per-layer Pearson and Spearman correlation of projection and judged score."""
    pp, nn_ = projections(ev.pos, vector), projections(ev.neg, vector)
    scores = list(ev.pos_scores) + list(ev.neg_scores)
    allp = [*pp.tolist(), *nn_.tolist()]
    kept = [(p, float(s)) for p, s in zip(allp, scores) if s is not None]
    ys = [s for _, s in kept]
    return {"pearson": [pearson([p[i] for p, _ in kept], ys) for i in range(pp.shape[1])],
            "spearman": [spearman([p[i] for p, _ in kept], ys) for i in range(pp.shape[1])]}


def score_gap_ci(trait: str, generations: Iterable[Any], judgments: Iterable[Any], split: str = "extract", *,
                 n_boot: int = 1000, seed: int = 0) -> list[float]:
    """Bootstrap interval (over questions) of the pos - neg mean trait score of ``split``."""
    q = {g.id: (g.question, g.polarity) for g in generations if g.split == split}
    by_q: dict[str, dict[str, list[float]]] = {}
    for j in judgments:
        if j.metric == trait and j.score is not None and j.generation_id in q:
            qq, pol = q[j.generation_id]
            by_q.setdefault(qq, {"pos": [], "neg": []})[pol].append(float(j.score))

    def stat(sample: list) -> float:
        p = [x for s in sample for x in by_q[s]["pos"]]
        n = [x for s in sample for x in by_q[s]["neg"]]
        return sum(p) / len(p) - sum(n) / len(n) if p and n else math.nan

    return list(bootstrap_ci(list(by_q), stat, n_boot=n_boot, seed=seed))


# -- check 4: regression against a stored reference -----------------------------------------
def per_layer_cosine(new: Any, ref: Any) -> list[float]:
    if tuple(new.shape) != tuple(ref.shape):
        raise HarnessError(f"reference vector has shape {tuple(ref.shape)} but the new one {tuple(new.shape)}: "
                           "it was written for another model. Fix: write a reference for this model")
    return [cosine(new[i], ref[i]) for i in range(new.shape[0])]


def per_layer_relative_error(new: Any, ref: Any) -> list[float]:
    """||new[l] - ref[l]|| / ||ref[l]|| per layer (0 where both are zero)."""
    per_layer_cosine(new, ref)  # shape check
    out = []
    for i in range(new.shape[0]):
        d, r = float((new[i].float() - ref[i].float()).norm()), float(ref[i].float().norm())
        out.append(d / r if r > 0 else (0.0 if d == 0 else math.inf))
    return out


#: what must be equal for a reference to be reproducible bit for bit (up to numeric tolerance)
REPRODUCE_KEYS = ("model", "profile_applied", "judge", "judge_model", "n_per_question", "temperature", "top_p",
                  "max_new_tokens", "seed", "trait_threshold", "coherence_threshold", "judge_min_mass")


def reproducible_from(reference_meta: Mapping[str, Any], settings: Any, trait_hash: str,
                      model_fingerprint: str = "") -> tuple[bool, str]:
    """Whether a reference was made with this trait, these settings and seed (and, when both record
    one, this model fingerprint): then a new run must reproduce it within numeric tolerance."""
    rs = reference_meta.get("settings") or {}
    if isinstance(rs, str):
        try:
            rs = json.loads(rs)
        except json.JSONDecodeError:
            rs = {}
    diff = [k for k in REPRODUCE_KEYS if k in rs and rs.get(k) != getattr(settings, k, None)]
    missing = [k for k in REPRODUCE_KEYS if k not in rs]
    if reference_meta.get("trait_hash") and reference_meta.get("trait_hash") != trait_hash:
        diff.append("trait_hash")
    ref_fp = reference_meta.get("model_fingerprint") or ""
    if ref_fp and model_fingerprint and ref_fp != model_fingerprint:
        diff.append("model_fingerprint")
    if diff or missing:
        return False, "differs in " + ", ".join(diff + [f"{k} (not recorded)" for k in missing])
    return True, "same trait, settings, seed" + (" and model fingerprint" if ref_fp and model_fingerprint else "")


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
        "model_fingerprint": str((vectors.metadata or {}).get("model_fingerprint", "")),
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
