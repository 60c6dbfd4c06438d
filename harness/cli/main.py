"""``persona-harness`` command line. Plugins add sub-commands with ``harness_register_commands``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

from harness import __version__
from harness.cli.options import add_settings_arguments, settings_from_args
from harness.core.errors import HarnessError

#: modules of the built-in sub-commands beyond run/traits/plugins/validate (each has register_commands)
BUILTIN_COMMANDS = ("harness.cli.author", "harness.cli.reference", "harness.cli.vectors", "harness.cli.runs",
                    "harness.cli.export")


def _pm(settings):
    from harness.core.plugins import get_plugin_manager

    return get_plugin_manager(modules=settings.plugins)


def cmd_run(args) -> int:
    from pathlib import Path

    from harness.core.pipeline import run_trait

    s = settings_from_args(args)
    pm = _pm(s)
    traits = list(args.trait or [])
    if s.trait_files and traits:
        from harness.core.traits import trait_name_for

        unused = [f for f in s.trait_files if trait_name_for(Path(f)) not in traits]
        if unused:
            names = ", ".join(f"{f} (trait {trait_name_for(Path(f))!r})" for f in unused)
            print(f"error: --trait-file {names} is not one of --trait {' '.join(traits)}; it would be ignored. "
                  "Fix: drop --trait to run the files, or name their traits with --trait", file=sys.stderr)
            return 2
    if s.trait_files and not traits:
        from harness.core.traits import load_trait_path

        traits = [load_trait_path(f) for f in s.trait_files]  # type: ignore[misc]
    if not traits:
        print("error: give --trait NAME or --trait-file PATH (see 'persona-harness traits')", file=sys.stderr)
        return 2
    names = [t if isinstance(t, str) else t.name for t in traits]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        print(f"error: trait {twice[0]!r} is named twice (--trait / --trait-file); one run folder per trait. "
              "Fix: name each trait once (rename one of the trait folders)", file=sys.stderr)
        return 2
    outs = [Path(s.out_dir) / n if len(traits) > 1 else Path(s.out_dir) for n in names] if s.out_dir else []
    for n, out in zip(names, outs):  # --out DIR holds one trait's run: never another trait's records
        held = _run_trait_name(out)
        if held is not None and held != n:
            print(f"error: {out} holds a run of trait {held!r}; this run is of trait {n!r} and would mix their "
                  "records. Fix: give another --out folder, or delete that run first", file=sys.stderr)
            return 2
    results = []
    for i, t in enumerate(traits):
        s2 = s.replace(out_dir=str(outs[i])) if outs else s  # each trait of a multi-trait run: --out DIR/<trait>
        res = run_trait(t, s2, pm=pm)
        results.append(res)
        print_summary(res.summary, res.run_dir, json_out=args.json)
    return 0


def _run_trait_name(run_dir) -> str | None:
    """The trait of the run already in ``run_dir`` (None: no readable run.json there)."""
    from harness.core.artifacts import read_json_file

    rj = run_dir / "run.json"
    if not rj.is_file():
        return None
    try:
        name = (read_json_file(rj, what="run.json").get("trait") or {}).get("name")
    except (HarnessError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def print_summary(summary: dict, run_dir, *, json_out: bool = False) -> None:
    if json_out:
        print(json.dumps(summary, indent=2, default=str))
        return

    def f(x):
        return "n/a" if x is None else f"{x:.1f}"

    print(f"\n== {summary['trait']} on {summary['model']} (profile: {summary.get('profile')}) ==")
    if summary.get("profile_set"):
        print("profile set     " + ", ".join(f"{k}={v}" for k, v in summary["profile_set"].items()))
    for kind, c in ((summary.get("components") or {}).get("choices") or {}).items():
        print(f"{kind:16s}{c['chosen']} ({c['setting']}: {c['reason']})")
    print(f"generations: {summary.get('generations')}  (empty responses: {summary.get('empty_responses', 0)})")
    if "trait_pos_mean" in summary:
        print(f"trait score     pos {f(summary['trait_pos_mean'])}  neg {f(summary['trait_neg_mean'])}  "
              f"gap {f((summary['trait_pos_mean'] or 0) - (summary['trait_neg_mean'] or 0))}")
        print(f"coherence       pos {f(summary['coherence_pos_mean'])}  neg {f(summary['coherence_neg_mean'])}")
        if summary.get("unscored"):
            print(f"unscored        {summary['unscored']}")
    if "pairs_kept" in summary:
        print(f"effective pairs {summary['pairs_kept']} of {summary['pairs_candidates']}; dropped: {summary['dropped'] or 'none'}")
    if "norm_peak" in summary:
        np_ = summary["norm_peak"]
        print(f"norm peak       layer {np_['peak_layer']} of {np_['num_layers']} (relative depth {np_['relative_depth']:.2f}; "
              f"index {np_['final_norm_index']} is after the final norm)")
    print(f"run directory   {run_dir}")
    for name, path in (summary.get("files") or {}).items():
        print(f"  {name:22s}{path}")


def cmd_traits(args) -> int:
    from harness.core.plugins import known_traits

    s = settings_from_args(args)
    pm = _pm(s)
    names = known_traits(pm, s)
    for n in names:
        spec = pm.hook.harness_load_trait(name=n, settings=s)
        if args.verbose and spec is not None:
            print(f"{n}\t{len(spec.instructions)} pairs\t{len(spec.questions)} extract\t{len(spec.eval_questions)} eval\t{spec.source}")
        else:
            print(n)
    return 0


def cmd_plugins(args) -> int:
    from harness.core.plugins import build_registry, plugin_info

    s = settings_from_args(args)
    pm = _pm(s)
    info = plugin_info(pm)
    regs = {k: build_registry(pm, k) for k in ("generator", "judge", "filter", "extractor")}
    if args.json:
        print(json.dumps({"plugins": info, "components": {k: {n: c.plugin for n, c in r.components.items()}
                                                          for k, r in regs.items()}}, indent=2))
        return 0
    for p in info:
        print(f"{p['name']}  {p['distribution']} {p['version']}  hooks: {', '.join(p['hooks'])}")
    for k, r in regs.items():
        for n, c in sorted(r.components.items()):
            print(f"  {k:9s} {n:18s} {c.plugin}  {c.description}")
    return 0


def cmd_validate(args) -> int:
    from harness.core.traits import PAPER_PAIRS, PAPER_QUESTIONS, load_trait_path

    bad = 0
    for path in args.paths:
        try:
            spec = load_trait_path(path)
        except HarnessError as e:
            print(f"INVALID {e}", file=sys.stderr)
            bad += 1
            continue
        notes = []
        if len(spec.instructions) != PAPER_PAIRS:
            notes.append(f"{len(spec.instructions)} instruction pairs (the method uses {PAPER_PAIRS})")
        if len(spec.questions) != PAPER_QUESTIONS:
            notes.append(f"{len(spec.questions)} extraction questions (the method uses {PAPER_QUESTIONS})")
        if spec.eval_source and len(spec.eval_questions) != PAPER_QUESTIONS:
            notes.append(f"{len(spec.eval_questions)} evaluation questions (the method uses {PAPER_QUESTIONS})")
        print(f"OK {path}: trait {spec.name!r}, {len(spec.instructions)} pairs, {len(spec.questions)} extract"
              f" + {len(spec.eval_questions)} eval questions" + (f"; note: {'; '.join(notes)}" if notes else ""))
    return 1 if bad else 0


def cmd_profiles(args) -> int:
    from harness.core.config import MODEL_PROFILES, PAPER_LAYERS, PAPER_SERVER_JUDGE, PROFILES

    if args.json:
        print(json.dumps({"profiles": PROFILES, "model_profiles": MODEL_PROFILES, "paper_layers": PAPER_LAYERS,
                          "paper_server_judge": PAPER_SERVER_JUDGE}, indent=2))
        return 0
    for name, values in PROFILES.items():
        models = [m for m, p in MODEL_PROFILES.items() if p == name]
        print(f"{name}" + (f"  (auto for: {', '.join(models)})" if models else ""))
        for k, v in values.items():
            print(f"  {k} = {v}")
        if name == "paper":
            print(f"  judge = {PAPER_SERVER_JUDGE}  (when --judge-base-url is given)")
            for m, layer in PAPER_LAYERS.items():
                print(f"  layer = {layer}  (for {m})")
        if not values:
            print("  (nothing: the settings' defaults)")
    return 0


def build_parser(pm=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="persona-harness", description="Extract and check persona vectors.")
    p.add_argument("--version", action="version", version=f"persona-harness {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="run trait -> generate -> judge -> filter -> extract", allow_abbrev=False)
    r.add_argument("--trait", action="append", help="trait name (repeatable)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_settings_arguments(r)
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("traits", help="list the traits the trait sources know")
    t.add_argument("-v", "--verbose", action="store_true")
    add_settings_arguments(t)
    t.set_defaults(func=cmd_traits)
    pl = sub.add_parser("plugins", help="list plugins, versions and components")
    pl.add_argument("--json", action="store_true")
    add_settings_arguments(pl)
    pl.set_defaults(func=cmd_plugins)
    pr = sub.add_parser("profiles", help="list the settings profiles and the values each sets")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profiles)
    v = sub.add_parser("validate", help="check trait files or folders")
    v.add_argument("paths", nargs="+")
    v.set_defaults(func=cmd_validate)
    for name in BUILTIN_COMMANDS:
        importlib.import_module(name).register_commands(sub)
    if pm is not None:
        pm.hook.harness_register_commands(subparsers=sub)
    return p


def plugin_args(argv: Sequence[str]) -> list[str]:
    """The modules named by ``--plugin MODULE`` / ``--plugin=MODULE`` in ``argv``."""
    mods = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugin"]
    return mods + [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]


def import_plugin_modules(mods: Sequence[str]) -> None:
    """Import the ``--plugin`` modules: as installed first; a module that is not installed is then
    looked for in the current directory (``python -m``-style), so ``persona-harness ... --plugin
    my_plugin`` works next to ``my_plugin.py`` without ``PYTHONPATH=.``. The current directory is
    on ``sys.path`` only while these imports run, and only for ``--plugin`` modules (not for
    ``PERSONA_HARNESS_PLUGINS`` or a config file's ``plugins``)."""
    import importlib
    import os

    for mod in (m.strip() for m in mods):
        if not mod:
            continue
        try:
            importlib.import_module(mod)
            continue
        except ModuleNotFoundError as e:
            if not (e.name and (mod == e.name or mod.startswith(e.name + "."))):  # it is there but needs more
                raise HarnessError(f"--plugin {mod!r}: cannot import it ({e}). Fix: install what it needs") from e
        except ImportError as e:
            raise HarnessError(f"--plugin {mod!r}: cannot import it ({e}). Fix: install it or check the module name") from e
        cwd = os.getcwd()
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise HarnessError(
                f"--plugin {mod!r}: cannot import it ({e}); looked in the installed packages and in the current "
                f"directory {cwd}. Fix: install it, run from the folder that holds {mod.split('.')[0]}.py, "
                "or check the module name") from e
        finally:
            try:
                sys.path.remove(cwd)
            except ValueError:  # pragma: no cover - the plugin removed it itself
                pass


def main(argv: Sequence[str] | None = None) -> int:
    from harness.core.plugins import get_plugin_manager
    from harness.core.locks import run_lock_scope
    from harness.core.redact import install_log_redaction, redact

    install_log_redaction()  # every log line passes through redact() (the judge API key, credential headers)

    argv = list(sys.argv[1:] if argv is None else argv)
    # --plugin modules must be known before parsing so their commands exist
    mods = plugin_args(argv)
    try:
        import_plugin_modules(mods)
        pm = get_plugin_manager(modules=mods)
        parser = build_parser(pm)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(run_lock_scope(args.func)(args) or 0)  # run folders the command locked are released after it
    except HarnessError as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished records are in the cache and a rerun resumes", file=sys.stderr)
        return 130
    except OSError as e:  # a file-system problem the code did not name itself
        from harness.core.artifacts import os_error_message

        print(f"error: {redact(os_error_message(e.filename or '(file)', e, 'cannot use it'))}", file=sys.stderr)
        return 1
    except Exception:  # a bug: the traceback helps, the API key must not be in it
        import traceback

        sys.stderr.write(redact(traceback.format_exc()))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
