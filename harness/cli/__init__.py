"""The ``persona-harness`` command line: ``main`` parses, the sub-command modules do the work.

``main`` (the parser and the run/traits/plugins/validate/profiles commands), ``options`` (settings
flags, generated from the ``Settings`` fields), ``author`` (new-trait), ``reference`` and ``vectors``
(steer, sweep, monitor, layers, lens, sae, report). Plugins add sub-commands with
``harness_register_commands``.
"""

from __future__ import annotations

from harness.cli.main import main

__all__ = ["main"]
