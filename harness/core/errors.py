"""Errors with messages that say what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib


class NonFiniteActivationError(ValueError):
    """A forward produced NaN or inf activations (no vector is written)."""


class HarnessError(Exception):
    """Base class for every error persona-harness raises on purpose."""


class TraitFileError(HarnessError):
    """A trait file is malformed. The message names the file, the field and the fix."""

    def __init__(self, path: str, field: str, problem: str, fix: str):
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        super().__init__(f"{self.path}: field '{field}': {problem}. Fix: {fix}")


class UnknownComponentError(HarnessError, KeyError):
    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class NoEffectivePairsError(HarnessError):
    """The filter kept zero pairs: a vector would be NaN, so the run stops here."""


class ConfigError(HarnessError):
    """A setting has a bad value."""
