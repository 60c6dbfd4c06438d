"""Recommend a steering/monitoring layer and say why.

Evidence, strongest last:

1. the norm of the vector by layer (peak among 1..L-1; index L is after the final norm);
2. held-out separation: AUROC (then |Cohen's d|) of pos vs neg projections on the evaluation split;
3. a steering sweep: the largest rise of the mean trait score over the coefficient-0 baseline among
   cells whose mean coherence is at least ``min_coherence``.

The sweep decides when it has an acceptable cell with a positive effect; otherwise separation; otherwise
the norm peak. Layer 0 (embeddings) and layer L (after the final norm) are never recommended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.analysis.metrics import inner_layers, peak_layer

LAYERS_FILE = "layer_choice.json"


def norm_peak_layer(norms: list[float]) -> int:
    return peak_layer(norms)


def separation_best(monitor: dict) -> dict | None:
    rows = monitor.get("layers") or []
    if not rows:
        return None
    ok = [r for r in rows if r["layer"] in inner_layers(len(rows)) and r.get("auroc") is not None]
    if not ok:
        return None
    return max(ok, key=lambda r: (round(r["auroc"], 3), abs(r.get("cohens_d") or 0.0)))


def sweep_effects(sweep: dict, min_coherence: float) -> list[dict]:
    """Per swept layer: baseline (coef 0) trait, best acceptable positive-coef effect and its cell."""
    cells = sweep.get("cells") or []
    base_cells = [c for c in cells if c.get("coef") == 0 and c.get("trait_mean") is not None]
    out = []
    for L in sorted({c["layer"] for c in cells}):
        mine = [c for c in cells if c["layer"] == L]
        b = next((c for c in mine if c.get("coef") == 0 and c.get("trait_mean") is not None), None) or \
            (base_cells[0] if base_cells else None)
        base = b["trait_mean"] if b else None
        ok = [c for c in mine if c.get("coef", 0) > 0 and c.get("trait_mean") is not None
              and c.get("coherence_mean") is not None and c["coherence_mean"] >= min_coherence]
        best = max(ok, key=lambda c: c["trait_mean"]) if ok else None
        effect = (best["trait_mean"] - base) if (best is not None and base is not None) else None
        out.append({"layer": L, "baseline": base, "best_coef": best["coef"] if best else None,
                    "best_trait": best["trait_mean"] if best else None,
                    "best_coherence": best["coherence_mean"] if best else None, "effect": effect,
                    "acceptable_cells": len(ok)})
    return out


def recommend_layer(norms: list[float] | None = None, monitor: dict | None = None, sweep: dict | None = None,
                    *, min_coherence: float = 50.0) -> dict:
    """``{"layer", "basis", "explanation", ...}`` from whatever evidence is given."""
    lines: list[str] = []
    res: dict[str, Any] = {"min_coherence": min_coherence}
    npk = None
    if norms:
        npk = norm_peak_layer(norms)
        res["norm_peak"] = npk
        lines.append(f"The vector's norm peaks at layer {npk} of {len(norms) - 1} (relative depth "
                     f"{npk / max(len(norms) - 1, 1):.2f}); a large norm only says pos and neg differ a lot there.")
    sep = separation_best(monitor) if monitor else None
    if sep is not None:
        res["separation_best"] = sep["layer"]
        split = monitor.get("split", "eval")  # type: ignore[union-attr]
        held = "held-out " if split == "eval" else "in-sample "
        lines.append(f"On the {held}{split} split, pos and neg projections separate best at layer {sep['layer']} "
                     f"(AUROC {sep['auroc']:.3f}, Cohen's d {sep.get('cohens_d') or float('nan'):.2f}, "
                     f"{monitor.get('n_pos')} pos vs {monitor.get('n_neg')} neg).")  # type: ignore[union-attr]
        if sep["auroc"] <= 0.6:
            res["weak_separation"] = True
            lines.append(f"No layer separates well (best AUROC {sep['auroc']:.2f} <= 0.60): on held-out data this vector "
                         "does not tell pos from neg answers, so treat any layer choice as provisional.")
    eff = sweep_effects(sweep, min_coherence) if sweep else []
    good = [e for e in eff if e["effect"] is not None and e["effect"] > 0]
    if sweep:
        res["sweep"] = eff
        if good:
            b = max(good, key=lambda e: e["effect"])
            res["sweep_best"] = b["layer"]
            lines.append(f"In the steering sweep ({sweep.get('scale', 'raw')} scale, positions "
                         f"{sweep.get('positions', 'response')}), layer {b['layer']} raised the mean trait score most "
                         f"while mean coherence stayed >= {min_coherence:g}: coef {b['best_coef']:g} gave "
                         f"{b['best_trait']:.1f} vs {b['baseline']:.1f} at coef 0 (+{b['effect']:.1f}), coherence "
                         f"{b['best_coherence']:.1f}.")
        else:
            lines.append(f"No swept cell with a positive coefficient raised the trait score while keeping mean "
                         f"coherence >= {min_coherence:g}, so the sweep does not decide.")
    if good:
        res["layer"], res["basis"] = res["sweep_best"], "sweep"
        lines.append(f"Recommended: layer {res['layer']}, because steering there works best at acceptable coherence"
                     + (f" (separation favours {sep['layer']})." if sep is not None and sep["layer"] != res["layer"] else "."))
    elif sep is not None:
        res["layer"], res["basis"] = sep["layer"], "separation"
        lines.append(f"Recommended: layer {sep['layer']}, the best held-out separation"
                     + ("; run a sweep to check steering there." if not sweep else "."))
    elif npk is not None:
        res["layer"], res["basis"] = npk, "norm"
        lines.append(f"Recommended: layer {npk}, the norm peak, for lack of separation or sweep data "
                     "(run 'persona-harness monitor' and 'persona-harness sweep').")
    else:
        res["layer"], res["basis"] = None, "none"
        lines.append("No evidence to choose a layer from.")
    res["explanation"] = " ".join(lines)
    return res


def recommend_for_run(run_dir: str | Path, *, min_coherence: float | None = None, write: bool = True) -> dict:
    """Read vectors.safetensors, monitor.json and sweep.json from a run directory and recommend."""
    from harness.core.artifacts import atomic_write_json, load_vectors
    from harness.analysis.monitor import MONITOR_FILE

    run_dir = Path(run_dir)
    norms = None
    vp = run_dir / "vectors.safetensors"
    if vp.exists():
        vs = load_vectors(vp)
        m = "response_avg_diff" if "response_avg_diff" in vs.tensors else sorted(vs.tensors)[0]
        norms = vs.tensors[m].float().norm(dim=-1).tolist()
    monitor = json.loads((run_dir / MONITOR_FILE).read_text()) if (run_dir / MONITOR_FILE).exists() else None
    sweep = json.loads((run_dir / "sweep.json").read_text()) if (run_dir / "sweep.json").exists() else None
    if min_coherence is None:
        min_coherence = 50.0
        rj = run_dir / "run.json"
        if rj.exists():
            min_coherence = float(json.loads(rj.read_text()).get("config", {}).get("coherence_threshold", 50.0))
    res = recommend_layer(norms, monitor, sweep, min_coherence=min_coherence)
    if write:
        atomic_write_json(run_dir / LAYERS_FILE, res)
    return res
