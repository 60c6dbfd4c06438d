"""Run history: every run a new folder RUNS_DIR/<model>/<trait>/<run-id>, a `latest` file naming the
newest (no symlinks), `persona-harness runs` and `persona-harness diff`, and what run.json records.
The pipeline runs for real on a tiny random model (mechanics only)."""

from __future__ import annotations

import datetime as dt
import json
from importlib.metadata import version

import pytest

from harness.cli.main import main
from harness.core.config import Settings
from harness.core.errors import HarnessError
from harness.core.pipeline import run_trait
from harness.core.runs import LATEST, allocate_run_dir, is_run_id, list_runs, read_latest, resolve_run_dir


def _settings(tmp_path, mini_trait_dir, **kw):
    base = dict(model="tiny", traits_dirs=(str(mini_trait_dir),), runs_dir=str(tmp_path / "runs"),
                cache_dir=str(tmp_path / "cache"), trait_threshold=0.0, coherence_threshold=0.0,
                judge_min_mass=0.0, max_new_tokens=4, progress=False, profile="paper")
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_lm):
    """(root, plugin manager, traits dir, first run, second run): two runs of one trait, once per module."""
    from harness.core.plugins import get_plugin_manager
    from harness.testing import StaticModelPlugin

    root = tmp_path_factory.mktemp("history")
    traits = root / "traits" / "mini"
    traits.mkdir(parents=True)
    base = {"instruction": [{"pos": f"Agree with everything ({i}).", "neg": f"Be candid ({i})."} for i in range(2)],
            "eval_prompt": "How much does this answer flatter the user, 0-100?\nQ: {question}\nA: {answer}"}
    (traits / "extract.json").write_text(json.dumps({**base, "questions": ["Is 2+2=5?", "Is my essay perfect?"]}))
    pm = get_plugin_manager(entrypoints=False)
    pm.register(StaticModelPlugin(tiny_lm), name="test-static-model")
    first = run_trait("mini", _settings(root, traits.parent), pm=pm)
    second = run_trait("mini", _settings(root, traits.parent, seed=1, temperature=0.7), pm=pm)
    return root, pm, traits.parent, first, second


@pytest.fixture
def two_runs(history):
    return history[3], history[4]


@pytest.fixture
def tmp_path(history):  # the module's history root (the runs live under tmp_path / "runs")
    return history[0]


def test_each_run_gets_its_own_folder_and_latest_names_the_newest(tmp_path, two_runs):
    first, second = two_runs
    trait_dir = tmp_path / "runs" / "tiny" / "mini"
    a, b = first.run_dir, second.run_dir
    assert a != b and a.parent == b.parent == trait_dir and is_run_id(a.name) and is_run_id(b.name)
    assert sorted(p.name for p in trait_dir.iterdir() if p.is_dir()) == sorted([a.name, b.name])
    for d in (a, b):  # the first run is kept whole: nothing overwrote it
        for f in ("run.json", "generations.jsonl", "judgments.jsonl", "selection.json", "vectors.safetensors"):
            assert (d / f).is_file(), (d, f)
    latest = trait_dir / LATEST
    assert latest.is_file() and not latest.is_symlink() and latest.read_text() == b.name + "\n"
    assert read_latest(trait_dir) == b
    assert resolve_run_dir(trait_dir) == resolve_run_dir(latest) == resolve_run_dir(b) == b
    assert resolve_run_dir(a) == a
    rj = json.loads((b / "run.json").read_text())
    assert rj["run"]["id"] == b.name and rj["run"]["dir"] == str(b)
    assert dt.datetime.fromisoformat(rj["run"]["created"]).tzinfo is not None
    assert rj["summary"]["files"]["vectors.safetensors"] == str(b / "vectors.safetensors")


def test_out_writes_exactly_that_folder_and_leaves_latest_alone(history, two_runs):
    root, pm, traits, _, _ = history
    out = root / "exact"
    res = run_trait("mini", _settings(root, traits, out_dir=str(out)), pm=pm)
    assert res.run_dir == out and (out / "vectors.safetensors").is_file()
    assert [p.name for p in out.iterdir() if p.is_dir()] == []  # no run-id folder inside --out
    assert json.loads((out / "run.json").read_text())["run"]["id"] is None
    assert read_latest(root / "runs" / "tiny" / "mini") == two_runs[1].run_dir
    assert resolve_run_dir(out) == out
    assert str(out) not in [str(r.path) for r in list_runs(root / "runs")]


def test_run_json_records_versions_device_and_dtype(two_runs):
    env = json.loads((two_runs[0].run_dir / "run.json").read_text())["environment"]
    from harness import __version__

    assert env["harness"] == __version__
    for dist in ("torch", "transformers", "tokenizers"):
        assert env[dist] == version(dist)
    assert env["device"] == "cpu" and env["dtype"] == "torch.float32"
    assert env["python"] and env["platform"]


