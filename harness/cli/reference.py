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
    from harness.core.pipeline import run_trait, slug
    from harness.core.plugins import get_plugin_manager

    s = settings_from_args(args)
    pm = get_plugin_manager(modules=s.plugins)
    for name in args.trait:
        s2 = s if s.out_dir else s.replace(out_dir=str(Path("runs") / slug(s.model) / name))
        spec = pm.hook.harness_load_trait(name=name, settings=s2)
        if spec is None:
            known = sorted({n for ns in pm.hook.harness_list_traits(settings=s2) for n in (ns or [])})
            print(f"error: unknown trait {name!r}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        res = run_trait(spec, s2, pm=pm, splits=("extract",))
        src = Path(spec.source)
        trait_dir = src.parent if src.name == "extract.json" else src.parent / spec.name
        path = Path(args.output) if args.output else reference_path(trait_dir, s2.model)
        assert res.vectors is not None
        save_reference(path, res.vectors, s2, spec, res.selection)
        print(f"{name}: wrote reference for model {s2.model} ({len(res.selection.pairs) if res.selection else '?'} "
              f"effective pairs) to {path}")
    return 0


def register_commands(subparsers):
    from harness.cli.options import add_settings_arguments

    p = subparsers.add_parser("reference", help="write the reference vector used by the acceptance regression check")
    p.add_argument("--trait", action="append", required=True, help="trait name (repeatable)")
    p.add_argument("--output", default=None, help="file to write (default traits/<name>/reference/<model>.safetensors)")
    add_settings_arguments(p)
    p.set_defaults(func=cmd_reference)
