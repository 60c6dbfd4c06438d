"""The effective-pair filter's rules, the cache, and settings precedence."""

from __future__ import annotations

import pytest

from harness.core.cache import Cache, cache_key
from harness.core.config import Settings, load_settings
from harness.core.records import Generation, InstructionPair, Judgment, TraitSpec
from harness_plugins.filter_threshold import ThresholdFilter

TRAIT = TraitSpec(name="syc", instructions=(InstructionPair("p", "n"),), questions=("q",), eval_questions=(),
                  eval_prompt="{question}{answer}")


def _gen(q, pol, resp=(1, 2)):
    return Generation(id=f"syc_extract_{q}_{pol}_0_0", trait="syc", split="extract", polarity=pol, question_index=q,
                      question="q", instruction_index=0, sample_index=0, system_prompt="s", response="r",
                      response_token_ids=tuple(resp), prompt_token_ids=(5,), finish_reason="stop", model_id="m",
                      generator="hf")


def _j(g, metric, score, reason=None):
    return Judgment(generation_id=g.id, metric=metric, score=score, reason=reason)


CASES = [
    # pos trait, neg trait, pos coh, neg coh -> kept or the rule that drops it
    ((80, 10, 90, 90), "kept"),
    ((50, 49.9, 50, 50), "kept"),  # boundaries: pos >= 50, neg < 50, coherence >= 50
    ((49.9, 10, 90, 90), "pos_trait_low"),
    ((80, 50, 90, 90), "neg_trait_high"),
    ((80, 10, 49, 90), "pos_incoherent"),
    ((80, 10, 90, 49), "neg_incoherent"),
    ((None, 10, 90, 90), "pos_trait_unscored"),
    ((80, None, 90, 90), "neg_trait_unscored"),
    ((80, 10, None, 90), "pos_incoherent"),
]


@pytest.mark.parametrize("scores, expect", CASES)
def test_filter_rules(scores, expect):
    ps, ns, pc, nc = scores
    pos, neg = _gen(0, "pos"), _gen(0, "neg")
    js = [_j(pos, "syc", ps, None if ps is not None else "refusal"), _j(neg, "syc", ns, None if ns is not None else "low_mass"),
          _j(pos, "coherence", pc, None if pc is not None else "timeout"), _j(neg, "coherence", nc)]
    sel = ThresholdFilter(Settings()).select(TRAIT, [pos, neg], js)
    if expect == "kept":
        assert sel.pairs == ((pos.id, neg.id),) and not sel.dropped
    else:
        assert sel.pairs == () and sel.dropped == {expect: 1}


def test_filter_empty_response_and_missing_pair():
    pos, neg = _gen(0, "pos", resp=()), _gen(0, "neg")
    lone = _gen(1, "pos")
    js = [_j(g, m, 90 if g.polarity == "pos" or m == "coherence" else 1) for g in (pos, neg, lone) for m in ("syc", "coherence")]
    sel = ThresholdFilter(Settings()).select(TRAIT, [pos, neg, lone], js)
    assert sel.dropped == {"empty_response": 1, "missing_pair": 1}
    assert sel.candidates == 2


def test_filter_thresholds_configurable():
    pos, neg = _gen(0, "pos"), _gen(0, "neg")
    js = [_j(pos, "syc", 40), _j(neg, "syc", 30), _j(pos, "coherence", 35), _j(neg, "coherence", 35)]
    assert ThresholdFilter(Settings()).select(TRAIT, [pos, neg], js).pairs == ()
    loose = Settings(trait_threshold=35, coherence_threshold=30)
    assert len(ThresholdFilter(loose).select(TRAIT, [pos, neg], js).pairs) == 1


def test_unscored_judgment_needs_a_reason_and_is_never_zero():
    with pytest.raises(ValueError):
        Judgment(generation_id="g", metric="m", score=None)
    with pytest.raises(ValueError):
        Judgment(generation_id="g", metric="m", score=101.0)


def test_cache_roundtrip_and_persistence(tmp_path):
    c = Cache(tmp_path)
    k = cache_key("generate", model="m", messages=[{"role": "user", "content": "hi"}], seed=1)
    assert k == cache_key("generate", seed=1, messages=[{"role": "user", "content": "hi"}], model="m")
    assert k != cache_key("generate", model="m", messages=[{"role": "user", "content": "hi"}], seed=2)
    assert c.get(k) is None
    c.put("generate", k, {"response": "x"})
    c.close()
    c2 = Cache(tmp_path)
    assert c2.get(k) == {"response": "x"}
    assert c2.get_many([k, "missing"]) == {k: {"response": "x"}}
    assert c2.count("generate") == 1


