"""pytest plugin (entry point ``pytest11``): options for ``pytest traits/ --trait NAME``.

Kept import-light: nothing heavy is imported at pytest start.
"""

from __future__ import annotations


def pytest_addoption(parser):
    g = parser.getgroup("persona-harness")
    g.addoption("--trait", action="append", default=[], help="trait to check (repeatable)")
