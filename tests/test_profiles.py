"""Settings profiles: ``paper`` sets what the paper fixes, the docs table says the same, the run
records the applied profile and every value it set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.core.config import MODEL_PROFILES, PAPER_LAYERS, PAPER_SERVER_JUDGE, PROFILES, load_settings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "paper.md"


def _docs_table() -> dict[str, str]:
    """``setting`` -> the ``--profile paper`` column of docs/paper.md's first table."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## What `--profile paper` sets", 1)[1].split("##", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)`(?: (.*))?", cells[0]) if len(cells) == 3 else None
        if m:
            rows[cells[0].strip("`") if m.group(2) is None else f"{m.group(1)} {m.group(2)}"] = cells[2]
    return rows


def test_docs_table_is_the_paper_profile():
    rows = _docs_table()
    want = {k: str(v) for k, v in PROFILES["paper"].items()}
    want["judge (with `--judge-base-url`)"] = PAPER_SERVER_JUDGE
    for model, layer in PAPER_LAYERS.items():
        want[f"layer for {model}"] = str(layer)
    assert rows == want


def test_paper_profile_sets_the_papers_values_and_records_them():
    s = load_settings({"profile": "paper", "model": "Qwen/Qwen2.5-7B-Instruct"}, environ={}, cwd="/")
    assert (s.n_per_question, s.max_new_tokens, s.temperature, s.top_p) == (10, 1000, 1.0, 1.0)
    assert (s.trait_threshold, s.coherence_threshold, s.judge_min_mass, s.layer) == (50.0, 50.0, 0.25, 20)
    assert s.judge == "local"  # no server given: the in-process judge
    assert s.profile_applied == "paper" and s.profile_set["n_per_question"] == 10 and s.profile_set["layer"] == 20
    served = load_settings({"profile": "paper", "judge_base_url": "http://127.0.0.1:9/v1"}, environ={}, cwd="/")
    assert served.judge == PAPER_SERVER_JUDGE and "layer" not in served.profile_set


def test_explicit_values_win_over_the_profile_and_are_not_listed_as_set():
    s = load_settings({"profile": "paper", "n_per_question": 2, "judge": "instructor",
                       "judge_base_url": "http://127.0.0.1:9/v1"}, environ={"PERSONA_HARNESS_MAX_NEW_TOKENS": "64"},
                      cwd="/")
    assert (s.n_per_question, s.max_new_tokens, s.judge) == (2, 64, "instructor")
    assert not {"n_per_question", "max_new_tokens", "judge"} & set(s.profile_set)


@pytest.mark.parametrize("model, profile", [("Qwen/Qwen2.5-7B-Instruct", "paper"), ("smollm2", "embedded"),
                                            ("./my-checkpoint", "default")])
def test_auto_picks_the_models_profile(model, profile):
    assert load_settings({"model": model}, environ={}, cwd="/").profile_applied == profile
    assert MODEL_PROFILES.get(model, "default") == profile


def test_default_profile_changes_nothing():
    from harness.core.config import Settings

    s = load_settings({"profile": "default"}, environ={}, cwd="/")
    assert s.profile_set == {} and (s.n_per_question, s.max_new_tokens) == (Settings().n_per_question,
                                                                             Settings().max_new_tokens)


def test_profiles_command_prints_every_profile(capsys):
    from harness.cli.main import main

    assert main(["profiles", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profiles"] == json.loads(json.dumps(PROFILES)) and data["paper_layers"] == PAPER_LAYERS
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "paper  (auto for: Qwen/Qwen2.5-7B-Instruct" in out and "max_new_tokens = 1000" in out
