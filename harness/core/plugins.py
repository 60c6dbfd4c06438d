"""Plugin manager factory and component registries (llm / datasette style).

``get_plugin_manager()`` builds a fresh manager each call (no global state), registers the
built-in plugin modules of ``DEFAULT_PLUGINS`` under their dotted names, then loads
third-party plugins from the ``persona_harness`` entry-point group and from any module named
explicitly (``--plugin module`` / ``PERSONA_HARNESS_PLUGINS``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from harness.core import hookspecs
from harness.core.errors import HarnessError, UnknownComponentError

ENTRY_POINT_GROUP = "persona_harness"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "harness_plugins.traits_json",
    "harness_plugins.model_hf",
    "harness_plugins.generate_hf",
    "harness_plugins.generate_fast",
    "harness_plugins.judge_local",
    "harness_plugins.judge_openai",
    "harness_plugins.filter_threshold",
    "harness_plugins.extract_mean_diff",
    "harness_plugins.extract_fast",
)


def get_plugin_manager(
    *,
    entrypoints: bool = True,
    modules: Iterable[str] = (),
    builtins: bool = True,
) -> pluggy.PluginManager:
    """Return a new plugin manager with the built-ins and third-party plugins registered.

    ``entrypoints=False`` skips the entry-point group (tests); ``PERSONA_HARNESS_LOAD_PLUGINS``
    set to a comma-separated list of entry-point names loads only those.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if builtins:
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
    if entrypoints:
        only = os.environ.get("PERSONA_HARNESS_LOAD_PLUGINS")
        if only is not None:
            for ep_name in [n.strip() for n in only.split(",") if n.strip()]:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep_name)
        else:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    env_modules = [m for m in os.environ.get("PERSONA_HARNESS_PLUGINS", "").split(",") if m.strip()]
    for mod in [*env_modules, *modules]:
        mod = mod.strip()
        if pm.get_plugin(mod) is None:
            try:
                pm.register(importlib.import_module(mod), name=mod)
            except ImportError as e:
                raise HarnessError(f"--plugin {mod!r}: cannot import it ({e}). Fix: install it or check the module name") from e
    pm.check_pending()
    if os.environ.get("PERSONA_HARNESS_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: print(s, end="", file=__import__("sys").stderr))
        pm.enable_tracing()
    return pm


@dataclass
class Component:
    name: str
    factory: Callable[[Any], Any]
    plugin: str
    description: str = ""


@dataclass
class Registry:
    """Named component factories of one kind, built from a ``harness_register_*`` hook."""

    kind: str
    components: dict[str, Component] = field(default_factory=dict)

    def get(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, list(self.components)) from None

    def create(self, name: str, settings: Any) -> Any:
        """Build the component and check it against its kind's protocol (``harness.core.protocols``)."""
        from harness.core.protocols import check_component

        comp = self.get(name)
        obj = comp.factory(settings)
        choice = getattr(obj, "choice", None)
        if isinstance(choice, dict) and choice.get("setting") == name and choice.get("chosen") not in (None, name) \
                and choice["chosen"] in self.components:
            # a chooser (``auto``): the component it chose, as registered (a plugin's override included)
            obj = self.create(choice["chosen"], settings)
            obj.choice = dict(choice)
            return obj
        if not getattr(obj, "name", None):
            try:
                obj.name = name
            except AttributeError:
                pass
        return check_component(self.kind, name, comp.plugin, obj)

    def names(self) -> list[str]:
        return sorted(self.components)


def build_registry(pm: pluggy.PluginManager, kind: str) -> Registry:
    """Collect ``harness_register_<kind>s`` registrations; later plugins may not reuse names."""
    reg = Registry(kind)
    hook = getattr(pm.hook, f"harness_register_{kind}s")
    # Call each implementation separately so we know which plugin registered what.
    for impl in reversed(hook.get_hookimpls()):
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(name: str, factory: Callable[[Any], Any], *, description: str = "", _p=plugin_name) -> None:
            if name in reg.components and reg.components[name].plugin != _p:
                prev = reg.components[name].plugin
                # third-party (registered later, non-trylast) overrides a built-in of the same name
                if prev.startswith("harness_plugins."):
                    pass
                elif not _p.startswith("harness_plugins."):
                    raise HarnessError(
                        f"{kind} {name!r} is registered by both {prev} and {_p}. Fix: rename one, or block one "
                        "with PERSONA_HARNESS_LOAD_PLUGINS"
                    )
                else:
                    return  # a built-in never replaces a third-party component
            reg.components[name] = Component(name, factory, _p, description)

        impl.function(register=register)
    return reg


def plugin_info(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, version and hooks of every registered plugin (for ``persona-harness plugins``)."""
    dists = {id(p): d for p, d in pm.list_plugin_distinfo()}
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist = dists.get(id(plugin))
        if dist is not None:
            version = dist.version
            project = dist.project_name
        else:
            from harness import __version__

            version, project = (__version__, "persona-harness") if name.startswith("harness_plugins.") else ("", "")
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        out.append({"name": name, "distribution": project, "version": version, "hooks": hooks})
    return sorted(out, key=lambda d: d["name"])


def known_traits(pm: pluggy.PluginManager, settings: Any) -> list[str]:
    """Every trait name the trait sources list (merged, sorted)."""
    return sorted({n for ns in pm.hook.harness_list_traits(settings=settings) for n in (ns or [])})


def lookup_trait(pm: pluggy.PluginManager, name: str, settings: Any) -> Any:
    """The ``TraitSpec`` for ``name`` from the trait sources; an unknown name is an
    ``UnknownComponentError`` listing the known traits (with a did-you-mean)."""
    spec = pm.hook.harness_load_trait(name=name, settings=settings)
    if spec is None:
        raise UnknownComponentError("trait", name, known_traits(pm, settings))
    return spec
