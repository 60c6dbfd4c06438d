"""Plugin core: hook registration, third-party overrides, unknown names, hook docs and tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import hookimpl
from harness.core.errors import HarnessError, UnknownComponentError
from harness.core.plugins import DEFAULT_PLUGINS, build_registry, get_plugin_manager, plugin_info
from harness.core.records import Judgment

ROOT = Path(__file__).resolve().parent.parent


def _hook_names(pm):
    return sorted(n for n in dir(pm.hook) if n.startswith("harness_"))


def test_builtins_registered_under_dotted_names(pm):
    for name in DEFAULT_PLUGINS:
        assert pm.get_plugin(name) is not None


def test_every_hook_is_documented_with_its_arguments(pm):
    doc = (ROOT / "docs" / "plugin_hooks.md").read_text()
    for name in _hook_names(pm):
        caller = getattr(pm.hook, name)
        args = ", ".join(caller.spec.argnames)
        assert f"## {name}({args})" in doc, f"docs/plugin_hooks.md lacks '## {name}({args})'"


def test_every_hook_has_a_test(pm):
    text = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in _hook_names(pm):
        assert re.search(rf"def test_hook_{name}\b", text), f"no test_hook_{name}"


def test_firstresult_builtins_are_trylast(pm):
    for name in _hook_names(pm):
        caller = getattr(pm.hook, name)
        if caller.spec.opts.get("firstresult"):
            for impl in caller.get_hookimpls():
                if pm.get_name(impl.plugin).startswith("harness_plugins."):
                    assert impl.trylast, f"{pm.get_name(impl.plugin)} implements {name} without trylast"


class ThirdPartyTraits:
    @hookimpl
    def harness_list_traits(self, settings):
        return ["sycophantic", "from-plugin"]

    @hookimpl
    def harness_load_trait(self, name, settings):
        if name in ("sycophantic", "from-plugin"):
            from harness.core.records import InstructionPair, TraitSpec

            return TraitSpec(name=name, instructions=(InstructionPair("p", "n"),), questions=("q?",),
                             eval_questions=(), eval_prompt="{question} {answer}", source="plugin")


def test_hook_harness_list_traits(pm):
    from harness.core.config import Settings

    names = [n for ns in pm.hook.harness_list_traits(settings=Settings()) for n in ns]
    assert {"sycophantic", "evil", "hallucinating"} <= set(names)
    pm.register(ThirdPartyTraits(), name="third")
    names = [n for ns in pm.hook.harness_list_traits(settings=Settings()) for n in ns]
    assert "from-plugin" in names


def test_hook_harness_load_trait(pm):
    from harness.core.config import Settings

    builtin = pm.hook.harness_load_trait(name="sycophantic", settings=Settings())
    assert builtin.source.endswith("extract.json")
    # registered AFTER the built-in but a third party still wins (built-in is trylast)
    pm.register(ThirdPartyTraits(), name="third")
    assert pm.hook.harness_load_trait(name="sycophantic", settings=Settings()).source == "plugin"
    assert pm.hook.harness_load_trait(name="no-such", settings=Settings()) is None


def test_third_party_wins_even_when_registered_first():
    from harness.core.config import Settings

    pm = get_plugin_manager(entrypoints=False, builtins=False)
    pm.register(ThirdPartyTraits(), name="third")
    import importlib

    pm.register(importlib.import_module("harness_plugins.traits_json"), name="harness_plugins.traits_json")
    assert pm.hook.harness_load_trait(name="sycophantic", settings=Settings()).source == "plugin"


class MyJudge:
    name = "local"
    model_id = "mine"

    def __init__(self, settings):
        pass

    def config(self):
        return {}

    def batch_size(self, ctx):
        return 8

    def judge(self, items, ctx):
        return [Judgment(generation_id=i.generation_id, metric=i.metric, score=50.0) for i in items]


class OverrideJudge:
    @hookimpl
    def harness_register_judges(self, register):
        register("local", MyJudge, description="override")
        register("mine", MyJudge)


def test_hook_harness_register_judges(pm):
    reg = build_registry(pm, "judge")
    assert reg.get("local").plugin == "harness_plugins.judge_local"
    pm.register(OverrideJudge(), name="override")
    reg = build_registry(pm, "judge")
    assert reg.get("local").plugin == "override"  # third party replaces the built-in name
    assert isinstance(reg.create("mine", None), MyJudge)


def test_two_third_parties_same_name_is_an_error(pm):
    pm.register(OverrideJudge(), name="a")

    class Other:
        @hookimpl
        def harness_register_judges(self, register):
            register("mine", MyJudge)

    pm.register(Other(), name="b")
    with pytest.raises(Exception, match="registered by both"):
        build_registry(pm, "judge")


def test_unknown_component_says_did_you_mean(pm):
    reg = build_registry(pm, "judge")
    with pytest.raises(UnknownComponentError, match=r"Did you mean 'local'"):
        reg.get("locla")


def test_hook_harness_register_generators(pm):
    assert "hf" in build_registry(pm, "generator").names()


def test_hook_harness_register_filters(pm):
    assert "effective-pairs" in build_registry(pm, "filter").names()


def test_hook_harness_register_extractors(pm):
    assert "mean-diff" in build_registry(pm, "extractor").names()


def test_hook_harness_load_model(pm, tiny_lm):
    from harness.core.config import Settings

    class Loader:
        @hookimpl
        def harness_load_model(self, model_id, settings):
            return tiny_lm if model_id == "tiny" else None

    pm.register(Loader(), name="loader")
    assert pm.hook.harness_load_model(model_id="tiny", settings=Settings()) is tiny_lm


def test_hook_harness_register_commands():
    from harness.cli.main import build_parser

    pm = get_plugin_manager(entrypoints=False)

    class Cmd:
        @hookimpl
        def harness_register_commands(self, subparsers):
            p = subparsers.add_parser("hello")
            p.set_defaults(func=lambda args: 7)

    pm.register(Cmd(), name="cmd")
    args = build_parser(pm).parse_args(["hello"])
    assert args.func(args) == 7


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def harness_run_started(self, run):
        self.events.append(("started", run.trait.name))

    @hookimpl
    def harness_stage_finished(self, run, stage, records):
        self.events.append((stage, len(records)))

    @hookimpl
    def harness_run_finished(self, run, summary):
        self.events.append(("finished", summary["pairs_kept"]))


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory, tiny_lm):
    import json

    from harness.testing import StaticModelPlugin

    from harness.core.config import Settings
    from harness.core.pipeline import run_trait

    tmp_path = tmp_path_factory.mktemp("observed")
    d = tmp_path / "traits" / "mini"
    d.mkdir(parents=True)
    base = {"instruction": [{"pos": f"Flatter ({i}).", "neg": f"Be candid ({i})."} for i in range(5)],
            "eval_prompt": "Score 0-100.\nQ: {question}\nA: {answer}\nNumber only."}
    (d / "extract.json").write_text(json.dumps({**base, "questions": ["A?", "B?", "C?"]}))
    tiny_pm = get_plugin_manager(entrypoints=False)
    tiny_pm.register(StaticModelPlugin(tiny_lm), name="static")
    rec = Recorder()
    tiny_pm.register(rec, name="recorder")
    s = Settings(model="tiny", traits_dirs=(str(tmp_path / "traits"),), out_dir=str(tmp_path / "r"),
                 cache_dir=str(tmp_path / "c"), trait_threshold=0, coherence_threshold=0, judge_min_mass=0,
                 max_new_tokens=4, progress=False)
    run_trait("mini", s, pm=tiny_pm)
    return rec.events


def test_hook_harness_run_started(observed_run):
    assert observed_run[0] == ("started", "mini")


def test_hook_harness_stage_finished(observed_run):
    stages = [e[0] for e in observed_run[1:-1]]
    assert stages == ["generate", "judge", "filter", "extract"]
    assert dict(observed_run[1:-1])["generate"] == 30


def test_hook_harness_run_finished(observed_run):
    assert observed_run[-1][0] == "finished" and observed_run[-1][1] > 0


def test_plugin_info_lists_versions(pm):
    info = plugin_info(pm)
    assert all(p["version"] for p in info if p["name"].startswith("harness_plugins."))


def test_explicit_plugin_module_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "my_harness_plugin.py").write_text(
        "from harness import hookimpl\n"
        "@hookimpl\n"
        "def harness_list_traits(settings):\n    return ['explicit-trait']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from harness.core.config import Settings

    pm = get_plugin_manager(entrypoints=False, modules=["my_harness_plugin"])
    names = [n for ns in pm.hook.harness_list_traits(settings=Settings()) for n in ns]
    assert "explicit-trait" in names


def test_unimportable_plugin_module_is_a_clear_error():
    from harness.core.errors import HarnessError

    with pytest.raises(HarnessError, match="cannot import"):
        get_plugin_manager(entrypoints=False, modules=["no_such_module_xyz"])


def test_a_component_that_misses_a_protocol_member_is_a_clear_error(pm):
    """Every registry product is checked against its kind's protocol: the error names plugin and member."""

    class Half:  # a judge without batch_size and config
        name, model_id = "half", "m"

        def __init__(self, settings):
            pass

        def judge(self, items, ctx):  # pragma: no cover - never called
            return []

    class Reg:
        @hookimpl
        def harness_register_judges(self, register):
            register("half", Half)

    pm.register(Reg(), name="half-plugin")
    reg = build_registry(pm, "judge")
    with pytest.raises(HarnessError, match=r"judge 'half' from plugin half-plugin.*Judge protocol \(missing config, "
                                           r"batch_size\)"):
        reg.create("half", None)


def test_every_builtin_component_satisfies_its_protocol(pm):
    from harness.core.config import Settings
    from harness.core.protocols import PROTOCOLS

    for kind, proto in PROTOCOLS.items():
        reg = build_registry(pm, kind)
        assert reg.names(), kind
        for name in reg.names():
            obj = reg.create(name, Settings())
            assert isinstance(obj, proto), (kind, name)
            assert isinstance(obj.config(), dict) and obj.name
