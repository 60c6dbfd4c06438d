"""Hook specifications for persona-harness plugins.

Every hook is documented in docs/plugin_hooks.md (a test keeps the two in step).
Single-answer hooks are ``firstresult``; the built-in implementations of those are
``trylast``, so any third-party plugin wins whatever the registration order.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "persona_harness"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- trait sources ---------------------------------------------------------------
@hookspec
def harness_list_traits(settings: Any) -> list[str] | None:
    """Names of the traits this plugin can load (all plugins' answers are merged)."""


@hookspec(firstresult=True)
def harness_load_trait(name: str, settings: Any) -> Any:
    """Return the ``TraitSpec`` for ``name``, or None when this plugin does not know it."""


# -- component registration: each plugin registers named factories ------------------
@hookspec
def harness_register_generators(register: Any) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> Generator."""


@hookspec
def harness_register_judges(register: Any) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> Judge."""


@hookspec
def harness_register_filters(register: Any) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> Filter."""


@hookspec
def harness_register_extractors(register: Any) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> Extractor."""


# -- shared resources --------------------------------------------------------------
@hookspec(firstresult=True)
def harness_load_model(model_id: str, settings: Any) -> Any:
    """Return a ``LoadedModel`` (model + tokenizer) for ``model_id``, or None."""


# -- command line ------------------------------------------------------------------
@hookspec
def harness_register_commands(subparsers: Any) -> None:
    """Add sub-commands to the ``persona-harness`` CLI (an argparse subparsers object).

    Set ``func`` with ``parser.set_defaults(func=callable(args) -> int)``.
    """


# -- observers: every implementation is called; return values are ignored ----------
@hookspec
def harness_run_started(run: Any) -> None:
    """A trait run started; ``run`` is the ``RunContext`` (settings, trait, run_dir)."""


@hookspec
def harness_stage_finished(run: Any, stage: str, records: list) -> None:
    """A stage (generate, judge, filter, extract) finished with these records."""


@hookspec
def harness_run_finished(run: Any, summary: dict) -> None:
    """A trait run finished; ``summary`` is what run.json holds under ``summary``."""
