"""CLI sub-commands that use a run's vectors: steer, sweep, monitor, layers, lens, sae, report.

Each takes a run directory. A run directory is data: from its ``run.json`` come only the settings
needed to read the run (model, trait, generation and judging settings: ``harness.analysis.sweep.
RUN_SETTINGS``), with any settings flag on top (so ``--model``, ``--judge``, ``--temperature`` ...
override what the run used). Plugins, the judge server and its key variable, the cache folder and the
machine's resources come from the command line, the environment or a config file, never from run.json.
Commands that write into the run directory lock it (``harness.core.locks``) and do not replace earlier
results with fewer unless ``--force``; every vector is checked when read (``load_vectors``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError


def _floats(s: str) -> list[float]:
    import math

    try:
        out = [float(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise HarnessError(f"{s!r} is not a comma-separated list of numbers") from None
    if not out or not all(math.isfinite(x) for x in out):
        raise HarnessError(f"{s!r}: {'no numbers' if not out else 'a coefficient is not finite'}. Fix: give finite "
                           "numbers, e.g. --coefs=-2,0,2")
    return out


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise HarnessError(f"{s!r} is not a comma-separated list of layer numbers") from None


def _run_dir(args) -> Path:
    from harness.core.runs import resolve_run_dir

    d = resolve_run_dir(args.run_dir)  # a run folder, or a trait folder / its 'latest' file: the latest run
    if not (d / "run.json").exists():
        raise HarnessError(f"{d}: no run.json, not a run directory. Fix: give the folder 'persona-harness run' wrote")
    return d


def _writing(args) -> Path:
    """The run directory of a command that writes into it, locked by this process until it exits."""
    from harness.core.locks import hold_run_dir

    d = _run_dir(args)
    hold_run_dir(d)
    return d


def _settings(args):
    from harness.analysis.sweep import settings_for_run
    from harness.cli.options import flags_from_args

    return settings_for_run(_run_dir(args), flags_from_args(args), config_path=getattr(args, "config", None))


def _num_layers(run_dir: Path, lm=None) -> int | None:
    """num_hidden_layers of the run's model: from the loaded model, else from run.json (None if unknown)."""
    from harness.core.artifacts import run_vector_shape

    if lm is not None:
        return int(lm.num_layers)
    shape = run_vector_shape(run_dir)
    return None if shape is None else shape[0] - 1


def _check_layers(layers: list[int], n: int | None, flag: str, lo: int = 0) -> None:
    """Layers must be hidden_states indices ``lo..n`` (1..n to steer: L hooks model.layers[L-1])."""
    if n is None:
        return
    bad = [L for L in layers if not lo <= L <= n]
    if bad:
        raise HarnessError(f"{flag} {bad[0]}: this model's layers are {lo}..{n} (hidden_states index"
                           f"{'; L steers model.layers[L-1]' if lo == 1 else ''}). Fix: give a layer in {lo}..{n}")


def _check_positive(value: int, flag: str, what: str) -> None:
    if value < 1:
        raise HarnessError(f"{flag} {value}: give {what} >= 1")


def _ctx(args):
    from harness.core.pipeline import RunContext
    from harness.core.plugins import get_plugin_manager

    s = _settings(args)
    pm = get_plugin_manager(modules=s.plugins)
    return RunContext(settings=s, pm=pm, run_dir=_run_dir(args))


def _open(args):
    """(context, run directory, loaded model) for a command that runs the run's model."""
    ctx = _ctx(args)
    return ctx, _run_dir(args), ctx.model()


def _vector_and_layers(args, run_dir: Path, lm):
    """The run's ``--method`` vector and the ``--layer`` list (default: the ``layer`` setting, e.g. the
    paper's layer for its models, else the recommended layer)."""
    v = _vectors(run_dir, lm, args.method)
    default = _settings(args).layer
    layers = _ints(args.layer) if args.layer else [default or _rec_layer(run_dir, lm)]
    _check_layers(layers, lm.num_layers, "--layer")
    return v, layers