def test_run_ids_sort_in_time_and_never_collide(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ids")
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    a = allocate_run_dir(tmp_path, now)
    b = allocate_run_dir(tmp_path, now)
    c = allocate_run_dir(tmp_path, now + dt.timedelta(seconds=1))
    assert (a.name, b.name, c.name) == ("20300102-030405", "20300102-030405-2", "20300102-030406")
    assert sorted([c.name, a.name]) == [a.name, c.name]


def test_a_bad_latest_file_is_a_one_line_error_naming_it(tmp_path, two_runs):
    trait_dir = tmp_path / "runs" / "tiny" / "mini"
    good = (trait_dir / LATEST).read_text()
    try:
        (trait_dir / LATEST).write_text("../../etc\n")
        with pytest.raises(HarnessError, match=r"latest: '\.\./\.\./etc' is not a run id"):
            resolve_run_dir(trait_dir)
        (trait_dir / LATEST).write_text("20000101-000000\n")
        with pytest.raises(HarnessError, match="names run 20000101-000000.*does not exist"):
            read_latest(trait_dir)
    finally:
        (trait_dir / LATEST).write_text(good)


def test_runs_command_lists_the_history(tmp_path, two_runs, capsys):
    first, second = two_runs
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("tiny")]
    assert len(lines) == 2
    assert first.run_dir.name in lines[0] and "(latest)" not in lines[0]
    assert f"{second.run_dir.name} (latest)" in lines[1] and "ok" in lines[1]
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "--trait", "mini", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in data["runs"]] == [first.run_dir.name, second.run_dir.name]
    assert [r["latest"] for r in data["runs"]] == [False, True]
    assert data["runs"][1]["pairs_kept"] == second.summary["pairs_kept"]
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "--model", "other"]) == 0
    assert "no runs" in capsys.readouterr().out
    assert [r.run_id for r in list_runs(tmp_path / "runs")] == [first.run_dir.name, second.run_dir.name]


def test_diff_compares_vectors_scores_pairs_and_settings(tmp_path, two_runs, capsys):
    from harness.analysis.metrics import cosine

    first, second = two_runs
    assert main(["diff", str(first.run_dir), str(tmp_path / "runs" / "tiny" / "mini"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["a"]["dir"] == str(first.run_dir) and d["b"]["dir"] == str(second.run_dir)  # the trait folder: latest
    va = first.vectors.tensors["response_avg_diff"]
    vb = second.vectors.tensors["response_avg_diff"]
    cos = d["vectors"]["response_avg_diff"]["cosine"]
    assert len(cos) == va.shape[0] == 4
    assert cos == pytest.approx([cosine(va[i], vb[i]) for i in range(4)], abs=1e-5)
    assert set(d["vectors"]) == {"response_avg_diff", "prompt_avg_diff", "prompt_last_diff"}
    assert d["settings"]["seed"] == {"a": 0, "b": 1} and d["settings"]["temperature"] == {"a": 1.0, "b": 0.7}
    assert "runs_dir" not in d["settings"] and "out_dir" not in d["settings"]
    gap = d["scores"]["extract.trait_pos_mean"]
    assert gap["a"] == first.summary["trait_pos_mean"] and gap["b"] == second.summary["trait_pos_mean"]
    assert gap["delta"] == pytest.approx(second.summary["trait_pos_mean"] - first.summary["trait_pos_mean"], abs=1e-6)
    assert d["pairs"]["pairs_kept"]["delta"] == second.summary["pairs_kept"] - first.summary["pairs_kept"]
    assert d["trait_changed"] is False
    # the table
    assert main(["diff", str(first.run_dir), str(second.run_dir)]) == 0
    text = capsys.readouterr().out
    assert "vector response_avg_diff: per-layer cosine" in text and "settings.seed" in text
    assert "extract.trait_pos_mean" in text and "pairs_kept" in text
    # a run against itself: cosine 1 everywhere, nothing differs
    assert main(["diff", str(first.run_dir), str(first.run_dir), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["vectors"]["response_avg_diff"]["cosine"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert same["settings"] == {} and same["environment"] == {} and same["metrics"] == {}
    assert all(v["delta"] in (0, 0.0, None) for v in same["scores"].values())


def test_diff_of_a_folder_that_is_not_a_run_is_a_one_line_error(tmp_path_factory, capsys):
    tmp_path = tmp_path_factory.mktemp("notarun")
    assert main(["diff", str(tmp_path), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no run.json" in err and len(err.strip().splitlines()) == 1


def test_run_dir_commands_follow_latest(tmp_path, two_runs, capsys):
    """Commands that take RUN_DIR accept the trait folder (its latest run)."""
    trait_dir = tmp_path / "runs" / "tiny" / "mini"
    assert main(["layers", str(trait_dir), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec.get("layer") is not None
    from harness.analysis.layers import LAYERS_FILE

    assert (two_runs[1].run_dir / LAYERS_FILE).exists() and not (trait_dir / LAYERS_FILE).exists()
