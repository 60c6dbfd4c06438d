"""Property-based tests (hypothesis): the trait parser, the judge-output parsers, the JSONL reader."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.core.errors import TraitFileError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- trait parser ---------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip())
# rubric text with no format fields: braces only doubled (literal)
plain = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=30)
literal = st.sampled_from(["{{", "}}", "{{x}}", ""])


@st.composite
def rubrics(draw):
    parts = [draw(plain), "{question}", draw(plain), draw(literal), "{answer}", draw(plain)]
    if draw(st.booleans()):
        parts[1], parts[4] = parts[4], parts[1]
    return "".join(parts)


def _norm(q):
    from harness.core.traits import normalize_question as _norm

    return _norm(q)


@st.composite
def trait_data(draw):
    pairs = draw(st.lists(st.fixed_dictionaries({"pos": text, "neg": text}), min_size=1, max_size=6))
    qs = draw(st.lists(text, min_size=1, max_size=8, unique_by=_norm))
    return {"instruction": pairs, "questions": qs, "eval_prompt": draw(rubrics())}


@FAST
@given(data=trait_data())
def test_valid_trait_data_round_trips(data, tmp_path_factory):
    from harness.core.rubrics import fill
    from harness.core.traits import load_trait_files

    p = tmp_path_factory.mktemp("t") / "extract.json"
    p.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    spec = load_trait_files(p)
    assert [(x.pos, x.neg) for x in spec.instructions] == [(d["pos"], d["neg"]) for d in data["instruction"]]
    assert list(spec.questions) == data["questions"] and spec.eval_prompt == data["eval_prompt"]
    # a valid rubric always fills, whatever the question and answer contain (braces included)
    filled = fill(spec.eval_prompt, "Q{0}{x}", "A}{answer}")
    assert "Q{0}{x}" in filled and "A}{answer}" in filled


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20)


@FAST
@given(st.one_of(json_values, st.fixed_dictionaries({"instruction": json_values, "questions": json_values,
                                                      "eval_prompt": json_values})))
def test_any_json_is_accepted_or_gives_a_trait_file_error(data):
    from harness.core.traits import validate_trait_data

    try:
        validate_trait_data(data, "x.json")
    except TraitFileError as e:
        assert e.path == "x.json" and e.field and e.fix
        assert str(e).startswith("x.json: field ") and "Fix: " in str(e)


@FAST
@given(trait_data(), st.sampled_from(["instruction", "questions", "eval_prompt"]),
       st.sampled_from([None, 0, 1.5, True, "", [], {}, [None], [""], "{answer}"]))
def test_one_broken_field_is_named(data, key, value):
    from harness.core.traits import validate_trait_data

    data = {**data, key: value}
    with pytest.raises(TraitFileError) as ei:
        validate_trait_data(data, "x.json")
    assert ei.value.field.startswith(key)


@FAST
@given(raw=st.binary(max_size=300))
def test_any_bytes_give_a_trait_file_error_or_a_valid_trait(raw, tmp_path_factory):
    from harness.core.traits import read_trait_file

    p = tmp_path_factory.mktemp("b") / "extract.json"
    p.write_bytes(raw)
    try:
        read_trait_file(p)
    except TraitFileError as e:
        assert e.path == str(p) and "Fix: " in str(e)


@FAST
@given(st.text(max_size=60))
def test_rubric_validation_never_crashes_and_accepts_only_question_and_answer(rubric):
    import string

    from harness.core.traits import validate_rubric

    try:
        validate_rubric(rubric, "x.json")
    except TraitFileError as e:
        assert e.field == "eval_prompt"
        return
    names = {f for _, f, _, _ in string.Formatter().parse(rubric) if f is not None}
    assert names == {"question", "answer"}


# -- local judge: score from the full number distribution -------------------------------------
probs101 = st.lists(st.floats(0, 1, allow_nan=False), min_size=101, max_size=101)
p_ref = st.floats(0, 1, allow_nan=False)
min_mass = st.floats(0, 1, allow_nan=False)


@FAST
@given(probs101, p_ref, min_mass)
def test_local_score_in_range_or_unscored_with_reason(probs, pr, mm):
    from harness_plugins.judge_local import score_from_distribution

    score, reason, detail = score_from_distribution(probs, pr, mm)
    mass = sum(probs)
    if score is None:
        assert reason in ("refusal", "low_mass")
        assert reason != "refusal" or pr > mass
    else:
        assert reason is None and 0.0 <= score <= 100.0 and mass >= mm and mass > 0 and pr <= mass
        lo = min(k for k, p in enumerate(probs) if p > 0)
        hi = max(k for k, p in enumerate(probs) if p > 0)
        assert lo - 1e-6 <= score <= hi + 1e-6  # an expectation lies within the support
    assert detail["mass"] == pytest.approx(mass, abs=1e-5)


@FAST
@given(probs101, st.floats(0.01, 100))
def test_local_score_is_scale_invariant(probs, c):
    from harness_plugins.judge_local import score_from_distribution

    assume(sum(probs) > 1e-3)
    a, ra, _ = score_from_distribution(probs, 0.0, 0.0)
    b, rb, _ = score_from_distribution([p * c for p in probs], 0.0, 0.0)
    assert ra is rb is None and a == pytest.approx(b, rel=1e-9, abs=1e-9)


@FAST
@given(st.integers(0, 100), st.floats(0.3, 1))
def test_local_point_mass_scores_its_number(k, p):
    from harness_plugins.judge_local import score_from_distribution

    probs = [0.0] * 101
    probs[k] = p
    score, reason, _ = score_from_distribution(probs, 0.0, 0.25)
    assert reason is None and score == pytest.approx(k)
    assert score_from_distribution(probs, p * 1.01, 0.25)[:2] == (None, "refusal")


# -- server judges: top-logprob parser and the instructor verdict -----------------------------
import harness_plugins.judge_openai as openai_judge  # noqa: E402
token = st.one_of(st.text(max_size=6), st.integers(-5, 150).map(str), st.sampled_from(
    [" 7", "100", "050", "REF", " REFUSAL", "RE", "R", "١٢", "²", "12.5", "+3"]))
logprob = st.one_of(st.floats(max_value=0), st.just(float("nan")), st.none())


@FAST
@given(st.text(max_size=8))
def test_number_of_token_is_an_integer_0_100_or_none(tok):
    n = openai_judge.number_of_token(tok)
    assert n is None or (isinstance(n, int) and 0 <= n <= 100 and tok.strip().isdigit())


@given(st.integers(0, 100), st.sampled_from(["", " ", "\n", "  "]))
def test_number_of_token_reads_every_number(n, ws):
    assert openai_judge.number_of_token(f"{ws}{n}") == n


@FAST
@given(st.lists(st.tuples(token, logprob), max_size=20), min_mass)
def test_top_logprobs_score_in_range_or_unscored(top, mm):
    score, reason, detail = openai_judge.score_from_top_logprobs(top, mm)
    if score is None:
        assert reason in ("refusal", "low_mass", "out_of_range")
    else:
        assert reason is None and 0.0 <= score <= 100.0 and detail["mass"] >= mm - 1e-6
        nums = [openai_judge.number_of_token(t) for t, lp in top
                if openai_judge.number_of_token(t) is not None and lp is not None and math.isfinite(lp)]
        assert min(nums) - 1e-6 <= score <= max(nums) + 1e-6
    # the order of the top list does not matter (away from exact ties, where summation order decides)
    if abs(detail["mass"] - detail["p_refusal"]) < 1e-5 or abs(detail["mass"] - mm) < 1e-5:
        return
    s2, r2, _ = openai_judge.score_from_top_logprobs(list(reversed(top)), mm)
    assert r2 == reason and (score is None or s2 == pytest.approx(score, rel=1e-9, abs=1e-9))


@FAST
@given(st.dictionaries(st.sampled_from(["score", "refusal", "rationale", "extra"]), json_values, max_size=4))
def test_verdict_accepts_only_integer_scores_0_100(payload):
    from pydantic import ValidationError

    from harness.judging.transport import classify

    V = openai_judge.verdict_model()
    try:
        v = V.model_validate(payload)
    except ValidationError as e:
        assert classify(e)[0] == "invalid_output"  # recorded as unscored, never as 0
        return
    assert isinstance(v.score, int) and 0 <= v.score <= 100


# -- JSONL: a torn tail is dropped, never parsed -----------------------------------------------
@FAST
@given(records=st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8))),
                        min_size=1, max_size=6), data=st.data())
def test_truncated_jsonl_reads_as_a_prefix(records, data, tmp_path_factory):
    from harness.core.artifacts import read_jsonl, write_jsonl

    p = tmp_path_factory.mktemp("j") / "x.jsonl"
    write_jsonl(p, records)
    raw = p.read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    try:
        raw[:cut].decode("utf-8")
    except UnicodeDecodeError:
        assume(False)
    p.write_bytes(raw[:cut])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = list(read_jsonl(p))
    assert got == records[: len(got)]
    complete = raw[:cut].count(b"\n")
    assert len(got) == complete
    assert len(w) == (0 if cut in (0, len(raw)) or raw[cut - 1:cut] == b"\n" else 1)
