"""``persona-harness new-trait NAME --description "..."``: write a trait's files with an LLM.

The model is any OpenAI-compatible server, configured like the judges (``--judge-base-url``,
``--judge-model``, ``--judge-api-key-env``, ``--judge-mode``, ``--judge-retries``). See
``harness.authoring`` for what is asked, how it is validated and what is written.
"""

from __future__ import annotations

import sys



def cmd_new_trait(args) -> int:
    from harness.authoring import new_trait
    from harness.cli.options import settings_from_args

    s = settings_from_args(args)
    paths = new_trait(args.name, args.description, s, directory=args.dir, force=args.force, n_pairs=args.pairs,
                      n_questions=args.questions)
    for p in paths.values():
        print(f"wrote {p}")
    print(f"check it with: persona-harness validate {paths['extract.json'].parent}", file=sys.stderr)
    return 0


def register_commands(subparsers):
    from harness.cli.options import add_settings_arguments

    p = subparsers.add_parser(
        "new-trait", help="write a new trait's instruction pairs, questions and rubric with an LLM",
        description="Ask an OpenAI-compatible model (the judge server settings) for a trait's files, validate "
                    "them and write <dir>/<NAME>/extract.json, eval.json and provenance.json.")
    p.add_argument("name", help="trait name (letters, digits, '_', '-', '.')")
    p.add_argument("--description", required=True, help="one sentence describing the trait")
    p.add_argument("--dir", default="traits", help="traits folder to write into (default ./traits)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--pairs", type=int, default=5, help="instruction pairs (the method uses 5)")
    p.add_argument("--questions", type=int, default=40, help="questions in all, split half/half (the method uses 40)")
    add_settings_arguments(p)
    p.set_defaults(func=cmd_new_trait)
