"""``persona-harness reference --trait NAME``: write the regression-check reference vector.

Runs the pipeline on the extraction split with the given settings (cached generations and
judgments are reused, so after ``pytest traits/ --trait NAME`` it only recomputes activations)
and writes ``traits/<name>/reference/<model-slug>.safetensors``, which the acceptance check
``test_reference_cosine`` compares new vectors with.
"""

from __future__ import annotations

import sys
from pathlib import Path



def cmd_reference(args) -> int:
    from harness.analysis.checks import reference_path, save_reference
    from harness.cli.options import settings_from_args
    from harness.core.artifacts import refuse_fewer
    from harness.core.pipeline import run_trait
    from harness.core.errors import UnknownComponentError
    from harness.core.plugins import get_plugin_manager, lookup_trait

    s = settings_from_args(args)
    pm = get_plugin_manager(modules=s.plugins)
    if len(args.trait) > 1 and args.output:
        print("error: --output names one file, but several --trait were given. Fix: run one trait per --output, "
              "or drop --output (each trait's reference goes to its own folder)", file=sys.stderr)
        return 2
    if len(set(args.trait)) != len(args.trait):
        print("error: a trait is named twice. Fix: name each --trait once", file=sys.stderr)
        return 2
    for name in args.trait:
        # a new run folder in the run history (RUNS_DIR/<model>/<trait>/<run-id>), or exactly --out
        # (--out DIR/<trait> when several traits share one --out)
        s2 = s.replace(out_dir=str(Path(s.out_dir) / name)) if s.out_dir and len(args.trait) > 1 else s
        try:
            spec = lookup_trait(pm, name, s2)
        except UnknownComponentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        res = run_trait(spec, s2, pm=pm, splits=("extract",))
        src = Path(spec.source)
        trait_dir = src.parent if src.name == "extract.json" else src.parent / spec.name
        path = Path(args.output) if args.output else reference_path(trait_dir, s2.model)
        assert res.vectors is not None
        new_pairs = len(res.selection.pairs) if res.selection else res.vectors.n_pos
        refuse_fewer(path, new_pairs, _reference_pairs(path), force=args.force, unit="effective pairs")
        save_reference(path, res.vectors, s2, spec, res.selection)
        print(f"{name}: wrote reference for model {s2.model} ({len(res.selection.pairs) if res.selection else '?'} "
              f"effective pairs) to {path}")
    return 0


def _reference_pairs(path: Path) -> int | None:
    """Effective pairs behind an existing reference (None: no readable reference there)."""
    import json

    from harness.core.artifacts import load_vectors
    from harness.core.errors import HarnessError

    if not path.is_file():
        return None
    try:
        return int(json.loads(load_vectors(path).metadata.get("pairs", "0")))
    except (HarnessError, ValueError, TypeError):
        return None


def register_commands(subparsers):
    from harness.cli.options import add_settings_arguments

    p = subparsers.add_parser("reference", help="write the reference vector used by the acceptance regression check")
    p.add_argument("--trait", action="append", required=True, help="trait name (repeatable)")
    p.add_argument("--output", default=None, help="file to write (default traits/<name>/reference/<model>.safetensors)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing reference even when the new one rests on fewer effective pairs")
    add_settings_arguments(p)
    p.set_defaults(func=cmd_reference)
