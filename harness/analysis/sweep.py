"""Steering sweep: layers x coefficients over the evaluation questions, judged for trait and coherence.

Each cell (layer, coef) generates answers to the first ``n_questions`` evaluation questions (no
system prompt, as in the paper's steering evaluation) with its steering (layer, coef, positions,
scale) active, then the configured judge scores trait and coherence *after* the hooks are removed (the local judge
may be the steered model itself). Coefficient 0 is the same for every layer, so it is generated once
and shared as every layer's baseline.

Efficiency: with the built-in generators every cell's rows go through the generator together in
batches (one row = one question x sample x cell), each row with its own
``harness.analysis.steering.RequestSteer`` (the cell's layer, coef, positions, scale) under
``steer_requests``, given in request order: ``hf`` keeps that order in its batch, and the ``fast``
engine, which sorts prompts by length and splits batches by free memory, tells the steering hooks which
request each of its rows is (``harness.models.blockcall.BlockCall``). Any other generator (which may
reorder rows without saying so) gets one generate call per cell under ``steer``; a generator can
declare ``steer_per_row = True`` to be batched. A row's tokens do not depend on its batch (seeded per request
id), and each question uses the same request id in every cell, so all cells see the same sampling
noise (common random numbers) and differences come from steering.
Generations are cached with the steering spec (layer, coef, positions, scale, vector hash) in the key.

Writes ``sweep.json``, ``sweep.csv`` and ``sweep_generations.jsonl`` in the run directory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from harness.core.errors import HarnessError
from harness.core.rubrics import COHERENCE, RELEVANCE
from harness.core.locks import run_lock_scope

SWEEP_FILE = "sweep.json"


#: What a run directory's run.json may set when a command reads the run: the model, the trait's
#: generation and judging settings -- what is needed to *read* the run. Anything that runs code
#: (plugins, plugin_config), sends the API key somewhere (judge_base_url, judge_api_key_env), or says
#: where files go or come from (cache_dir, out_dir, traits_dirs, trait_files), and the machine's own
#: resources (device, batch sizes, concurrency), comes from the command line, the environment or a
#: config file, as for any command: a run directory is data, possibly downloaded or shared.
RUN_SETTINGS = ("model", "revision", "dtype", "chat_template", "enable_thinking", "generator", "judge", "filter",
                "extractor", "profile", "profile_applied", "n_per_question", "temperature", "top_p",
                "max_new_tokens", "seed", "pos_name", "neg_name", "splits", "judge_model", "judge_mode",
                "judge_min_mass", "judge_exact", "trait_threshold", "coherence_threshold", "layer")
#: Settings a run.json never sets (see RUN_SETTINGS). Every field is in one of the two lists.
NOT_FROM_RUN = ("plugins", "plugin_config", "judge_base_url", "judge_api_key_env", "cache_dir", "out_dir",
                "runs_dir", "traits_dirs", "trait_files", "device", "device_map", "batch_size", "judge_batch_size",
                "judge_concurrency", "judge_timeout", "judge_retries", "extract_batch_size", "progress",
                "profile_set")


def read_run_json(run_dir: str | Path) -> dict:
    """``run.json`` of a run directory as data (size- and depth-bounded; one-line errors naming it)."""
    from harness.core.artifacts import read_json_file

    rj = Path(run_dir) / "run.json"
    if not rj.is_file():
        raise HarnessError(f"{rj} is missing: {run_dir} is not a run directory. Fix: give the folder "
                           "'persona-harness run' wrote")
    data = read_json_file(rj, what="run.json", max_bytes=64 * 1024 * 1024)
    if not isinstance(data, dict):
        raise HarnessError(f"{rj}: expected a JSON object. Fix: give the folder 'persona-harness run' wrote")
    return data


def settings_for_run(run_dir: str | Path, flags: dict | None = None, *, config_path: str | None = None,
                     environ: dict | None = None, cwd: str | Path = "."):
    """The settings to read a run with: defaults < config file < environment < the run's own
    ``RUN_SETTINGS`` from run.json < ``flags`` (field -> value). Nothing in ``NOT_FROM_RUN`` is taken
    from run.json. Every value is validated; a bad one in run.json is named with the file and field."""
    from harness.core.config import FIELDS, coerce, load_settings, validate_settings

    rj = Path(run_dir) / "run.json"
    cfg = read_run_json(run_dir).get("config", {}) if rj.exists() else {}
    if not isinstance(cfg, dict):
        raise HarnessError(f"{rj}: field 'config' is not an object. Fix: give the folder 'persona-harness run' wrote")
    run_vals: dict[str, Any] = {}
    for k in RUN_SETTINGS:
        if k in FIELDS and cfg.get(k) is not None:
            run_vals[k] = cfg[k] if k == "profile_applied" else coerce(k, cfg[k], f"{rj}: field 'config.{k}'")
    validate_settings(run_vals, {k: f"{rj}: field 'config.{k}'" for k in run_vals}, environ=environ)
    merged = {**run_vals, **{k: v for k, v in (flags or {}).items() if v is not None}}
    return load_settings(merged, config_path=config_path, environ=environ, cwd=cwd)


def load_run_trait(run_dir: str | Path, settings, pm):
    """The TraitSpec of a run: by name through the trait sources, else from its recorded source path."""
    info = read_run_json(run_dir).get("trait", {})
    rj = Path(run_dir) / "run.json"
    if not isinstance(info, dict):
        raise HarnessError(f"{rj}: field 'trait' is not an object. Fix: give the folder 'persona-harness run' wrote")
    name, source, want = info.get("name"), str(info.get("source") or ""), info.get("hash")
    if name is not None:
        from harness.core.pipeline import safe_name

        safe_name(str(name))
    spec = pm.hook.harness_load_trait(name=name, settings=settings) if name else None
    if (spec is None or (want and spec.hash != want)) and source and Path(source).exists():
        from harness.core.traits import load_trait_path

        spec = load_trait_path(Path(source).parent if Path(source).is_file() else source)
    if spec is None:
        raise HarnessError(f"{rj}: trait {name!r} cannot be loaded (source {source!r}). Fix: pass --traits-dir")
    if want and spec.hash != want:
        warnings.warn(f"trait {name!r} changed since the run (hash {spec.hash[:12]} != {str(want)[:12]})", stacklevel=2)
    return spec


# generators whose batches keep per-row steering on their requests (see the module doc)
PER_ROW_GENERATORS = ("hf", "fast")
# bumped when steered generations cached under the same spec were wrong: 2 = per-row coefficients on the
# fast generator's rows (before, its length sort put coefficients on other rows)
STEER_KEY_VERSION = 2


def _vec_hash(v) -> str:
    return hashlib.sha256(v.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def steered_generate(ctx, generator, requests: Sequence, cells: Sequence[tuple[int | None, float]], vectors,
                     *, positions: str = "response", scale: str = "raw", norms=None, batch_size: int = 0,
                     progress: bool = False) -> dict[tuple, list]:
    """Generate ``requests`` under every cell ``(layer, coef)`` (layer None or coef 0 = unsteered).

    ``vectors``: ``[num_layers + 1, hidden]``. Returns ``{cell: [Generation in request order]}``.
    """
    import torch

    from harness.core.pipeline import generation_key
    from harness.core.records import Generation
    from harness.analysis.steering import RequestSteer, steer, steer_requests

    if not getattr(generator, "needs_model", True):
        raise HarnessError(f"generator {generator.name!r} does not run the in-process model, so hooks cannot steer "
                           "it. Fix: use --generator hf")
    lm = ctx.model()
    vectors = torch.as_tensor(vectors).float()
    cfg = generator.config()
    cells = [(None if (L is None or c == 0) else int(L), 0.0 if (L is None or c == 0) else float(c)) for L, c in cells]
    uniq = list(dict.fromkeys(cells))
    layers = sorted({L for L, _ in uniq if L is not None})
    vhash = {L: _vec_hash(vectors[L]) for L in layers}

    def key(r, cell):
        L, c = cell
        spec = None if L is None else {"layer": L, "coef": c, "positions": positions, "scale": scale,
                                       "vector": vhash[L], "norm": (float(norms[L]) if scale == "mean_norm" else None),
                                       "v": STEER_KEY_VERSION}
        # unsteered cells share the pipeline's keys (and so its cached generations)
        return generation_key(ctx, generator, r, config=cfg, **({"steer": spec} if spec is not None else {}))

    rows = [(cell, r, key(r, cell)) for cell in uniq for r in requests]
    cached = ctx.cache.get_many([k for _, _, k in rows]) if ctx.cache is not None else {}
    done: dict[str, Any] = {k: Generation.from_dict({**cached[k], "cache_key": k}) for _, _, k in rows if k in cached}
    todo = [row for row in rows if row[2] not in done]
    bs = (batch_size or generator.batch_size(ctx)) if todo else 1
    per_row = bool(getattr(generator, "steer_per_row", generator.name in PER_ROW_GENERATORS))
    # per_row: cells share batches (one RequestSteer per row); else one cell per generate call (one steer setting)
    groups = [todo] if per_row else [[row for row in todo if row[0] == cell] for cell in uniq]
    chunks = [g[a: a + bs] for g in groups for a in range(0, len(g), bs)]
    t0 = time.perf_counter()
    n_done = 0
    by_layer = {L: {L: vectors[L]} for L in layers}  # one vector dict per layer: its cells share one vector
    specs = {cell: RequestSteer(by_layer[cell[0]], coef=cell[1], positions=positions, scale=scale, norms=norms)
             for cell in uniq if cell[0] is not None}
    for chunk in chunks:
        reqs = [r for _, r, _ in chunk]
        if any(cell[0] is not None for cell, _, _ in chunk):
            if per_row:  # every row with its own cell's steering, in request order
                hooks = steer_requests(lm, [specs.get(cell) for cell, _, _ in chunk])
            else:  # one cell: one layer, one number
                (L, c) = chunk[0][0]
                hooks = steer(lm, by_layer[L], c, positions=positions, scale=scale, norms=norms)
            with hooks as h:
                gens = generator.generate(reqs, ctx)
            if h.calls == 0:
                raise HarnessError(f"generator {generator.name!r} never ran the steered model's blocks; steering had "
                                   "no effect. Fix: use --generator hf")
        else:
            gens = generator.generate(reqs, ctx)
        if len(gens) != len(chunk):
            raise HarnessError(f"generator {generator.name!r} returned {len(gens)} generations for {len(chunk)} requests")
        if ctx.cache is not None:
            ctx.cache.put_many("generate", [(k, g.to_dict()) for (_, _, k), g in zip(chunk, gens)])
        for (_, _, k), g in zip(chunk, gens):
            done[k] = Generation.from_dict({**g.to_dict(), "cache_key": k})
        n_done += len(chunk)
        if progress:
            print(f"  steered generate {n_done}/{len(todo)} rows ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return {cell: [done[key(r, cell)] for r in requests] for cell in uniq}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


@run_lock_scope
def run_sweep(run_dir: str | Path, settings=None, *, pm=None, layers: Sequence[int], coefs: Sequence[float],
              positions: str = "response", scale: str = "raw", method: str = "response_avg_diff",
              n_questions: int | None = 5, samples: int = 1, max_new_tokens: int | None = None,
              system_prompt: str = "", ctx=None, write: bool = True, force: bool = False) -> dict:
    """Run the layers x coefs sweep for a run directory; returns (and writes) the sweep table.

    An existing ``sweep.json`` with more scored judgments is not replaced unless ``force``."""
    import dataclasses
    import math

    from harness.core.artifacts import (atomic_write_json, atomic_write_text, load_vectors, old_count, refuse_fewer,
                                        write_jsonl)
    from harness.core.cache import Cache
    from harness.core.config import validate_settings
    from harness.core.locks import hold_run_dir
    from harness.core.pipeline import RunContext, run_judge
    from harness.core.plugins import build_registry, get_plugin_manager
    from harness.core.records import GenerationRequest
    from harness.analysis.steering import SCALES, norms_for_run

    run_dir = Path(run_dir)
    if scale not in SCALES:
        raise HarnessError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise HarnessError(f"--samples {samples}: give at least 1 sample per question and cell")
    if n_questions is not None and (isinstance(n_questions, bool) or int(n_questions) < 0):
        raise HarnessError(f"--questions {n_questions}: give a number of questions >= 1 (0 = all)")
    bad_coefs = [c for c in coefs if not math.isfinite(float(c))]
    if bad_coefs or not list(coefs):
        raise HarnessError(f"--coefs: {'no coefficients' if not bad_coefs else f'{bad_coefs[0]} is not finite'}. "
                           "Fix: give finite numbers, e.g. --coefs=-2,0,2")
    if not list(layers):
        raise HarnessError("--layers: no layers. Fix: give a comma list of layers, e.g. --layers 10,15")
    if write:
        hold_run_dir(run_dir)
    t_start = time.perf_counter()
    s = settings or settings_for_run(run_dir)
    validate_settings(s)
    if max_new_tokens:
        s = s.replace(max_new_tokens=int(max_new_tokens))
    pm = pm or get_plugin_manager(modules=s.plugins)
    spec = load_run_trait(run_dir, s, pm)
    ctx = ctx or RunContext(settings=s, pm=pm)
    ctx.trait, ctx.run_dir = spec, run_dir
    ctx.cache = ctx.cache or Cache(s.cache_dir)
    lm = ctx.model()
    vs = load_vectors(run_dir / "vectors.safetensors", expect_shape=(lm.num_layers + 1, lm.hidden_size))
    if method not in vs.tensors:
        raise HarnessError(f"{run_dir / 'vectors.safetensors'} has no {method!r} (has {', '.join(sorted(vs.tensors))})")
    vectors = vs[method]
    layers = [int(L) for L in layers]
    bad = [L for L in layers if not 1 <= L <= lm.num_layers]
    if bad:
        raise HarnessError(f"layers {bad} cannot be steered: use 1..{lm.num_layers} (hidden_states index; "
                           "L steers model.layers[L-1])")
    questions = list(spec.eval_questions) or list(spec.questions)
    split = "eval" if spec.eval_questions else "extract"
    if not spec.eval_questions:
        warnings.warn(f"trait {spec.name!r} has no evaluation questions; sweeping the extraction questions", stacklevel=2)
    if n_questions:
        questions = questions[: int(n_questions)]
    requests = [GenerationRequest(
        id=f"{spec.name}_sweep_{split}_{qi}_{si}", trait=spec.name, split="sweep", polarity="steer", question_index=qi,
        question=q, instruction_index=0, sample_index=si, system_prompt=system_prompt, temperature=s.temperature,
        top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed) for qi, q in enumerate(questions)
        for si in range(samples)]
    norms = norms_for_run(run_dir, lm) if scale == "mean_norm" else None
    generator = build_registry(pm, "generator").create(s.generator, s)
    judge = build_registry(pm, "judge").create(s.judge, s)
    cells = [(None, 0.0)] + [(L, float(c)) for L in layers for c in coefs if float(c) != 0.0]
    t0 = time.perf_counter()
    by_cell = steered_generate(ctx, generator, requests, cells, vectors, positions=positions, scale=scale,
                               norms=norms, batch_size=s.batch_size, progress=s.progress)
    t_gen = time.perf_counter() - t0
    uniq = list(by_cell)
    flat = [g for c in uniq for g in by_cell[c]]
    t0 = time.perf_counter()
    # hooks are gone: the judge is never steered; no journal in the run folder (the cache holds the records)
    metrics = (spec.name, COHERENCE, RELEVANCE)
    judgments = run_judge(dataclasses.replace(ctx, run_dir=None), spec, flat, judge, metrics=metrics)
    t_judge = time.perf_counter() - t0
    per_gen = len(metrics)
    stats: dict[tuple, dict] = {}
    halves: dict[tuple, dict] = {}
    gen_rows = []
    for ci, cell in enumerate(uniq):
        n = len(by_cell[cell])
        js = judgments[ci * n * per_gen:(ci + 1) * n * per_gen]
        rows = [(g, {j.metric: j.score for j in js[gi * per_gen:(gi + 1) * per_gen]})
                for gi, g in enumerate(by_cell[cell])]
        stats[cell] = cell_stats(rows, spec.name)
        halves[cell] = {h: cell_stats([r for r in rows if question_half(r[0].question_index) == h], spec.name)
                        for h in HALVES}
        for gi, g in enumerate(by_cell[cell]):
            jj = js[gi * per_gen:(gi + 1) * per_gen]
            gen_rows.append({"layer": cell[0], "coef": cell[1], "question_index": g.question_index,
                             "half": question_half(g.question_index),
                             "sample_index": g.sample_index, "question": g.question, "response": g.response,
                             "finish_reason": g.finish_reason,
                             "scores": {j.metric: j.score for j in jj},
                             "unscored": {j.metric: j.reason for j in jj if j.score is None}})
    base = stats[(None, 0.0)]
    out_cells = []
    for L in layers:
        for c in sorted({0.0, *[float(x) for x in coefs]}):  # coef 0 (the baseline) always included
            cell = (None, 0.0) if c == 0.0 else (L, c)
            out_cells.append({"layer": L, "coef": c, **stats[cell], "halves": halves[cell],
                              "shared_baseline": c == 0.0})
    selection = select_cell(out_cells, halves[(None, 0.0)])
    result = {
        "trait": spec.name, "model": s.model, "judge": s.judge, "judge_model": getattr(judge, "model_id", s.judge_model),
        "method": method, "positions": positions, "scale": scale, "layers": layers,
        "coefs": sorted({0.0, *[float(c) for c in coefs]}), "questions": len(questions), "samples": samples,
        "split": split, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "system_prompt": system_prompt,
        "baseline": {**base, "coef": 0.0, "halves": halves[(None, 0.0)]}, "cells": out_cells,
        "selection": selection,
        "vector_norms": {str(L): round(float(vectors[L].norm()), 6) for L in layers},
        "timings": {"generate": round(t_gen, 3), "judge": round(t_judge, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
        "rows_generated": len(uniq) * len(requests),
        "layer_convention": "layer L = hidden_states[L]; steering hooks model.layers[L-1]",
    }
    if norms is not None:
        result["mean_norms"] = {str(L): round(norms[L], 6) for L in layers}
    if write:
        refuse_fewer(run_dir / SWEEP_FILE, _scored(result), old_count(run_dir / SWEEP_FILE, _scored), force=force,
                     unit="scored judgments")
        atomic_write_json(run_dir / SWEEP_FILE, result)
        atomic_write_text(run_dir / "sweep.csv", sweep_csv(result))
        write_jsonl(run_dir / "sweep_generations.jsonl", gen_rows)
    return result


def _r(x):
    return None if x is None else round(float(x), 4)


#: the evaluation questions are split in two: the (layer, coefficient) is chosen on ``select`` and its
#: effect reported on ``report`` (questions never used for the choice)
HALVES = ("select", "report")


def question_half(question_index: int) -> str:
    """Even question indices choose the cell, odd ones report it."""
    return HALVES[int(question_index) % 2]


def steering_score(trait: float | None, coherence: float | None, relevance: float | None) -> float | None:
    """Harmonic mean of trait expression, coherence and relevance (0-100 each): high only when the
    steered answers show the trait *and* stay coherent *and* answer the question."""
    xs = [trait, coherence, relevance]
    if any(x is None for x in xs):
        return None
    if any(x <= 0 for x in xs):  # type: ignore[operator]
        return 0.0
    return 3.0 / sum(1.0 / x for x in xs)  # type: ignore[operator]


def cell_stats(rows: list, trait: str) -> dict:
    """Means of the judged scores of ``rows`` = [(generation, {metric: score}), ...] and the steering score."""
    def scores(m: str) -> list[float]:
        return [float(s[m]) for _, s in rows if s.get(m) is not None]

    tr, co, re_ = scores(trait), scores(COHERENCE), scores(RELEVANCE)
    out = {"trait_mean": _r(_mean(tr)), "coherence_mean": _r(_mean(co)), "relevance_mean": _r(_mean(re_)),
           "n": len(rows), "trait_scored": len(tr), "coherence_scored": len(co), "relevance_scored": len(re_)}
    out["steering_score"] = _r(steering_score(_mean(tr), _mean(co), _mean(re_)))
    return out


def select_cell(cells: list[dict], baseline_halves: dict) -> dict:
    """The cell with the best steering score on the ``select`` half, and its effect on the ``report``
    half (trait, coherence, relevance and steering score, each against the unsteered baseline there)."""
    scored = [c for c in cells if c["coef"] != 0.0 and c["halves"]["select"]["steering_score"] is not None]
    if not scored:
        return {"layer": None, "coef": None, "reason": "no steered cell has a steering score on the select half"}
    best = max(scored, key=lambda c: (c["halves"]["select"]["steering_score"], -abs(c["coef"])))
    rep, b = best["halves"]["report"], baseline_halves["report"]

    def delta(k: str) -> float | None:
        return None if rep.get(k) is None or b.get(k) is None else _r(rep[k] - b[k])

    return {"layer": best["layer"], "coef": best["coef"], "chosen_on": "select",
            "select": best["halves"]["select"], "report": rep, "baseline_report": b,
            "effect_on_report": {k: delta(k) for k in ("trait_mean", "coherence_mean", "relevance_mean",
                                                      "steering_score")}}


def _scored(result: dict) -> int:
    """Scored judgments in a sweep table (the baseline counted once)."""
    cells = result["cells"]
    base = [c for c in cells if c.get("shared_baseline")][:1]
    return sum(int(c["trait_scored"]) + int(c["coherence_scored"]) for c in base + [c for c in cells
                                                                                 if not c.get("shared_baseline")])


def sweep_csv(result: dict) -> str:
    buf = io.StringIO()
    cols = ["layer", "coef", "trait_mean", "coherence_mean", "relevance_mean", "steering_score", "n", "trait_scored",
            "coherence_scored", "relevance_scored", "shared_baseline", "select_steering_score", "report_steering_score"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in result["cells"]:
        h = c.get("halves") or {}
        w.writerow({**c, "select_steering_score": (h.get("select") or {}).get("steering_score"),
                    "report_steering_score": (h.get("report") or {}).get("steering_score")})
    return buf.getvalue()


def format_table(result: dict) -> str:
    """Trait / coherence means as a text grid (layers down, coefficients across)."""
    coefs = sorted({c["coef"] for c in result["cells"]})
    lines = [f"trait score / coherence ({result['scale']} scale, positions {result['positions']}, "
             f"{result['questions']} questions x {result['samples']} samples)",
             "layer  " + "  ".join(f"{c:>11g}" for c in coefs)]
    for L in result["layers"]:
        row = {c["coef"]: c for c in result["cells"] if c["layer"] == L}

        def f(x):
            return "  n/a" if x is None else f"{x:5.1f}"

        lines.append(f"{L:>5}  " + "  ".join(f"{f(row[c]['trait_mean'])}/{f(row[c]['coherence_mean'])}" if c in row
                                             else " " * 11 for c in coefs))
    sel = result.get("selection") or {}
    if sel.get("layer") is not None:
        eff = sel["effect_on_report"]

        def d(k: str) -> str:
            return "n/a" if eff.get(k) is None else f"{eff[k]:+.1f}"

        lines.append(f"chosen on the select half (best steering score = harmonic mean of trait, coherence, relevance): "
                     f"layer {sel['layer']}, coef {sel['coef']:g}; on the held-out report half vs unsteered: trait "
                     f"{d('trait_mean')}, coherence {d('coherence_mean')}, relevance {d('relevance_mean')}, "
                     f"steering score {d('steering_score')}")
    elif sel:
        lines.append(f"no cell chosen: {sel.get('reason')}")
    return "\n".join(lines)
