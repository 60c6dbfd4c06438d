"""Hook specifications for persona-harness plugins.

Every hook is documented in docs/plugin_hooks.md (a test keeps the two in step).
Single-answer hooks are ``firstresult``; the built-in implementations of those are
``trylast``, so any third-party plugin wins whatever the registration order.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from harness.core.config import Settings
    from harness.core.pipeline import RunContext
    from harness.core.records import TraitSpec
    from harness.models.loading import LoadedModel

#: what ``harness_register_<kind>s`` hooks receive: ``register(name, factory, description="")``, where
#: ``factory(settings)`` returns an object satisfying the kind's protocol in ``harness.core.protocols``
Register = Callable[..., None]

PROJECT = "persona_harness"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- trait sources ---------------------------------------------------------------
@hookspec
def harness_list_traits(settings: Settings) -> list[str] | None:
    """Names of the traits this plugin can load (all plugins' answers are merged)."""


@hookspec(firstresult=True)
def harness_load_trait(name: str, settings: Settings) -> TraitSpec | None:
    """Return the ``TraitSpec`` for ``name``, or None when this plugin does not know it."""


# -- component registration: each plugin registers named factories ------------------
@hookspec
def harness_register_generators(register: Register) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> a ``Generator``
    (``harness.core.protocols.Generator``; subclass ``BaseGenerator`` for the defaults)."""


@hookspec
def harness_register_judges(register: Register) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> a ``Judge``
    (``harness.core.protocols.Judge``; subclass ``BaseJudge`` for the defaults)."""


@hookspec
def harness_register_filters(register: Register) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> a ``Filter``
    (``harness.core.protocols.Filter``; subclass ``BaseFilter`` for the defaults)."""


@hookspec
def harness_register_extractors(register: Register) -> None:
    """Call ``register(name, factory, description=...)``; ``factory(settings)`` -> a ``Extractor``
    (``harness.core.protocols.Extractor``; subclass ``BaseExtractor`` for the defaults)."""


# -- shared resources --------------------------------------------------------------
@hookspec(firstresult=True)
def harness_load_model(model_id: str, settings: Settings) -> LoadedModel | None:
    """Return a ``LoadedModel`` (model + tokenizer) for ``model_id``, or None."""


# -- command line ------------------------------------------------------------------
@hookspec
def harness_register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``persona-harness`` CLI (an argparse subparsers object).

    Set ``func`` with ``parser.set_defaults(func=callable(args) -> int)``.
    """


# -- observers: every implementation is called; return values are ignored ----------
@hookspec
def harness_run_started(run: RunContext) -> None:
    """A trait run started; ``run`` is the ``RunContext`` (settings, trait, run_dir)."""


@hookspec
def harness_stage_finished(run: RunContext, stage: str, records: list) -> None:
    """A stage (generate, judge, filter, extract) finished with these records."""


@hookspec
def harness_run_finished(run: RunContext, summary: dict) -> None:
    """A trait run finished; ``summary`` is what run.json holds under ``summary``."""
