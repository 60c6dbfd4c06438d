"""``persona-harness runs`` (the run history) and ``persona-harness diff RUN_A RUN_B``.

Every ``persona-harness run`` writes a new folder ``RUNS_DIR/<model>/<trait>/<run-id>/`` and points
the trait folder's ``latest`` file at it (``harness.core.runs``); ``--out DIR`` writes exactly DIR.
"""

from __future__ import annotations

import json
from typing import Any


def _runs_dir(args) -> str:
    if args.runs_dir:
        return args.runs_dir
    from harness.core.config import load_settings

    return load_settings({}).runs_dir or "runs"  # PERSONA_HARNESS_RUNS_DIR or the config file's runs_dir


def cmd_runs(args) -> int:
    from harness.core.pipeline import slug
    from harness.core.runs import list_runs

    root = _runs_dir(args)
    rows = [r.row() for r in list_runs(root, model=slug(args.model) if args.model else None, trait=args.trait)]
    if args.json:
        print(json.dumps({"runs_dir": root, "runs": rows}, indent=2))
        return 0
    if not rows:
        print(f"no runs under {root}/ (persona-harness run --trait NAME writes one)")
        return 0

    def f(x: Any) -> str:
        return "-" if x is None else str(x)

    table = [("model", "trait", "run", "status", "created", "pairs", "peak", "path")]
    for r in rows:
        pairs = "-" if r["pairs_kept"] is None else f"{r['pairs_kept']}/{f(r['pairs_candidates'])}"
        table.append((r["model"], r["trait"], r["run_id"] + (" (latest)" if r["latest"] else ""), f(r["status"]),
                      f(r["created"]), pairs, f(r["peak_layer"]), r["path"]))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def cmd_diff(args) -> int:
    from harness.analysis.rundiff import diff_runs, format_diff

    d = diff_runs(args.run_a, args.run_b)
    print(json.dumps(d, indent=2, default=str) if args.json else format_diff(d))
    return 0


def register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("runs", help="list the run history (RUNS_DIR/<model>/<trait>/<run-id>)")
    p.add_argument("--runs-dir", default=None, help="run history folder (default: the runs_dir setting, runs)")
    p.add_argument("--model", default=None, help="only this model's runs")
    p.add_argument("--trait", default=None, help="only this trait's runs")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_runs)

    p = subparsers.add_parser("diff", help="compare two runs: per-layer vector cosine, scores, pairs, metrics, "
                                           "settings that differ")
    p.add_argument("run_a", metavar="RUN_A", help="run folder (or a trait folder / its 'latest' file: the latest run)")
    p.add_argument("run_b", metavar="RUN_B", help="the run to compare with RUN_A (deltas are B - A)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_diff)
