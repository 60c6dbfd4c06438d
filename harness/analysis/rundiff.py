"""Compare two runs (``persona-harness diff RUN_A RUN_B``): what changed between them.

* vectors: per-layer cosine of each vector method both runs have (and the norms' ratio), with the
  lowest inner-layer cosine and the cosine at each run's norm-peak layer;
* scores: the judged trait and coherence means (pos / neg / gap, extraction and evaluation splits);
* pairs: effective pairs kept, candidates, pos / neg examples, generations, dropped reasons;
* metrics: every other number of the run summaries (norm peak, unscored counts, ...);
* settings, components, environment (versions, device, dtype), model identity and trait hash that differ.

Run directories are read as data (run.json, vectors.safetensors); nothing is imported or run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

#: settings that say where things go, not what the run computes
PLACE_SETTINGS = ("out_dir", "runs_dir", "cache_dir", "progress")
SCORE_KEYS = ("trait_pos_mean", "trait_neg_mean", "coherence_pos_mean", "coherence_neg_mean")
PAIR_KEYS = ("pairs_kept", "pairs_candidates", "n_pos", "n_neg", "generations", "empty_responses", "judgments")


def _read(run_dir: Path) -> dict:
    p = run_dir / "run.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HarnessError(f"{run_dir}: no run.json, not a run directory. Fix: give a folder 'persona-harness run' "
                           "wrote (or its trait folder, for the latest run; 'persona-harness runs' lists them)") from None
    except (OSError, ValueError) as e:
        raise HarnessError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{p}: not a run.json object")
    return data


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x)) else None


def _delta(a: Any, b: Any) -> dict:
    na, nb = _num(a), _num(b)
    if na is None or nb is None:
        return {"a": a, "b": b, "delta": None}
    both_int = all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b))
    return {"a": a, "b": b, "delta": (b - a) if both_int else round(nb - na, 6)}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Numeric leaves of nested dicts as ``a.b.c`` keys (lists left out: per-layer curves)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif _num(d) is not None:
        out[prefix[:-1]] = d
    return out


def _vector_diff(va: Any, vb: Any, peak_a: int | None, peak_b: int | None) -> dict:
    from harness.analysis.metrics import cosine

    if tuple(va.shape) != tuple(vb.shape):
        return {"error": f"shapes differ: {tuple(va.shape)} vs {tuple(vb.shape)} (another model)"}
    n = va.shape[0]
    cos = [round(cosine(va[i], vb[i]), 6) for i in range(n)]
    na = [float(va[i].float().norm()) for i in range(n)]
    nb = [float(vb[i].float().norm()) for i in range(n)]
    ratio = [round(b / a, 6) if a > 0 else None for a, b in zip(na, nb)]
    inner = list(range(1, n - 1)) if n > 2 else list(range(n))
    worst = min(inner, key=lambda i: cos[i])
    out = {"cosine": cos, "norm_ratio": ratio, "min_inner_cosine": cos[worst], "min_inner_layer": worst,
           "mean_inner_cosine": round(sum(cos[i] for i in inner) / len(inner), 6)}
    for tag, p in (("a", peak_a), ("b", peak_b)):
        if p is not None and 0 <= p < n:
            out[f"cosine_at_peak_{tag}"] = {"layer": p, "cosine": cos[p]}
    return out


def _changed(da: dict, db: dict, skip: tuple[str, ...] = ()) -> dict:
    keys = sorted((set(da) | set(db)) - set(skip))
    return {k: {"a": da.get(k), "b": db.get(k)} for k in keys if da.get(k) != db.get(k)}


def diff_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """The comparison of two run directories (each may also be a trait folder or its ``latest`` file)."""
    from harness.core.artifacts import load_vectors
    from harness.core.runs import resolve_run_dir

    a, b = resolve_run_dir(run_a), resolve_run_dir(run_b)
    ha, hb = _read(a), _read(b)
    sa, sb = ha.get("summary") or {}, hb.get("summary") or {}

    def who(d: Path, h: dict) -> dict:
        return {"dir": str(d), "id": (h.get("run") or {}).get("id"), "created": (h.get("run") or {}).get("created"),
                "model": (h.get("model") or {}).get("id"), "trait": (h.get("trait") or {}).get("name"),
                "status": h.get("status")}

    out: dict[str, Any] = {"format": "persona-harness-diff/1", "a": who(a, ha), "b": who(b, hb)}
    # vectors
    vec: dict[str, Any] = {}
    only_a: list[str] = []
    only_b: list[str] = []
    fa, fb = a / "vectors.safetensors", b / "vectors.safetensors"
    if fa.exists() and fb.exists():
        vsa, vsb = load_vectors(fa), load_vectors(fb)
        pa = (sa.get("norm_peak") or {}).get("peak_layer")
        pb = (sb.get("norm_peak") or {}).get("peak_layer")
        for m in sorted(set(vsa.tensors) & set(vsb.tensors)):
            vec[m] = _vector_diff(vsa.tensors[m], vsb.tensors[m], pa, pb)
        only_a, only_b = sorted(set(vsa.tensors) - set(vsb.tensors)), sorted(set(vsb.tensors) - set(vsa.tensors))
    out["vectors"] = vec
    out["vectors_missing"] = {"a": not fa.exists(), "b": not fb.exists()}
    out["methods_only_in"] = {"a": only_a, "b": only_b}
    # scores
    scores: dict[str, Any] = {}
    for split, xa, xb in (("extract", sa, sb), ("eval", sa.get("eval") or {}, sb.get("eval") or {})):
        for k in SCORE_KEYS:
            if k in xa or k in xb:
                scores[f"{split}.{k}"] = _delta(xa.get(k), xb.get(k))
        ga = _num(xa.get("trait_pos_mean")) is not None and _num(xa.get("trait_neg_mean")) is not None
        gb = _num(xb.get("trait_pos_mean")) is not None and _num(xb.get("trait_neg_mean")) is not None
        if ga or gb:
            scores[f"{split}.trait_gap"] = _delta(
                xa["trait_pos_mean"] - xa["trait_neg_mean"] if ga else None,
                xb["trait_pos_mean"] - xb["trait_neg_mean"] if gb else None)
    out["scores"] = scores
    # pairs
    pairs = {k: _delta(sa.get(k), sb.get(k)) for k in PAIR_KEYS if k in sa or k in sb}
    da, db = sa.get("dropped") or {}, sb.get("dropped") or {}
    for k in sorted(set(da) | set(db)):
        pairs[f"dropped.{k}"] = _delta(da.get(k, 0), db.get(k, 0))
    out["pairs"] = pairs
    # every other number in the summaries
    used = set(PAIR_KEYS) | {"dropped", "eval", "files", "trait", "model", "profile"} | set(SCORE_KEYS)
    fa_, fb_ = (_flat({k: v for k, v in x.items() if k not in used}) for x in (sa, sb))
    out["metrics"] = {k: _delta(fa_.get(k), fb_.get(k)) for k in sorted(set(fa_) | set(fb_))
                      if fa_.get(k) != fb_.get(k)}
    # what the runs were made with
    out["settings"] = _changed(ha.get("config") or {}, hb.get("config") or {}, PLACE_SETTINGS)
    out["components"] = _changed(ha.get("components") or {}, hb.get("components") or {})
    out["environment"] = _changed(ha.get("environment") or {}, hb.get("environment") or {})
    ma, mb = ha.get("model") or {}, hb.get("model") or {}
    out["model"] = _changed({k: v for k, v in ma.items() if not isinstance(v, (dict, list))},
                            {k: v for k, v in mb.items() if not isinstance(v, (dict, list))})
    ida, idb = ma.get("identity"), mb.get("identity")
    if (ida or idb) and ida != idb:
        out["model"]["identity"] = {"a": ida, "b": idb}
    ta, tb = (ha.get("trait") or {}).get("hash"), (hb.get("trait") or {}).get("hash")
    out["trait_changed"] = ta != tb
    return out


def _f(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"
    return str(x)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_diff(d: dict) -> str:
    """The comparison as text tables (what ``persona-harness diff`` prints)."""
    a, b = d["a"], d["b"]
    lines = [f"A: {a['dir']}  ({a['model']} / {a['trait']}, {a['created']}, {a['status']})",
             f"B: {b['dir']}  ({b['model']} / {b['trait']}, {b['created']}, {b['status']})"]
    if d["trait_changed"]:
        lines.append("note: the trait's files (instructions, questions or rubric) differ between the runs")
    for method, v in d["vectors"].items():
        lines.append("")
        if "error" in v:
            lines.append(f"vector {method}: {v['error']}")
            continue
        lines.append(f"vector {method}: per-layer cosine A.B (hidden_states index; 0 = embeddings, "
                     f"{len(v['cosine']) - 1} = after the final norm), norm ratio B/A")
        cells = [f"{i:>2}:{c:+.3f}" for i, c in enumerate(v["cosine"])]
        for s in range(0, len(cells), 8):
            lines.append("  " + "  ".join(cells[s:s + 8]))
        peaks = "; ".join(f"at {t}'s norm peak (layer {p['layer']}) {p['cosine']:+.4f}"
                          for t, p in (("A", v.get("cosine_at_peak_a")), ("B", v.get("cosine_at_peak_b"))) if p)
        lines.append(f"  lowest inner-layer cosine {v['min_inner_cosine']:+.4f} at layer {v['min_inner_layer']}; "
                     f"mean {v['mean_inner_cosine']:+.4f}" + (f"; {peaks}" if peaks else ""))
        ratios = [r for r in v["norm_ratio"][1:-1] if r is not None] or [r for r in v["norm_ratio"] if r is not None]
        if ratios:
            lines.append(f"  norm ratio B/A over the inner layers: {min(ratios):.3f} .. {max(ratios):.3f}")
    if not d["vectors"]:
        missing = [t for t, m in d["vectors_missing"].items() if m]
        lines += ["", "vectors: " + (f"run {', '.join(x.upper() for x in missing)} has no vectors.safetensors"
                                     if missing else "no method in common")]
    for t, ms in d["methods_only_in"].items():
        if ms:
            lines.append(f"methods only in {t.upper()}: {', '.join(ms)}")
    for title, key in (("scores", "scores"), ("pairs", "pairs"), ("metrics", "metrics")):
        if d[key]:
            rows = [(title, "A", "B", "B - A")] + [(k, _f(v["a"]), _f(v["b"]), _f(v["delta"])) for k, v in d[key].items()]
            lines += [""] + _table(rows)
    changed = [(f"{sec}.{k}", v) for sec in ("settings", "components", "model", "environment")
               for k, v in d[sec].items()]
    lines.append("")
    if changed:
        def cut(x: Any) -> str:
            t = _f(x) if not isinstance(x, (dict, list, tuple)) else json.dumps(x, default=str)
            return t if len(t) <= 60 else t[:57] + "..."

        lines += _table([("differs", "A", "B")] + [(k, cut(v["a"]), cut(v["b"])) for k, v in changed])
    else:
        lines.append("settings, components, model and environment: identical")
    return "\n".join(lines)
