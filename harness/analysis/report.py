"""``persona-harness report RUN_DIR``: one self-contained HTML page (inline CSS, base64 PNG plots).

Sections: run summary; layer choice (norm by layer beside held-out separation and the sweep's
steering effect, with the explanation); score distributions pos vs neg; projection histograms;
AUROC by layer; steering curves; logit-lens tables; SAE latents (when ``sae.json`` exists);
example steered answers. Data that a plot needs but the run directory lacks is computed when a
model is available (``monitor.json``, ``lens.json``), otherwise the section says which command
makes it. matplotlib runs with the Agg backend; nothing is fetched from the network.

The page is a jinja2 template (``templates/report.html.j2`` + ``report.css``, autoescaped): this
module prepares the data as plain values and typed blocks (``kind``: img, missing, kv, explain,
lens, sae, sweep_table, examples), the template lays them out.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

LENS_FILE = "lens.json"
SAE_FILE = "sae.json"
REPORT_FILE = "report.html"

POS_COLOR, NEG_COLOR = "#c0392b", "#2471a3"

TEMPLATE = "report.html.j2"  # with report.css, in harness/analysis/templates (package data)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise HarnessError("the report needs matplotlib. Fix: pip install 'persona-harness[report]'") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> dict:
    return {"kind": "img", "b64": b64, "alt": alt}


def _missing(what: str, how: str) -> dict:
    return {"kind": "missing", "what": what, "how": how}


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


# -- data loading ---------------------------------------------------------------------------------
def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_run_data(run_dir: Path) -> dict:
    from harness.core.artifacts import load_vectors, read_jsonl
    from harness.analysis.monitor import MONITOR_FILE, PROJECTIONS_FILE

    d: dict[str, Any] = {"run_dir": run_dir}
    d["run"] = _read_json(run_dir / "run.json") or {}
    d["gens"] = list(read_jsonl(run_dir / "generations.jsonl")) if (run_dir / "generations.jsonl").exists() else []
    d["judgments"] = list(read_jsonl(run_dir / "judgments.jsonl")) if (run_dir / "judgments.jsonl").exists() else []
    d["vectors"] = load_vectors(run_dir / "vectors.safetensors") if (run_dir / "vectors.safetensors").exists() else None
    d["monitor"] = _read_json(run_dir / MONITOR_FILE)
    d["projections"] = list(read_jsonl(run_dir / PROJECTIONS_FILE)) if (run_dir / PROJECTIONS_FILE).exists() else []
    d["sweep"] = _read_json(run_dir / "sweep.json")
    d["sweep_gens"] = (list(read_jsonl(run_dir / "sweep_generations.jsonl"))
                       if (run_dir / "sweep_generations.jsonl").exists() else [])
    d["lens"] = _read_json(run_dir / LENS_FILE)
    d["sae"] = _read_json(run_dir / SAE_FILE)
    return d


def compute_missing(run_dir: Path, data: dict, lm: Any, *, lens_layers: list[int] | None = None, k: int = 10,
                    notes: list[str] | None = None) -> None:
    """Fill ``monitor`` (eval split, else extract in-sample) and ``lens`` with the model."""
    from harness.core.artifacts import atomic_write_json, read_jsonl
    from harness.analysis.lens import lens_layers as _lens
    from harness.analysis.monitor import PROJECTIONS_FILE, monitor_run

    notes = notes if notes is not None else []
    vs = data["vectors"]
    if vs is None:
        return
    if data["monitor"] is None:
        splits = {g.get("split") for g in data["gens"]}
        split = "eval" if "eval" in splits else "extract"
        if split == "extract":
            notes.append("No evaluation-split generations: projections and AUROC are in-sample (extraction split).")
        try:
            data["monitor"] = monitor_run(run_dir, lm, split=split)
            data["projections"] = list(read_jsonl(run_dir / PROJECTIONS_FILE))
        except HarnessError as e:
            notes.append(f"monitor failed: {e}")
    if data["lens"] is None:
        method = "response_avg_diff" if "response_avg_diff" in vs.tensors else sorted(vs.tensors)[0]
        layers = lens_layers or _default_lens_layers(data)
        res = _lens(lm, vs[method], layers, k=k)
        data["lens"] = {"method": method, "k": k, "layers": {str(L): v for L, v in res.items()}}
        atomic_write_json(run_dir / LENS_FILE, data["lens"])


def _default_lens_layers(data: dict) -> list[int]:
    from harness.analysis.layers import recommend_layer

    vs = data["vectors"]
    m = "response_avg_diff" if "response_avg_diff" in vs.tensors else sorted(vs.tensors)[0]
    norms = vs.tensors[m].float().norm(dim=-1).tolist()
    rec = recommend_layer(norms, data.get("monitor"), data.get("sweep"))
    out = [x for x in (rec.get("layer"), rec.get("norm_peak")) if x is not None]
    return list(dict.fromkeys(int(x) for x in out))


# -- plots ----------------------------------------------------------------------------------------
def plot_layer_choice(norms: dict[str, list[float]], monitor: dict | None, rec: dict, sweep: dict | None) -> str:
    plt = _plt()
    n_panels = 1 + (monitor is not None) + (bool(rec.get("sweep")))
    fig, axes = plt.subplots(n_panels, 1, figsize=(9, 2.6 * n_panels + 0.4), sharex=True, squeeze=False)
    axes = axes[:, 0]
    ax = axes[0]
    for name, ns in norms.items():
        L = len(ns) - 1
        xs = list(range(L))
        ax.plot(xs, ns[:L], marker="o", ms=3, label=name, lw=2 if name == "response_avg_diff" else 1,
                ls="-" if name == "response_avg_diff" else "--")
        ax.scatter([L], [ns[L]], marker="x", color="gray", zorder=3)
    inner_max = max(max(ns[1:L] or ns[:L]) for ns in norms.values())
    final = list(norms.values())[0][L]
    if final > 1.3 * inner_max > 0:  # keep the post-norm point from flattening the curve
        ax.set_ylim(0, inner_max * 1.25)
        ax.annotate(f"after final norm: {final:.3g} (off scale)", (L, inner_max * 1.2), fontsize=8, color="gray",
                    ha="right", va="top")
    else:
        ax.annotate("after final norm", (L, final), fontsize=8, color="gray", xytext=(-70, 8),
                    textcoords="offset points")
    ax.set_ylabel("||v[L]||")
    ax.set_title("Vector norm by layer (hidden_states index; x = after the final norm)")
    ax.legend(fontsize=8)
    i = 1
    if monitor is not None:
        rows = monitor["layers"]
        a2 = axes[i]
        i += 1
        a2.plot([r["layer"] for r in rows], [r["auroc"] if r["auroc"] is not None else float("nan") for r in rows],
                marker="o", ms=3, color="#117a65", label="AUROC")
        a2.axhline(0.5, color="gray", lw=0.8, ls=":")
        a2.set_ylim(0, 1.02)
        a2.set_ylabel(f"AUROC ({monitor.get('split')})")
        a3 = a2.twinx()
        a3.plot([r["layer"] for r in rows], [abs(r["cohens_d"]) if r["cohens_d"] is not None else float("nan")
                                             for r in rows], color="#af7ac5", lw=1, ls="--", label="|Cohen's d|")
        a3.set_ylabel("|d|")
        a2.set_title("Held-out separation of pos vs neg projections")
    if rec.get("sweep"):
        a4 = axes[i]
        eff = rec["sweep"]
        a4.bar([e["layer"] for e in eff], [e["effect"] if e["effect"] is not None else 0.0 for e in eff],
               color=["#d68910" if e["effect"] is not None else "#ccc" for e in eff])
        a4.axhline(0, color="gray", lw=0.8)
        a4.set_ylabel("trait rise vs coef 0")
        a4.set_title(f"Steering effect at acceptable coherence (>= {rec.get('min_coherence', 50):g})")
    for a in axes:
        if rec.get("layer") is not None:
            a.axvline(rec["layer"], color="#1e8449", lw=1.5, alpha=0.6)
    axes[-1].set_xlabel("layer (hidden_states index L; steering hooks model.layers[L-1])")
    fig.tight_layout()
    return _png(fig)


def plot_scores(gens: list[dict], judgments: list[dict], trait: str) -> str | None:
    plt = _plt()
    pol = {g["id"]: (g.get("split"), g.get("polarity")) for g in gens}
    splits = [s for s in ("extract", "eval") if any(v[0] == s for v in pol.values())]
    if not splits or not judgments:
        return None
    fig, axes = plt.subplots(len(splits), 2, figsize=(10, 2.8 * len(splits) + 0.3), squeeze=False)
    bins = [i * 5 for i in range(21)]
    for r, split in enumerate(splits):
        for c, metric in enumerate((trait, "coherence")):
            ax = axes[r][c]
            for p, color in (("pos", POS_COLOR), ("neg", NEG_COLOR)):
                xs = [j["score"] for j in judgments if j["metric"] == metric and j["score"] is not None
                      and pol.get(j["generation_id"]) == (split, p)]
                un = sum(1 for j in judgments if j["metric"] == metric and j["score"] is None
                         and pol.get(j["generation_id"]) == (split, p))
                mean = f"{sum(xs) / len(xs):.1f}" if xs else "n/a"
                ax.hist(xs, bins=bins, alpha=0.55, color=color, label=f"{p} (n={len(xs)}, mean {mean}, unscored {un})")
            ax.set_title(f"{metric} score, {split} split")
            ax.set_xlim(0, 100)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_projections(projections: list[dict], layers: list[int], split: str) -> str | None:
    plt = _plt()
    if not projections or not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.2), squeeze=False)
    for ax, L in zip(axes[0], layers):
        pos = [p["proj"][L] for p in projections if p["polarity"] == "pos"]
        neg = [p["proj"][L] for p in projections if p["polarity"] == "neg"]
        lo, hi = min(pos + neg), max(pos + neg)
        bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
        ax.hist(pos, bins=bins, alpha=0.55, color=POS_COLOR, label=f"pos (n={len(pos)})")
        ax.hist(neg, bins=bins, alpha=0.55, color=NEG_COLOR, label=f"neg (n={len(neg)})")
        ax.set_title(f"layer {L}")
        ax.set_xlabel("(mean response act . v) / ||v||")
        ax.legend(fontsize=8)
    fig.suptitle(f"Projection of mean response activations onto the vector ({split} split)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def plot_auroc(monitor: dict) -> str:
    plt = _plt()
    rows = monitor["layers"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    xs = [r["layer"] for r in rows]
    ax.plot(xs, [r["auroc"] if r["auroc"] is not None else float("nan") for r in rows], marker="o", color="#117a65",
            label="AUROC")
    ax.axhline(0.5, color="gray", ls=":", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("AUROC pos vs neg")
    a2 = ax.twinx()
    a2.plot(xs, [r["cohens_d"] if r["cohens_d"] is not None else float("nan") for r in rows], color="#af7ac5",
            ls="--", label="Cohen's d")
    a2.set_ylabel("Cohen's d")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title(f"Separation by layer ({monitor.get('split')} split, {monitor.get('n_pos')} pos / "
                 f"{monitor.get('n_neg')} neg)")
    fig.tight_layout()
    return _png(fig)


def plot_sweep(sweep: dict) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for L in sweep["layers"]:
        cells = sorted([c for c in sweep["cells"] if c["layer"] == L], key=lambda c: c["coef"])
        xs = [c["coef"] for c in cells]
        for ax, key in zip(axes, ("trait_mean", "coherence_mean")):
            ax.plot(xs, [c[key] if c[key] is not None else float("nan") for c in cells], marker="o", label=f"layer {L}")
    axes[0].set_title(f"mean {sweep['trait']} score")
    axes[1].set_title("mean coherence")
    for ax in axes:
        ax.set_xlabel(f"coefficient ({sweep['scale']} scale, positions {sweep['positions']})")
        ax.set_ylim(0, 100)
        ax.axvline(0, color="gray", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    fig.suptitle(f"Steering sweep: {sweep['questions']} questions x {sweep['samples']} samples, "
                 f"max {sweep['max_new_tokens']} new tokens", fontsize=11)
    fig.tight_layout()
    return _png(fig)


# -- blocks for the template ------------------------------------------------------------------------
def _summary_block(run: dict, data: dict) -> dict:
    s = run.get("summary", {})
    rows = [("trait", s.get("trait")), ("model", s.get("model")), ("profile", s.get("profile")),
            ("status", run.get("status")), ("generations", s.get("generations")),
            ("empty responses", s.get("empty_responses")),
            ("trait score pos / neg (extract)", f"{_fmt(s.get('trait_pos_mean'), 1)} / {_fmt(s.get('trait_neg_mean'), 1)}"),
            ("coherence pos / neg (extract)", f"{_fmt(s.get('coherence_pos_mean'), 1)} / {_fmt(s.get('coherence_neg_mean'), 1)}")]
    if isinstance(s.get("eval"), dict):
        e = s["eval"]
        rows.append(("trait score pos / neg (eval)", f"{_fmt(e.get('trait_pos_mean'), 1)} / {_fmt(e.get('trait_neg_mean'), 1)}"))
    rows += [("effective pairs", f"{s.get('pairs_kept')} of {s.get('pairs_candidates')}"),
             ("dropped", s.get("dropped")), ("unscored judgments", s.get("unscored"))]
    if s.get("norm_peak"):
        np_ = s["norm_peak"]
        rows.append(("norm peak", f"layer {np_.get('peak_layer')} of {np_.get('num_layers')}"))
    comps = run.get("components") or {}
    rows.append(("components", ", ".join(f"{k}={v}" for k, v in comps.items())))
    cfg = run.get("config") or {}
    keep = ("n_per_question", "temperature", "max_new_tokens", "seed", "trait_threshold", "coherence_threshold",
            "judge", "judge_model", "judge_min_mass", "splits")
    rows.append(("settings", ", ".join(f"{k}={cfg.get(k)}" for k in keep if k in cfg)))
    env = run.get("environment") or {}
    if env:
        rows.append(("environment", ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)))
    if (run.get("run") or {}).get("id"):
        rows.append(("run id", run["run"]["id"]))
    t = run.get("timings") or {}
    rows.append(("timings (s)", ", ".join(f"{k}={v}" for k, v in t.items())))
    rows.append(("layer convention", run.get("layer_convention", "")))
    return {"kind": "kv", "rows": [(str(k), str(v)) for k, v in rows]}


def _lens_block(lens: dict) -> dict:
    layers = []
    for L, res in sorted(lens.get("layers", {}).items(), key=lambda kv: int(kv[0])):
        modes = []
        for mode in ("raw", "final_norm"):
            r = res[mode]
            n = max(len(r["top"]), len(r["bottom"]))

            def cell(xs: list, i: int) -> dict | None:
                return {"token": str(xs[i]["token"]), "logit": f"{xs[i]['logit']:.3g}"} if i < len(xs) else None

            modes.append({"title": f"{'without' if mode == 'raw' else 'with'} final norm",
                          "rows": [(cell(r["top"], i), cell(r["bottom"], i)) for i in range(n)]})
        layers.append({"layer": int(L), "modes": modes})
    return {"kind": "lens", "method": lens.get("method"), "layers": layers}


def _sae_block(sae: dict) -> dict:
    def row(x: dict) -> dict:
        return {"latent": x["latent"], "cosine": f"{x['cosine']:.3f}"}

    return {"kind": "sae", "path": sae.get("sae_path"), "hook": sae.get("hook_name"), "d_sae": sae.get("d_sae"),
            "architecture": sae.get("architecture", "standard"), "layer": sae.get("layer"),
            "rows": [(row(t), row(b)) for t, b in zip(sae.get("top", []), sae.get("bottom", []))]}


def _sweep_block(sweep: dict) -> dict:
    coefs = sorted({c["coef"] for c in sweep["cells"]})
    rows = []
    for L in sweep["layers"]:
        cells = {c["coef"]: c for c in sweep["cells"] if c["layer"] == L}
        rows.append({"layer": L, "cells": [f"{_fmt(cells[c]['trait_mean'], 1)} / {_fmt(cells[c]['coherence_mean'], 1)}"
                                           if c in cells else "" for c in coefs]})
    t = sweep.get("timings", {})
    return {"kind": "sweep_table", "coefs": [f"{c:g}" for c in coefs], "rows": rows, "judge": sweep.get("judge"),
            "judge_model": sweep.get("judge_model"), "generate": t.get("generate"), "judge_s": t.get("judge"),
            "total": t.get("total"), "rows_generated": sweep.get("rows_generated")}


def _examples_block(sweep_gens: list[dict], layer: int | None) -> dict | None:
    if not sweep_gens:
        return None
    layers = sorted({g["layer"] for g in sweep_gens if g["layer"] is not None})
    if layer not in layers:
        layer = layers[0] if layers else None
    q0 = min(g["question_index"] for g in sweep_gens)
    rows = [g for g in sweep_gens if g["question_index"] == q0 and g["sample_index"] == 0
            and (g["layer"] is None or g["layer"] == layer)]
    rows.sort(key=lambda g: g["coef"])
    return {"kind": "examples", "layer": layer, "question": rows[0]["question"] if rows else "",
            "rows": [{"coef": f"{g['coef']:g}", "response": g["response"],
                      "scores": ", ".join(f"{k}={_fmt(v, 1)}" for k, v in g["scores"].items())} for g in rows]}


def _environment():
    """The jinja2 environment of the report templates: autoescaped, undefined names are errors."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("harness.analysis", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


