"""Bad input: malformed trait files, unsafe names, non-finite activations, wrong-shape vectors, pickles.

Each malformed trait file must give exactly ONE clear error that names the file, the field and the
fix, both from ``persona-harness validate`` and from the loader (``TraitFileError``).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.errors import HarnessError, TraitFileError

RUBRIC = "Rate 0-100 how much this flatters.\nQ: {question}\nA: {answer}\nNumber only."
PAIRS = [{"pos": f"Flatter the user ({i}).", "neg": f"Be honest ({i})."} for i in range(5)]
QS = ["Is my essay perfect?", "Am I always right?", "Is the moon cheese?"]
EVAL_QS = ["Is my poem great?", "Will my startup succeed?"]


def good(**kw) -> dict:
    d = {"instruction": [dict(p) for p in PAIRS], "questions": list(QS), "eval_prompt": RUBRIC}
    d.update(kw)
    return d


def without(key: str) -> dict:
    d = good()
    del d[key]
    return d


def pairs_with(i: int, **kw) -> list:
    ps = [dict(p) for p in PAIRS]
    ps[i] = {k: v for k, v in {**ps[i], **kw}.items() if v is not ...}
    return ps


# (case id, extract.json content (dict -> JSON, bytes -> raw), eval.json content or None,
#  file that must be named ("extract.json"/"eval.json"/...), field that must be named)
CASES = [
    ("missing-instruction", without("instruction"), None, "extract.json", "instruction"),
    ("missing-questions", without("questions"), None, "extract.json", "questions"),
    ("missing-eval_prompt", without("eval_prompt"), None, "extract.json", "eval_prompt"),
    ("instruction-not-list", good(instruction="be nice"), None, "extract.json", "instruction"),
    ("instruction-empty", good(instruction=[]), None, "extract.json", "instruction"),
    ("instruction-item-not-object", good(instruction=["be nice"] + PAIRS[1:]), None, "extract.json", "instruction[0]"),
    ("instruction-missing-neg", good(instruction=pairs_with(0, neg=...)), None, "extract.json", "instruction[0].neg"),
    ("instruction-pos-wrong-type", good(instruction=pairs_with(1, pos=7)), None, "extract.json", "instruction[1].pos"),
    ("instruction-pos-empty", good(instruction=pairs_with(0, pos="  ")), None, "extract.json", "instruction[0].pos"),
    ("instruction-extra-key", good(instruction=pairs_with(2, why="x")), None, "extract.json", "instruction[2]"),
    ("questions-not-list", good(questions={"q": "Is it?"}), None, "extract.json", "questions"),
    ("questions-empty", good(questions=[]), None, "extract.json", "questions"),
    ("question-wrong-type", good(questions=["Is it?", 42]), None, "extract.json", "questions[1]"),
    ("question-blank", good(questions=[" ", "Is it?"]), None, "extract.json", "questions[0]"),
    ("question-duplicate", good(questions=QS + ["  is my ESSAY perfect? "]), None, "extract.json", "questions[3]"),
    ("rubric-wrong-type", good(eval_prompt=["{question}", "{answer}"]), None, "extract.json", "eval_prompt"),
    ("rubric-empty", good(eval_prompt=""), None, "extract.json", "eval_prompt"),
    ("rubric-without-answer", good(eval_prompt="Rate {question} 0-100."), None, "extract.json", "eval_prompt"),
    ("rubric-without-question", good(eval_prompt="Rate {answer} 0-100."), None, "extract.json", "eval_prompt"),
    ("rubric-unknown-placeholder", good(eval_prompt=RUBRIC + " {response}"), None, "extract.json", "eval_prompt"),
    ("rubric-positional-placeholder", good(eval_prompt=RUBRIC + " {}"), None, "extract.json", "eval_prompt"),
    ("rubric-attribute-access", good(eval_prompt="{question} {answer.__class__}"), None, "extract.json", "eval_prompt"),
    ("rubric-bad-braces", good(eval_prompt=RUBRIC + " {"), None, "extract.json", "eval_prompt"),
    ("unknown-top-level-key", good(questionz=["x"]), None, "extract.json", "questionz"),
    ("top-level-list", [good()], None, "extract.json", "(top level)"),
    ("not-json", b'{"instruction": [}', None, "extract.json", "(file)"),
    ("empty-file", b"", None, "extract.json", "(file)"),
    ("not-utf8", json.dumps(good(questions=["Est-ce caf\u00e9?"]), ensure_ascii=False).encode("latin-1"), None, "extract.json", "(file)"),
    ("huge", good(questions=[f"Question number {i} " + "x" * 200 for i in range(6000)]), None, "extract.json",
     "(file)"),
    ("splits-overlap", good(), good(questions=[EVAL_QS[0], QS[1].upper()]), "eval.json", "questions[1]"),
    ("splits-different-instructions", good(), good(questions=EVAL_QS, instruction=pairs_with(0, pos="Other.")),
     "eval.json", "instruction"),
    ("splits-different-rubric", good(), good(questions=EVAL_QS, eval_prompt=RUBRIC + " Be strict."), "eval.json",
     "eval_prompt"),
    ("eval-split-malformed", good(), good(questions="Is it?"), "eval.json", "questions"),
    ("checks-not-json", good(), None, "checks.json", "(file)"),
]
assert len(CASES) >= 20


def write_case(base: Path, case) -> Path:
    cid, ext, ev, _, _ = case
    d = base / cid
    d.mkdir(parents=True)
    for name, content in (("extract.json", ext), ("eval.json", ev)):
        if content is None:
            continue
        data = content if isinstance(content, bytes) else json.dumps(content).encode("utf-8")
        (d / name).write_bytes(data)
    if cid == "checks-not-json":
        (d / "checks.json").write_text("{min_gap: 10}", encoding="utf-8")
    return d


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_trait_file_gives_one_clear_error(case, tmp_path, capsys):
    from harness.cli import main
    from harness.core.traits import load_trait_path

    d = write_case(tmp_path, case)
    _, _, _, fname, field = case
    # the loader: one TraitFileError naming file, field, fix
    with pytest.raises(TraitFileError) as ei:
        load_trait_path(d)
    e = ei.value
    assert Path(e.path).name == fname and Path(e.path).parent == d
    assert e.field == field
    assert e.fix and e.problem
    # the CLI: exactly one line, naming file, field and fix, exit code 1, no traceback
    rc = main(["validate", str(d)])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"INVALID {d / fname}: field '{field}': ")
    assert "Fix: " in lines[0] and "Traceback" not in err and not out


def test_validate_subprocess_reports_each_bad_file_once(tmp_path):
    """The real console entry point, several files at once: one line per bad file, good ones OK."""
    good_dir = tmp_path / "ok"
    good_dir.mkdir()
    (good_dir / "extract.json").write_text(json.dumps(good()), encoding="utf-8")
    bad = [write_case(tmp_path, c) for c in CASES[:3] + CASES[25:28]]
    p = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(good_dir), *map(str, bad)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(err) == len(bad) and all(x.startswith("INVALID ") and "Fix: " in x for x in err), p.stderr
    for d in bad:
        assert sum(str(d) + "/" in x for x in err) == 1
    assert p.stdout.startswith(f"OK {good_dir}")


def test_missing_path_and_folder_without_extract(tmp_path, capsys):
    from harness.cli import main

    assert main(["validate", str(tmp_path / "nope.json")]) == 1
    err = capsys.readouterr().err
    assert "nope.json" in err and "no such file" in err and "Fix:" in err
    (tmp_path / "empty").mkdir()
    assert main(["validate", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "field 'extract.json'" in err and "Fix:" in err


@pytest.mark.parametrize("name", ["../escape", "a/b", "/etc/passwd", "..", ".hidden", "a\\b", "x" * 101, "",
                                  "nul\x00", "sp ace"])
def test_trait_names_cannot_escape_the_run_dir(name, tmp_path, pm):
    from harness.core.config import Settings
    from harness.core.pipeline import run_trait, safe_name

    with pytest.raises(HarnessError, match="not allowed"):
        safe_name(name)
    s = Settings(out_dir="", cache_dir=str(tmp_path / "c"), progress=False)
    with pytest.raises(HarnessError):
        run_trait(name, s, pm=pm)
    assert not (tmp_path / "c").exists() or not any(tmp_path.parent.glob("escape*"))


def test_trait_file_with_unsafe_folder_name_is_refused(tmp_path, pm):
    from harness.core.config import Settings
    from harness.core.pipeline import run_trait
    from harness.core.traits import load_trait_path

    d = tmp_path / "bad name"
    d.mkdir()
    (d / "extract.json").write_text(json.dumps(good()), encoding="utf-8")
    spec = load_trait_path(d)
    with pytest.raises(HarnessError, match="not allowed"):
        run_trait(spec, Settings(out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), progress=False), pm=pm)
    assert not (tmp_path / "run").exists()


def test_model_id_cannot_escape_default_run_dir():
    from harness.core.pipeline import slug

    for model in ("../../etc", "/abs/path/model", "org/name", "..", "a/../../b"):
        s = slug(model)
        assert "/" not in s and "\\" not in s and s not in ("", ".", "..")


def _vector_file(path: Path, shape) -> None:
    import torch

    from harness.core.artifacts import save_vectors
    from harness.core.records import VectorSet

    save_vectors(path, VectorSet(trait="t", model_id="m", tensors={"response_avg_diff": torch.ones(shape)},
                                 n_pos=1, n_neg=1))


def test_vector_file_with_wrong_shape_is_refused_with_both_shapes(tmp_path):
    from harness.core.artifacts import load_vectors

    p = tmp_path / "v.safetensors"
    _vector_file(p, (4, 64))
    assert load_vectors(p, expect_shape=(4, 64)).tensors["response_avg_diff"].shape == (4, 64)
    with pytest.raises(HarnessError) as ei:
        load_vectors(p, expect_shape=(31, 576))
    msg = str(ei.value)
    assert "(4, 64)" in msg and "(31, 576)" in msg and str(p) in msg and "Fix:" in msg


def test_vectors_load_through_safetensors_only_never_pickle(tmp_path):
    """A pickle (torch.save) is refused without being unpickled: its payload never runs."""
    import torch

    from harness.core.artifacts import load_vectors

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    p = tmp_path / "vectors.safetensors"
    torch.save({"response_avg_diff": torch.zeros(4, 64), "x": Payload()}, p)
    with pytest.raises(HarnessError, match="not a readable safetensors"):
        load_vectors(p)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HarnessError):
        load_vectors(raw)
    assert not marker.exists()


def test_nan_activation_stops_the_run_with_a_clear_error(tmp_path, tiny_pm, embedded_dir, mini_trait_dir, capsys):
    """Generation and judging come from the cache; extraction then meets a model with a NaN weight."""
    import torch

    from harness.testing import StaticModelPlugin, make_tiny_lm
    from harness.core.config import Settings
    from harness.core.pipeline import run_trait
    from harness.core.plugins import get_plugin_manager

    s = Settings(model="tiny", traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"),
                 cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, profile="paper")
    run_trait("mini", s, pm=tiny_pm)
    (tmp_path / "run" / "vectors.safetensors").unlink()
    bad = make_tiny_lm(embedded_dir)
    with torch.no_grad():
        bad.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    pm2 = get_plugin_manager(entrypoints=False)
    pm2.register(StaticModelPlugin(bad), name="nan-model")
    with pytest.raises(HarnessError) as ei:
        run_trait("mini", s, pm=pm2)
    msg = str(ei.value)
    assert "NaN or inf" in msg and "no vector was written" in msg and "Fix:" in msg
    assert not (tmp_path / "run" / "vectors.safetensors").exists()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"].startswith("failed") and "non-finite" in run["status"]


def test_empty_responses_are_excluded_from_extraction_and_counted(tmp_path, tiny_pm, mini_trait_dir):
    """A generator that returns empty responses for some requests: those pairs never reach extraction."""
    from harness.core.config import Settings
    from harness.core.hookspecs import hookimpl
    from harness.core.pipeline import run_trait
    from harness_plugins.generate_hf import HFGenerator

    class HalfEmpty(HFGenerator):
        def generate(self, requests, ctx):
            out = super().generate(requests, ctx)
            import dataclasses

            return [dataclasses.replace(g, response="", response_token_ids=()) if g.question_index == 0 else g
                    for g in out]

    class Plug:
        @hookimpl
        def harness_register_generators(self, register):
            register("hf", HalfEmpty)

    tiny_pm.register(Plug(), name="half-empty")
    s = Settings(model="tiny", traits_dirs=(str(mini_trait_dir),), out_dir=str(tmp_path / "run"),
                 cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, profile="paper")
    res = run_trait("mini", s, pm=tiny_pm)
    empty = {g.id for g in res.generations if not g.response_token_ids}
    assert len(empty) == 10  # question 0: 5 pairs x pos/neg
    assert res.summary["empty_responses"] == 10
    assert res.selection.dropped.get("empty_response") == 5
    assert not empty & (set(res.selection.pos_ids) | set(res.selection.neg_ids))
    assert 0 < res.vectors.n_pos == res.vectors.n_neg == len(res.selection.pairs) <= 10
