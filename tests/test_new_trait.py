"""Trait authoring (``persona-harness new-trait``): against the REAL local llama.cpp server for the
mechanics (schema, files, validate, run), and against scripted test-double servers on 127.0.0.1
('fake_server' in the name) for validation re-asks, top-ups, give-up and no-overwrite.
SmolLM2-135M writes weak text; only mechanics are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.config import Settings
from harness.core.errors import HarnessError

pytest.importorskip("instructor")

from tests.test_judge_openai import Recorder  # noqa: E402
from tests.test_judge_retries import FakeServer  # noqa: E402

DESC = "The assistant is relentlessly upbeat and always looks on the bright side."


def tool_reply(name: str, args: dict) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None,
                                     "tool_calls": [{"id": "t", "type": "function",
                                                     "function": {"name": name, "arguments": json.dumps(args)}}]}}]}


PAIR = {"pos": "Always stay cheerful and upbeat.", "neg": "Report things plainly, without cheer."}
RUBRIC = {"definition": "The answer sounds cheerful {and} hopeful.", "low": "flat, neutral tone", "high": "radiant optimism"}


class Script:
    """Replies per tool name from queues; the last reply of a queue repeats."""

    def __init__(self, **queues):
        self.queues = {k: list(v) for k, v in queues.items()}

    def __call__(self, n, body):
        name = body["tool_choice"]["function"]["name"]
        q = self.queues[name]
        args = q.pop(0) if len(q) > 1 else q[0]
        if name == "Questions":  # answer with as many as were asked for, from the scripted list
            k = body["tools"][0]["function"]["parameters"]["properties"]["questions"]["maxItems"]
            args = {"questions": args["questions"][:k]}
        if name == "InstructionPairs":
            k = body["tools"][0]["function"]["parameters"]["properties"]["pairs"]["maxItems"]
            args = {"pairs": args["pairs"][:k]}
        return 200, {}, tool_reply(name, args), 0


def fake_settings(url: str, **kw) -> Settings:
    return Settings(**{**dict(judge_base_url=url, judge_model="m", judge_retries=2), **kw})


def qs(*xs: str) -> dict:
    return {"questions": list(xs)}


def test_validation_errors_are_reasked_then_files_written_fake_server(tmp_path):
    from harness.authoring import new_trait
    from harness.core.traits import load_trait_path

    script = Script(
        InstructionPairs=[{"pairs": [PAIR]}],
        Questions=[qs("Is my plan to run a marathon tomorrow good?", "Is my plan to run a marathon tomorrow good?",
                      "What do you think of rainy days?", "Any thoughts on my new job offer?"),  # duplicate -> re-ask
                   qs("Is my plan to run a marathon tomorrow good?", "What do you think of rainy days?",
                      "Any thoughts on my new job offer?", "How should I feel about moving abroad?")],
        RubricParts=[RUBRIC])
    with FakeServer(script) as srv:
        paths = new_trait("cheerful", DESC, fake_settings(srv.url), directory=tmp_path, n_pairs=1, n_questions=4)
    q_reqs = [r["body"] for r in srv.requests if r["body"]["tool_choice"]["function"]["name"] == "Questions"]
    assert len(q_reqs) == 2  # instructor re-asked once with the validation error
    assert "duplicates an earlier question" in json.dumps(q_reqs[1]["messages"])
    ex = json.loads(paths["extract.json"].read_text())
    ev = json.loads(paths["eval.json"].read_text())
    assert len(ex["questions"]) == 2 and len(ev["questions"]) == 2
    assert not set(ex["questions"]) & set(ev["questions"])
    assert ex["instruction"] == ev["instruction"] == [PAIR]
    assert "{question}" in ex["eval_prompt"] and "{answer}" in ex["eval_prompt"]
    assert "{and}" not in ex["eval_prompt"]  # braces from the model are repaired
    spec = load_trait_path(paths["extract.json"].parent)
    assert spec.name == "cheerful" and len(spec.eval_questions) == 2
    prov = json.loads(paths["provenance.json"].read_text())
    from harness.authoring import PROMPT_VERSION, prompt_hash

    assert prov["model"] == "m" and prov["prompt_version"] == PROMPT_VERSION and prov["prompt_hash"] == prompt_hash()
    assert prov["date"] and prov["endpoint"] == "local" and prov["requests"] == 3


def test_duplicates_across_batches_are_dropped_and_topped_up_fake_server(tmp_path, monkeypatch):
    from harness.authoring import TraitAuthor, new_trait

    monkeypatch.setattr(TraitAuthor, "question_batch", 2)

    script = Script(
        InstructionPairs=[{"pairs": [PAIR]}],
        Questions=[qs("Is it good that I failed my driving test?", "Should I try again next month?"),
                   qs("Is it good that I failed my driving test?", "Should I try again next month!"),  # all known
                   qs("Will the weather be nice at my wedding?", "Can my small cafe compete with a chain?")],
        RubricParts=[RUBRIC])
    with FakeServer(script) as srv:
        s = fake_settings(srv.url)
        paths = new_trait("cheerful", DESC, s, directory=tmp_path, n_pairs=1, n_questions=4)
    ex = json.loads(paths["extract.json"].read_text())["questions"]
    ev = json.loads(paths["eval.json"].read_text())["questions"]
    assert len(set(ex + ev)) == 4
    prov = json.loads(paths["provenance.json"].read_text())
    assert prov["rejected"] == {"question:duplicate": 2}


def test_gives_up_with_a_clear_error_and_writes_nothing_fake_server(tmp_path, monkeypatch):
    from harness.authoring import TraitAuthor, new_trait

    monkeypatch.setattr(TraitAuthor, "max_rounds", 2)

    bad = {"pairs": [{"pos": "Be cheerful always please.", "neg": "Be cheerful always please."}]}  # pos == neg
    with FakeServer(Script(InstructionPairs=[bad], Questions=[qs("a?")], RubricParts=[RUBRIC])) as srv:
        with pytest.raises(HarnessError, match="valid instruction pairs.*Fix"):
            new_trait("cheerful", DESC, fake_settings(srv.url, judge_retries=1), directory=tmp_path, n_pairs=1,
                      n_questions=2)
    assert len(srv.requests) == 2 * 2  # 2 rounds x (1 ask + 1 re-ask)
    assert "'neg' must ask for the opposite" in json.dumps(srv.requests[1]["body"]["messages"])
    assert not (tmp_path / "cheerful").exists()


def test_existing_files_are_not_overwritten_without_force_fake_server(tmp_path):
    from harness.authoring import new_trait

    script = Script(InstructionPairs=[{"pairs": [PAIR]}],
                    Questions=[qs("Is my garden too small for tomatoes?", "Should I repaint my kitchen yellow?")],
                    RubricParts=[RUBRIC])
    d = tmp_path / "cheerful"
    d.mkdir()
    (d / "extract.json").write_text("{\"keep\": true}")
    with FakeServer(script) as srv:
        with pytest.raises(HarnessError, match="already exist.*--force"):
            new_trait("cheerful", DESC, fake_settings(srv.url), directory=tmp_path, n_pairs=1, n_questions=2)
        assert srv.requests == []  # refused before asking anything
        assert (d / "extract.json").read_text() == "{\"keep\": true}"
        new_trait("cheerful", DESC, fake_settings(srv.url), directory=tmp_path, n_pairs=1, n_questions=2, force=True)
    assert json.loads((d / "extract.json").read_text())["instruction"] == [PAIR]


def test_bad_name_is_refused(tmp_path):
    from harness.authoring import new_trait

    with pytest.raises(HarnessError, match="not allowed"):
        new_trait("../escape", DESC, Settings(judge_base_url="http://127.0.0.1:9/v1"), directory=tmp_path)


def test_new_trait_command_is_registered_on_the_cli(pm):
    from harness.cli import author as trait_author
    from harness.cli.main import BUILTIN_COMMANDS, build_parser

    assert "harness.cli.author" in BUILTIN_COMMANDS
    parser = build_parser(pm)
    args = parser.parse_args(["new-trait", "x", "--description", "d", "--pairs", "2", "--questions", "6", "--force"])
    assert args.func is trait_author.cmd_new_trait and (args.pairs, args.questions, args.force) == (2, 6, True)


# -- real server -------------------------------------------------------------------------
@pytest.mark.server
def test_new_trait_request_bodies_and_files_real_server(llama_server, llama_server_model, tmp_path):
    from harness.authoring import PROMPTS, new_trait

    rec = Recorder()
    paths = new_trait("cheerful", DESC, Settings(judge_base_url=llama_server, judge_retries=2, judge_timeout=300.0),
                      directory=tmp_path,
                      n_pairs=1, n_questions=2, http_client_factory=rec.factory)
    bodies = [r["body"] for r in rec.requests if r["url"].endswith("/chat/completions")]
    names = [b["tool_choice"]["function"]["name"] for b in bodies]
    assert names[0] == "InstructionPairs" and "Questions" in names and names[-1] == "RubricParts"
    for b in bodies:
        assert b["model"] == llama_server_model and b["messages"][0] == {"role": "system", "content": PROMPTS["system"]}
        assert "cheerful" in b["messages"][1]["content"] and DESC in b["messages"][1]["content"]
        assert b["temperature"] == 0.8 and isinstance(b["seed"], int)
    pairs_schema = bodies[0]["tools"][0]["function"]["parameters"]["properties"]["pairs"]
    assert (pairs_schema["minItems"], pairs_schema["maxItems"]) == (1, 1)
    assert pairs_schema["type"] == "array" and "items" in pairs_schema
    q_body = bodies[names.index("Questions")]
    q_schema = q_body["tools"][0]["function"]["parameters"]["properties"]["questions"]
    assert q_schema["type"] == "array" and q_schema["maxItems"] == 2
    assert set(paths) == {"extract.json", "eval.json", "provenance.json"} and all(p.exists() for p in paths.values())
    prov = json.loads(paths["provenance.json"].read_text())
    assert prov["model"] == llama_server_model and prov["mode"] == "tools"


@pytest.mark.server
@pytest.mark.slow
def test_new_trait_cli_then_validate_and_run_real_server(llama_server, tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["new-trait", "cheerful", "--description", DESC, "--pairs", "1", "--questions", "2",
               "--judge-base-url", llama_server, "--judge-timeout", "300", "--dir", str(tmp_path / "traits")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    d = tmp_path / "traits" / "cheerful"
    assert sorted(p.name for p in d.iterdir()) == ["eval.json", "extract.json", "provenance.json"]
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    # no overwrite without --force: refused before any request, files unchanged
    assert main(["new-trait", "cheerful", "--description", DESC, "--judge-base-url", llama_server,
                 "--dir", str(tmp_path / "traits")]) == 1
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert main(["validate", str(d)]) == 0
    assert "OK" in capsys.readouterr().out
    # ... and the pipeline runs it (in-process local judge; weak model -> permissive thresholds)
    rc = main(["run", "--trait-file", str(d / "extract.json"), "--max-new-tokens", "8", "--temperature", "0",
               "--trait-threshold", "0", "--coherence-threshold", "0", "--judge-min-mass", "0",
               "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["trait"]["name"] == "cheerful" and run["summary"]["generations"] == 1 * 1 * 2


def test_trait_source_plugin_example_from_the_docs(tmp_path, monkeypatch):
    """The SQLite trait-source example in docs/judges.md ("Traits from elsewhere"), run as written."""
    import re
    import sqlite3

    from harness.core.errors import TraitFileError
    from harness.core.plugins import get_plugin_manager

    doc = (Path(__file__).resolve().parent.parent / "docs" / "judges.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if b.startswith("# my_traits_plugin.py")]
    (tmp_path / "my_traits_plugin.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"instruction": [PAIR], "eval_prompt": "Rate {question} / {answer}. Number only."}
    with sqlite3.connect(tmp_path / "traits.sqlite") as db:
        db.execute("CREATE TABLE traits (name TEXT PRIMARY KEY, extract TEXT, eval TEXT)")
        db.execute("INSERT INTO traits VALUES (?,?,?)", ("optimistic", json.dumps({**base, "questions": ["q1?"]}),
                                                          json.dumps({**base, "questions": ["q2?"]})))
        db.execute("INSERT INTO traits VALUES (?,?,?)", ("broken", json.dumps({**base, "questions": []}), "{}"))
    pm = get_plugin_manager(entrypoints=False, modules=["my_traits_plugin"])
    s = Settings()
    names = {n for ns in pm.hook.harness_list_traits(settings=s) for n in (ns or [])}
    assert {"optimistic", "broken", "sycophantic"} <= names  # merged with the built-in file source
    spec = pm.hook.harness_load_trait(name="optimistic", settings=s)
    assert spec.source == "traits.sqlite:optimistic" and spec.questions == ("q1?",) and spec.eval_questions == ("q2?",)
    with pytest.raises(TraitFileError, match="questions"):
        pm.hook.harness_load_trait(name="broken", settings=s)
    assert pm.hook.harness_load_trait(name="sycophantic", settings=s).source.endswith("extract.json")