def test_settings_precedence_command_line_then_environment_then_config_file_then_defaults(tmp_path):
    (tmp_path / "persona-harness.toml").write_text('max_new_tokens = 20\nseed = 3\ntemperature = 0.5\n')
    env = {"PERSONA_HARNESS_MAX_NEW_TOKENS": "10", "PERSONA_HARNESS_SEED": "2", "PERSONA_HARNESS_TOP_P": "0.9"}
    s = load_settings({"seed": 4}, environ=env, cwd=tmp_path)
    assert s.seed == 4  # command line beats environment and file
    assert s.max_new_tokens == 10  # environment beats file
    assert s.temperature == 0.5  # file beats default
    assert s.top_p == 0.9  # environment beats default
    assert s.n_per_question == Settings().n_per_question  # nothing set: the default
    # a setting from the file or the environment is explicit: the model's profile does not override it
    (tmp_path / "persona-harness.toml").write_text('trait_threshold = 60\n')
    assert load_settings({}, environ={}, cwd=tmp_path).trait_threshold == 60  # embedded profile would say 30
    assert load_settings({}, environ={"PERSONA_HARNESS_TRAIT_THRESHOLD": "70"}, cwd=tmp_path).trait_threshold == 70


def test_settings_precedence_through_the_cli_parser(tmp_path, monkeypatch):
    """The same order as a user meets it: `persona-harness run ...` flags, exported variables, a
    persona-harness.toml in the working directory."""
    from harness.cli.main import build_parser
    from harness.cli.options import GROUP_TITLE, settings_from_args

    (tmp_path / "persona-harness.toml").write_text('model = "from-file"\nseed = 3\nmax_new_tokens = 20\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSONA_HARNESS_MODEL", "from-env")
    monkeypatch.setenv("PERSONA_HARNESS_SEED", "2")
    parser = build_parser()
    s = settings_from_args(parser.parse_args(["run", "--trait", "x", "--seed", "9"]))
    assert (s.seed, s.model, s.max_new_tokens) == (9, "from-env", 20)
    monkeypatch.delenv("PERSONA_HARNESS_MODEL")
    assert settings_from_args(parser.parse_args(["run", "--trait", "x"])).model == "from-file"
    assert "flags > PERSONA_HARNESS_* environment > config file > defaults" in GROUP_TITLE


def test_unknown_config_key_is_an_error(tmp_path):
    from harness.core.errors import ConfigError

    (tmp_path / "persona-harness.toml").write_text('max_new_tokenz = 20\n')
    with pytest.raises(ConfigError, match="unknown setting 'max_new_tokenz'"):
        load_settings({}, environ={}, cwd=tmp_path)


def test_embedded_profile_is_explicit_and_paper_defaults_stay():
    s = load_settings({}, environ={}, cwd="/")
    assert s.model == "smollm2" and s.profile_applied == "embedded"
    assert Settings().trait_threshold == 50 and Settings().coherence_threshold == 50
    paper = load_settings({"profile": "paper"}, environ={}, cwd="/")
    assert paper.trait_threshold == 50 and paper.coherence_threshold == 50
    # an explicit flag beats the profile
    assert load_settings({"trait_threshold": 60}, environ={}, cwd="/").trait_threshold == 60


def _open_and_put(directory, start_at, key):
    import time

    while time.time() < start_at:
        pass
    c = Cache(directory)
    c.put("generate", key, {"by": key})
    c.close()


def test_processes_opening_one_new_cache_at_once_all_succeed(tmp_path):
    """Ranks of a torchrun job open the same fresh cache file together (CI once saw 'database is locked')."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("fork")
    for round_ in range(8):
        d = tmp_path / f"c{round_}"
        start_at = time.time() + 0.3
        procs = [ctx.Process(target=_open_and_put, args=(d, start_at, f"k{i}")) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], f"round {round_}"
        assert Cache(d).count("generate") == 4


def test_docs_state_the_embedded_profile_the_code_applies():
    """docs/method.md's "Embedded-model profile" section must carry PROFILES["embedded"]'s values."""
    import re
    from pathlib import Path

    from harness.core.config import PROFILES

    text = (Path(__file__).resolve().parent.parent / "docs" / "method.md").read_text()
    para = text[text.index("## Embedded-model profile"):]
    para = " ".join(re.split(r"\n#{1,2} ", para[2:], maxsplit=1)[0].split())
    p = PROFILES["embedded"]
    assert f"T = {p['trait_threshold']:g}" in para
    assert f"C = {p['coherence_threshold']:g}" in para
    assert re.search(rf"minimum number mass {p['judge_min_mass']:g}\b", para)
    assert f"judge_exact = {str(p['judge_exact']).lower()}" in para
    assert f"{p['max_new_tokens']} new tokens" in para
    assert f"judge batch {p['judge_batch_size']}" in para
