"""persona-harness: extract and check persona vectors with a pluggy core.

Importing ``harness`` is light: torch, transformers and instructor load only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from harness.core.hookspecs import hookimpl, hookspec  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "hookspec", "get_plugin_manager", "load_settings", "Settings", "run_trait",
    "load_trait", "TraitSpec", "Generation", "GenerationRequest", "Judgment", "JudgeItem", "Selection", "VectorSet",
]

_LAZY = {
    "get_plugin_manager": ("core.plugins", "get_plugin_manager"),
    "load_settings": ("core.config", "load_settings"),
    "Settings": ("core.config", "Settings"),
    "run_trait": ("core.pipeline", "run_trait"),
    "TraitSpec": ("core.records", "TraitSpec"),
    "Generation": ("core.records", "Generation"),
    "GenerationRequest": ("core.records", "GenerationRequest"),
    "Judgment": ("core.records", "Judgment"),
    "JudgeItem": ("core.records", "JudgeItem"),
    "Selection": ("core.records", "Selection"),
    "VectorSet": ("core.records", "VectorSet"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"harness.{mod}"), attr)
    if name == "load_trait":
        return load_trait
    raise AttributeError(name)


def load_trait(name_or_path: str, settings=None, pm=None):
    """Load a trait by name (through the trait-source hooks) or from a file/folder path."""
    import os

    from harness.core.config import Settings
    from harness.core.plugins import get_plugin_manager, lookup_trait

    if os.path.exists(name_or_path):
        from harness.core.traits import load_trait_path

        return load_trait_path(name_or_path)
    return lookup_trait(pm or get_plugin_manager(), name_or_path, settings or Settings())