def _vectors(run_dir: Path, lm, method: str):
    from harness.core.artifacts import load_vectors

    vs = load_vectors(run_dir / "vectors.safetensors", expect_shape=(lm.num_layers + 1, lm.hidden_size))
    if method not in vs.tensors:
        raise HarnessError(f"{run_dir / 'vectors.safetensors'} has no {method!r} (has {', '.join(sorted(vs.tensors))})")
    return vs[method]


def _common(p, *, method: bool = True, force: bool = False) -> None:
    from harness.cli.options import add_settings_arguments

    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by 'persona-harness run'")
    if method:
        p.add_argument("--method", default="response_avg_diff", help="vector method (default response_avg_diff)")
    if force:
        _force_opt(p)
    add_settings_arguments(p)


def _force_opt(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace earlier results in the run directory even when the new ones are fewer")


def _steer_opts(p) -> None:
    p.add_argument("--positions", default="response", choices=("all", "prompt", "response"),
                   help="response (default, the paper's): last position of each forward call; prompt: prefill "
                        "only; all: every position")
    p.add_argument("--scale", default="raw", choices=("raw", "unit", "mean_norm"),
                   help="raw: coef*v; unit: coef*v/||v||; mean_norm: coef * mean activation norm * v/||v||")


# -- commands -------------------------------------------------------------------------------------
def cmd_steer(args) -> int:
    from harness.core.cache import Cache
    from harness.core.plugins import build_registry
    from harness.core.records import GenerationRequest
    from harness.analysis.steering import norms_for_run
    from harness.analysis.sweep import load_run_trait, steered_generate

    coefs = _floats(args.coef)
    _check_layers([args.layer], _num_layers(_run_dir(args)), "--layer", lo=1)
    if not args.prompt:
        _check_positive(args.questions, "--questions", "a number of questions")
    ctx, run_dir, lm = _open(args)
    _check_layers([args.layer], lm.num_layers, "--layer", lo=1)
    s = ctx.settings
    ctx.cache = Cache(s.cache_dir)
    if args.vector:  # a vector from elsewhere: llama.cpp/repeng GGUF, steering-vectors or torch .pt, safetensors
        from harness.analysis.export import load_vector_file

        v, present = load_vector_file(args.vector, num_layers=lm.num_layers, hidden_size=lm.hidden_size,
                                      method=args.method)
        if args.layer not in present:
            raise HarnessError(f"--vector {args.vector} sets no direction for --layer {args.layer} (it sets "
                               f"hidden_states {present}; llama.cpp direction.k is layer k+1)")
    else:
        v = _vectors(run_dir, lm, args.method)
    prompts = list(args.prompt or [])
    if not prompts:
        spec = load_run_trait(run_dir, s, ctx.pm)
        prompts = list(spec.eval_questions or spec.questions)[: args.questions]
    reqs = [GenerationRequest(id=f"steer_{i}", trait="steer", split="steer", polarity="steer", question_index=i,
                              question=q, instruction_index=0, sample_index=0, system_prompt=args.system or "",
                              temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed)
            for i, q in enumerate(prompts)]
    cells = [(None, 0.0)] + [(args.layer, c) for c in coefs if c != 0]
    norms = norms_for_run(run_dir, lm) if args.scale == "mean_norm" else None
    gen = build_registry(ctx.pm, "generator").create(s.generator, s)
    out = steered_generate(ctx, gen, reqs, cells, v, positions=args.positions, scale=args.scale, norms=norms)
    rows = [{"layer": L, "coef": c, "question": g.question, "response": g.response}
            for (L, c), gs in out.items() for g in gs]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for i, q in enumerate(prompts):
        print(f"\n### {q}")
        for (L, c), gs in out.items():
            tag = "unsteered" if L is None else f"layer {L}, coef {c:g} ({args.scale}, {args.positions})"
            print(f"--- {tag}\n{gs[i].response}")
    return 0


def _default_layers(run_dir: Path, n_layers: int) -> list[int]:
    from harness.analysis.layers import recommend_for_run

    rec = recommend_for_run(run_dir, write=False)
    c = rec.get("layer") or max(1, n_layers // 2)
    step = max(1, n_layers // 8)
    return sorted({min(max(1, x), n_layers - 1) for x in (c - step, c, c + step)})


def cmd_sweep(args) -> int:
    import time

    from harness.analysis.sweep import format_table, run_sweep

    t0 = time.perf_counter()
    coefs = _floats(args.coefs)
    _check_positive(args.samples, "--samples", "a number of samples per question and cell")
    if args.questions < 0:
        raise HarnessError(f"--questions {args.questions}: give a number of questions >= 1 (0 = all)")
    if args.layers:
        _check_layers(_ints(args.layers), _num_layers(_run_dir(args)), "--layers", lo=1)
    _writing(args)
    ctx, run_dir, lm = _open(args)
    layers = _ints(args.layers) if args.layers else _default_layers(run_dir, lm.num_layers)
    res = run_sweep(run_dir, ctx.settings, pm=ctx.pm, ctx=ctx, layers=layers, coefs=coefs,
                    positions=args.positions, scale=args.scale, method=args.method, n_questions=args.questions,
                    samples=args.samples, force=args.force)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(format_table(res))
    t = res["timings"]
    print(f"\n{len(res['cells'])} cells ({res['rows_generated']} generated rows): generate {t['generate']:.1f}s, "
          f"judge {t['judge']:.1f}s, total {time.perf_counter() - t0:.1f}s (model load included)")
    print(f"wrote {run_dir / 'sweep.json'} and sweep.csv")
    return 0


def cmd_monitor(args) -> int:
    from harness.analysis.monitor import load_records, monitor_run, project_records
    from harness.core.artifacts import atomic_write_text

    if args.input and args.layer:
        _check_layers(_ints(args.layer), _num_layers(_run_dir(args)), "--layer")
    if not args.input:
        _writing(args)
    ctx, run_dir, lm = _open(args)
    if args.input:
        v, layers = _vector_and_layers(args, run_dir, lm)
        res = project_records(lm, load_records(args.input), v, layers, source=str(args.input),
                              batch_size=ctx.settings.extract_batch_size)
        text = "".join(json.dumps(r) + "\n" for r in res)
        if args.output:
            atomic_write_text(args.output, text)
            print(f"wrote {len(res)} projections to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    res = monitor_run(run_dir, lm, split=args.split, method=args.method, batch_size=ctx.settings.extract_batch_size,
                      force=args.force)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['split']} split: {res['n_pos']} pos, {res['n_neg']} neg; projection = {res['projection']}")
    print("layer  AUROC   Cohen_d  pos_mean  neg_mean  r(trait)")
    for r in res["layers"]:
        def f(x, w=8, nd=3):
            return f"{'n/a':>{w}}" if x is None else f"{x:{w}.{nd}f}"
        print(f"{r['layer']:>5} {f(r['auroc'], 6)} {f(r['cohens_d'])} {f(r['pos_mean'], 9, 2)} {f(r['neg_mean'], 9, 2)} "
              f"{f(r.get('trait_corr'))}")
    print(f"best separation: layer {res['best_layer']}; wrote {run_dir / 'monitor.json'} and projections.jsonl")
    return 0


def _rec_layer(run_dir: Path, lm) -> int:
    from harness.analysis.layers import recommend_for_run

    rec = recommend_for_run(run_dir, write=False)
    return int(rec.get("layer") or max(1, lm.num_layers // 2))


def cmd_layers(args) -> int:
    from harness.analysis.layers import recommend_for_run

    res = recommend_for_run(_writing(args), min_coherence=args.min_coherence)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"recommended layer: {res.get('layer')} (basis: {res.get('basis')})\n{res['explanation']}")
    return 0


def cmd_lens(args) -> int:
    from harness.core.artifacts import atomic_write_json
    from harness.analysis.lens import lens_layers
    from harness.core.artifacts import read_json_file, refuse_fewer
    from harness.analysis.report import LENS_FILE

    _check_positive(args.k, "-k", "a number of tokens per list")
    if args.layer:
        _check_layers(_ints(args.layer), _num_layers(_run_dir(args)), "--layer")
    _writing(args)
    ctx, run_dir, lm = _open(args)
    v, layers = _vector_and_layers(args, run_dir, lm)
    res = lens_layers(lm, v, layers, k=args.k)
    p = run_dir / LENS_FILE
    try:
        old = read_json_file(p, what="lens file") if p.exists() else {}
    except HarnessError:
        old = {}
    old = old if isinstance(old, dict) else {}
    if old.get("method") == args.method and any(str(L) in (old.get("layers") or {}) for L in res):
        refuse_fewer(p, args.k, int(old.get("k") or 0), force=args.force, unit="tokens per list (-k)")
    merged = old.get("layers", {}) if old.get("method") == args.method else {}
    merged.update({str(L): r for L, r in res.items()})
    atomic_write_json(p, {"method": args.method, "k": args.k, "layers": merged})
    if args.json:
        print(json.dumps({str(k): v for k, v in res.items()}, indent=2, ensure_ascii=False))
        return 0
    for L, r in res.items():
        for mode in ("raw", "final_norm"):
            print(f"\nlayer {L}, {'without' if mode == 'raw' else 'with'} final norm")
            print("  top:    " + "  ".join(f"{x['token']!r}" for x in r[mode]["top"]))
            print("  bottom: " + "  ".join(f"{x['token']!r}" for x in r[mode]["bottom"]))
    return 0


def cmd_sae(args) -> int:
    import torch

    from harness.core.artifacts import atomic_write_json, load_vectors
    from harness.analysis.report import SAE_FILE
    from harness.analysis.sae import load_sae, read_vector

    from harness.core.artifacts import old_count, refuse_fewer

    _check_positive(args.k, "-k", "a number of latents")
    run_dir = _writing(args)
    sae = load_sae(args.sae)
    vs = load_vectors(run_dir / "vectors.safetensors")
    if args.method not in vs.tensors:
        raise HarnessError(f"{run_dir / 'vectors.safetensors'} has no {args.method!r} (has {', '.join(sorted(vs.tensors))})")
    res = read_vector(sae, torch.as_tensor(vs[args.method]), args.layer, k=args.k,
                      allow_layer_mismatch=args.allow_layer_mismatch)
    n_top = lambda r: len(r["top"])  # noqa: E731
    prev = old_count(run_dir / SAE_FILE, n_top) if _same_sae(run_dir / SAE_FILE, res) else None
    refuse_fewer(run_dir / SAE_FILE, n_top(res), prev, force=args.force, unit="latents")
    atomic_write_json(run_dir / SAE_FILE, res)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"SAE {sae.path} ({res.get('architecture', 'standard')}): {sae.hook_name} (hidden_states index {sae.layer}), "
          f"d_sae {sae.d_sae}; vector layer {res['layer']}")
    print("latent   cosine")
    for x in res["top"]:
        print(f"{x['latent']:>6}  {x['cosine']:+.4f}")
    print("most negative: " + ", ".join(f"{x['latent']} ({x['cosine']:+.3f})" for x in res["bottom"][:5]))
    if "encoded" in res:
        enc = res["encoded"]
        print(f"encoded: {enc['active']} latents active" + (": " + ", ".join(
            f"{x['latent']} ({x['activation']:.3f})" for x in enc["top"][:5]) if enc["top"] else ""))
    return 0


def cmd_report(args) -> int:
    from harness.analysis.monitor import MONITOR_FILE
    from harness.analysis.report import LENS_FILE, REPORT_FILE, build_report
    from harness.core.artifacts import atomic_write_text

    run_dir = _writing(args)
    lm = None
    need = not ((run_dir / MONITOR_FILE).exists() and (run_dir / LENS_FILE).exists())
    if need and not args.no_compute and (run_dir / "vectors.safetensors").exists():
        lm = _ctx(args).model()
    out = Path(args.output) if args.output else run_dir / REPORT_FILE
    html = build_report(run_dir, lm=lm, compute=not args.no_compute)
    if out.is_file() and not args.force:
        old = out.read_text(encoding="utf-8", errors="replace")
        if html.count(MISSING_MARK) > old.count(MISSING_MARK):
            raise HarnessError(f"{out} has {old.count(MISSING_MARK)} sections without data; the new report would "
                               f"have {html.count(MISSING_MARK)}, replacing earlier results with fewer. Nothing was "
                               "written. Fix: pass --force to replace it, or compute the missing data first "
                               "(monitor, lens, sweep)")
    atomic_write_text(out, html)
    print(f"wrote {out}")
    return 0


MISSING_MARK = 'class="missing"'  # a report section without data (harness.analysis.report._missing)


def _same_sae(path: Path, res: dict) -> bool:
    from harness.core.artifacts import old_count

    return bool(old_count(path, lambda r: r.get("sae_path") == res.get("sae_path")
                          and r.get("layer") == res.get("layer")))


def register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("steer", help="generate with a vector added at one layer (compare to unsteered)")
    _common(p)
    p.add_argument("--layer", type=int, required=True, help="hidden_states index L (hooks model.layers[L-1])")
    p.add_argument("--coef", default="2", help="coefficient(s), comma-separated (default 2; a list that starts with "
                                               "a negative number needs '=': --coef=-4,4)")
    _steer_opts(p)
    p.add_argument("--prompt", action="append", help="user message (repeatable; default: the first eval questions)")
    p.add_argument("--questions", type=int, default=2, help="eval questions to use when no --prompt (default 2)")
    p.add_argument("--system", default="", help="system prompt (default none)")
    p.add_argument("--vector", default=None, metavar="FILE",
                   help="steer with this vector file instead of the run's (.gguf control vector, steering-vectors or "
                        "[layers+1, hidden] .pt, .safetensors); RUN_DIR still gives the model and prompts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_steer)

    p = subparsers.add_parser("sweep", help="layers x coefficients -> mean trait score and coherence per cell")
    _common(p, force=True)
    p.add_argument("--layers", default="", help="comma list of layers (default: 3 around the recommended layer)")
    p.add_argument("--coefs", default="-2,-1,0,1,2", help="comma list of coefficients (default -2,-1,0,1,2; a list "
                                                          "that starts with a negative number needs '=': --coefs=-4,0,4)")
    _steer_opts(p)
    p.add_argument("--questions", type=int, default=5, help="number of eval questions (default 5; 0 = all)")
    p.add_argument("--samples", type=int, default=1, help="samples per question and cell (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("monitor", help="project responses onto the vector; per-layer AUROC / Cohen's d")
    _common(p, force=True)
    p.add_argument("--split", default="eval", help="split of the run's generations (default eval)")
    p.add_argument("--input", help="project these records instead (.jsonl/.json: messages, or question+answer)")
    p.add_argument("--layer", default="", help="layers for --input (comma list; default: recommended)")
    p.add_argument("--output", help="write --input projections here (JSONL) instead of stdout")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_monitor)

    p = subparsers.add_parser("layers", help="recommend a layer from separation and sweep results, with reasons")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--min-coherence", type=float, default=None, help="coherence a sweep cell needs (default: run's C)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layers)

    p = subparsers.add_parser("lens", help="logit lens: top/bottom tokens of the vector (with/without final norm)")
    _common(p, force=True)
    p.add_argument("--layer", default="", help="comma list of layers (default: recommended)")
    p.add_argument("-k", type=int, default=10, help="tokens per list (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lens)

    p = subparsers.add_parser("sae", help="SAE latents whose decoder directions align with the vector")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--sae", required=True, help="folder with cfg.json + sae_weights.safetensors (SAELens layout)")
    p.add_argument("--layer", type=int, default=None, help="vector layer (default: the SAE's hook layer)")
    p.add_argument("--method", default="response_avg_diff")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--allow-layer-mismatch", action="store_true", help="warn instead of refusing")
    _force_opt(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sae)

    p = subparsers.add_parser("report", help="write a self-contained HTML report for a run directory")
    _common(p, method=False, force=True)
    p.add_argument("--output", "-o", help="output file (default RUN_DIR/report.html)")
    p.add_argument("--no-compute", action="store_true", help="do not load the model to fill in monitor/lens data")
    p.set_defaults(func=cmd_report)
