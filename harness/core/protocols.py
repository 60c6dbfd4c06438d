"""The shape of every pipeline component, as ``typing.Protocol`` classes.

A component is what a ``register(name, factory)`` call's factory returns for some settings. All of
them share one shape: a ``name``, ``config()`` (the settings that change the component's output: they
enter the cache keys) and one work method; the batching components also say their
``batch_size(ctx)``. The ``Base*`` classes give the common defaults, so a plugin usually defines only
its work method. ``check_component`` is what the registries run on every product: a factory whose
object lacks a member is an error naming the plugin and the member.

A trait source is a pair of hooks rather than an object (``harness_list_traits``,
``harness_load_trait``); ``TraitSource`` states that pair for type checkers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from harness.core.errors import HarnessError

if TYPE_CHECKING:  # pragma: no cover
    from harness.core.records import Generation, GenerationRequest, JudgeItem, Judgment, Selection, TraitSpec, VectorSet


@runtime_checkable
class TraitSource(Protocol):
    """A plugin (module or object) that serves traits."""

    def harness_list_traits(self, settings: Any) -> list[str] | None: ...

    def harness_load_trait(self, name: str, settings: Any) -> TraitSpec | None: ...


@runtime_checkable
class Generator(Protocol):
    """Turns generation requests into responses (one temperature/top_p per call)."""

    name: str

    def config(self) -> dict: ...

    def batch_size(self, ctx: Any) -> int: ...

    def generate(self, requests: Sequence[GenerationRequest], ctx: Any) -> list[Generation]: ...


@runtime_checkable
class Judge(Protocol):
    """Scores judge items 0-100 (``None`` with a reason when unscored)."""

    name: str
    model_id: str

    def config(self) -> dict: ...

    def batch_size(self, ctx: Any) -> int: ...

    def judge(self, items: Sequence[JudgeItem], ctx: Any) -> list[Judgment]: ...


@runtime_checkable
class Filter(Protocol):
    """Keeps the effective pos/neg pairs."""

    name: str

    def config(self) -> dict: ...

    def select(self, trait: TraitSpec, generations: Sequence[Generation], judgments: Sequence[Judgment]) -> Selection: ...


@runtime_checkable
class Extractor(Protocol):
    """Turns the kept pos/neg responses into per-layer vectors."""

    name: str

    def config(self) -> dict: ...

    def extract(self, trait: TraitSpec, pos: Sequence[Generation], neg: Sequence[Generation], ctx: Any) -> VectorSet: ...


#: registry kind -> the protocol its products satisfy
PROTOCOLS: dict[str, type] = {"generator": Generator, "judge": Judge, "filter": Filter, "extractor": Extractor}


def protocol_members(proto: type) -> list[str]:
    """The attribute and method names a protocol asks for, in declaration order."""
    names = list(getattr(proto, "__annotations__", {}))
    names += [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]
    return list(dict.fromkeys(names))


def check_component(kind: str, name: str, plugin: str, obj: Any) -> Any:
    """Return ``obj`` if it has every member of ``kind``'s protocol, else raise naming what is missing."""
    proto = PROTOCOLS.get(kind)
    if proto is None:
        return obj
    missing = [m for m in protocol_members(proto) if not hasattr(obj, m)]
    not_callable = [m for m in protocol_members(proto) if m in vars(proto) and callable(vars(proto)[m])
                    and hasattr(obj, m) and not callable(getattr(obj, m))]
    if missing or not_callable:
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                     f"not callable: {', '.join(not_callable)}" if not_callable else "") if x)
        raise HarnessError(
            f"{kind} {name!r} from plugin {plugin}: the object its factory returned ({type(obj).__name__}) does not "
            f"satisfy the {proto.__name__} protocol ({what}). Fix: add the member(s), or subclass "
            f"harness.core.protocols.Base{proto.__name__} for the defaults")
    return obj


class _Base:
    name: str = ""

    def __init__(self, settings: Any):
        self.settings = settings

    def config(self) -> dict:
        return {}


class BaseGenerator(_Base):
    """Defaults: no config, ``settings.batch_size`` (32 when automatic)."""

    def batch_size(self, ctx: Any) -> int:
        return int(getattr(self.settings, "batch_size", 0) or 32)

    def generate(self, requests: Sequence[GenerationRequest], ctx: Any) -> list[Generation]:  # pragma: no cover
        raise NotImplementedError


class BaseJudge(_Base):
    """Defaults: no config, ``settings.judge_batch_size``, the judge model is ``judge_model`` or the model."""

    @property
    def model_id(self) -> str:
        return str(getattr(self.settings, "judge_model", "") or getattr(self.settings, "model", ""))

    def batch_size(self, ctx: Any) -> int:
        return int(getattr(self.settings, "judge_batch_size", 0) or 8)

    def judge(self, items: Sequence[JudgeItem], ctx: Any) -> list[Judgment]:  # pragma: no cover
        raise NotImplementedError


class BaseFilter(_Base):
    def select(self, trait, generations, judgments):  # pragma: no cover
        raise NotImplementedError


class BaseExtractor(_Base):
    def extract(self, trait, pos, neg, ctx):  # pragma: no cover
        raise NotImplementedError