def render_page(context: dict) -> str:
    """Render the report template with ``context`` (trait, model, run_dir, harness_version, notes, sections)."""
    return _environment().get_template(TEMPLATE).render(**context)


# -- the page -------------------------------------------------------------------------------------
def build_report(run_dir: str | Path, *, lm: Any = None, compute: bool = True) -> str:
    """Return the report HTML for a run directory (computing monitor/lens with ``lm`` if given)."""
    from harness.analysis.layers import recommend_layer

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise HarnessError(f"{run_dir / 'run.json'} is missing: not a run directory. Fix: run 'persona-harness run' first")
    data = load_run_data(run_dir)
    notes: list[str] = []
    if compute and lm is not None:
        compute_missing(run_dir, data, lm, notes=notes)
    run, vs, monitor, sweep = data["run"], data["vectors"], data["monitor"], data["sweep"]
    trait = (run.get("trait") or {}).get("name") or (vs.trait if vs else "")
    cfg = run.get("config") or {}
    min_coh = float(cfg.get("coherence_threshold", 50.0))
    norms = {k: t.float().norm(dim=-1).tolist() for k, t in sorted(vs.tensors.items())} if vs else {}
    main_norms = norms.get("response_avg_diff") or (next(iter(norms.values())) if norms else None)
    rec = recommend_layer(main_norms, monitor, sweep, min_coherence=min_coh)
    sec: list[dict] = []

    def section(anchor: str, title: str, *blocks: dict | None) -> None:
        sec.append({"anchor": anchor, "title": title, "blocks": [b for b in blocks if b is not None]})

    section("summary", "Run summary", _summary_block(run, data))
    lc = (_img(plot_layer_choice(norms, monitor, rec, sweep), "norm by layer and layer choice") if main_norms else
          _missing("Norm by layer", "the run has no vectors.safetensors (did extraction fail?)"))
    section("layers", "Norm by layer and layer choice", lc,
            {"kind": "explain", "layer": rec.get("layer"), "basis": rec.get("basis"), "text": rec.get("explanation")})
    sc = plot_scores(data["gens"], data["judgments"], trait)
    section("scores", "Score distributions, pos vs neg",
            _img(sc, "score distributions") if sc else _missing("Scores", "no judgments.jsonl in the run"))
    if monitor is not None and data["projections"]:
        L = len(monitor["layers"]) - 1
        show = list(dict.fromkeys([x for x in (rec.get("layer"), rec.get("norm_peak"), max(1, L // 3),
                                                max(1, (2 * L) // 3)) if x is not None]))[:4]
        pj = plot_projections(data["projections"], sorted(show), monitor.get("split", "eval"))
        section("projections", "Projection histograms (monitoring)",
                _img(pj, "projection histograms") if pj else _missing("Projections", "no projections"))
        section("auroc", "AUROC by layer", _img(plot_auroc(monitor), "AUROC by layer"))
    else:
        how = "run 'persona-harness monitor RUN_DIR' (or report without --no-compute)"
        section("projections", "Projection histograms (monitoring)", _missing("Projection histograms", how))
        section("auroc", "AUROC by layer", _missing("AUROC by layer", how))
    if sweep:
        section("steering", "Steering curves", _img(plot_sweep(sweep), "steering curves"), _sweep_block(sweep),
                _examples_block(data["sweep_gens"], rec.get("layer")))
    else:
        section("steering", "Steering curves",
                _missing("Steering curves", "run 'persona-harness sweep RUN_DIR --layers 8,12,16 --coefs -4,-2,0,2,4'"))
    section("lens", "Logit lens", _lens_block(data["lens"]) if data["lens"] else
            _missing("Logit-lens tables", "run 'persona-harness lens RUN_DIR' (or report without --no-compute)"))
    if data["sae"]:
        section("sae", "SAE latents aligned with the vector", _sae_block(data["sae"]))
    return render_page({"trait": str(trait), "model": str((run.get("model") or {}).get("id", "")),
                        "run_dir": str(run_dir), "harness_version": str(run.get("harness_version", "")),
                        "notes": notes, "sections": sec})


def write_report(run_dir: str | Path, out: str | Path | None = None, *, lm: Any = None, compute: bool = True) -> Path:
    from harness.core.artifacts import atomic_write_text

    out = Path(out) if out else Path(run_dir) / REPORT_FILE
    atomic_write_text(out, build_report(run_dir, lm=lm, compute=compute))
    return out
