"""``persona-harness export RUN_DIR --format gguf|steering-vectors|repeng|pt``: a run's vector for
llama.cpp / ollama, steering-vectors, repeng or plain torch (``harness.analysis.export`` has the
formats and the layer-index conversion). ``persona-harness steer RUN_DIR --vector FILE`` reads any
of them back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError


def _layers(spec: str, num_layers: int, run_dir: Path, fmt: str) -> list[int]:
    if spec == "all":
        return list(range(2 if fmt in ("gguf", "repeng") else 1, num_layers))  # every steerable inner layer
    if spec:
        try:
            return [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise HarnessError(f"--layer {spec!r} is not a comma list of layer numbers or 'all'") from None
    from harness.analysis.layers import recommend_for_run

    rec = recommend_for_run(run_dir, write=False).get("layer")
    if rec is None:
        raise HarnessError(f"{run_dir}: no recommended layer. Fix: give --layer L")
    return [int(rec)]


def cmd_export(args) -> int:
    from harness.analysis.export import SUFFIX, export_vector
    from harness.core.artifacts import load_vectors
    from harness.core.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run_dir)
    rj, vf = run_dir / "run.json", run_dir / "vectors.safetensors"
    if not rj.is_file():
        raise HarnessError(f"{run_dir}: no run.json, not a run directory. Fix: give a folder 'persona-harness run' wrote "
                           "(or its trait folder, for the latest run)")
    if not vf.is_file():
        raise HarnessError(f"{vf} is missing: this run extracted no vector (see its run.json status)")
    header = json.loads(rj.read_text(encoding="utf-8"))
    vs = load_vectors(vf)
    if args.method not in vs.tensors:
        raise HarnessError(f"{vf} has no {args.method!r} (has {', '.join(sorted(vs.tensors))})")
    v = vs.tensors[args.method]
    n = v.shape[0] - 1
    layers = [] if args.format == "pt" else _layers(args.layer, n, run_dir, args.format)
    trait = (header.get("trait") or {}).get("name") or vs.trait or "vector"
    tag = "" if args.format == "pt" else "-L" + "_".join(str(L) for L in layers) if len(layers) <= 4 else "-Lmulti"
    out = Path(args.output) if args.output else run_dir / "export" / f"{trait}-{args.method}{tag}{SUFFIX[args.format]}"
    model = header.get("model") or {}
    meta = {"trait": trait, "method": args.method, "model": model.get("id"), "run": str(run_dir),
            "layer_convention": "direction.k = output of decoder block k = hidden_states[k + 1]"}
    export_vector(v, args.format, out, layers=layers, coef=args.coef, model_class=model.get("class"), meta=meta)
    if args.format == "pt":
        print(f"wrote {out}: tensor [{n + 1}, {v.shape[1]}] (hidden_states index), method {args.method}")
    else:
        blocks = ", ".join(f"hidden_states[{L}] -> block {L - 1}" for L in layers[:6]) + (" ..." if len(layers) > 6 else "")
        print(f"wrote {out}: {args.format}, coef {args.coef:g}, {blocks}")
    if args.format == "gguf":
        print(f"  llama.cpp: llama-cli -m MODEL.gguf --control-vector-scaled {out} 1.0   (added at every position)",
              file=sys.stderr)
    return 0


def register_commands(subparsers: Any) -> None:
    from harness.analysis.export import FORMATS

    p = subparsers.add_parser("export", help="write a run's vector for llama.cpp/ollama (gguf), steering-vectors, "
                                             "repeng or torch (pt)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (or its trait folder: the latest run)")
    p.add_argument("--format", required=True, choices=FORMATS, help="gguf: llama.cpp --control-vector; repeng: "
                   "ControlVector.import_gguf; steering-vectors: SteeringVector(**torch.load(f)); pt: the whole tensor")
    p.add_argument("--method", default="response_avg_diff", help="vector method (default response_avg_diff)")
    p.add_argument("--layer", default="", help="hidden_states index L (comma list, or 'all'; default: the recommended "
                                               "layer); written as block L-1 (llama.cpp direction.{L-1})")
    p.add_argument("--coef", type=float, default=1.0, help="scale written into the file (default 1)")
    p.add_argument("--output", "-o", default=None,
                   help="file to write (default RUN_DIR/export/<trait>-<method>-L<L> with .gguf, .repeng.gguf, "
                        ".steering-vectors.pt or .pt)")
    p.set_defaults(func=cmd_export)
