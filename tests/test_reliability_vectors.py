"""Vector sanity wherever a vector is read, in every command.

A vector file with NaN, inf, an all-zero layer or the wrong shape is refused by ``load_vectors`` (the
one reader) with the bad layers or both shapes named -- in layers, lens, monitor, report, steer, sweep,
sae and export alike. Out-of-range layers and counts are one-line errors. An SAE hooked at the last
block's ``hook_resid_post`` is not matched to the vector index after the final norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from harness.core.errors import HarnessError  # noqa: E402
from reliability_run import PLUGIN, cli, copy_run, error_lines, make_run  # noqa: E402

L1, H = 4, 64  # the tiny model: 3 layers -> hidden_states 0..3, width 64


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_lm):
    return make_run(tmp_path_factory.mktemp("vectors"), tiny_lm)


def _bad(kind: str):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(L1, H, generator=g)
    if kind == "nan":
        v[2, 5] = float("nan")
        return v, "NaN or inf at layers 2"
    if kind == "inf":
        v[1, 0], v[3, 1] = float("inf"), -float("inf")
        return v, "NaN or inf at layers 1, 3"
    if kind == "zero":
        v[3] = 0.0
        return v, "all zeros at layers 3"
    if kind == "shape":
        return torch.randn(L1 + 2, H, generator=g), f"shape ({L1 + 2}, {H})"
    raise AssertionError(kind)


def _write(run_dir: Path, v) -> None:
    from harness.core.artifacts import save_vectors
    from harness.core.records import VectorSet

    save_vectors(run_dir / "vectors.safetensors",
                 VectorSet(trait="mini", model_id="tiny", tensors={"response_avg_diff": v}, n_pos=2, n_neg=2))


@pytest.fixture
def sae_dir(tmp_path):
    from safetensors.torch import save_file

    def make(hook: str) -> Path:
        d = tmp_path / f"sae-{hook}"
        d.mkdir()
        W = torch.randn(32, H)
        (d / "cfg.json").write_text(json.dumps({"d_in": H, "d_sae": 32, "hook_name": hook}))
        save_file({"W_dec": W.contiguous()}, str(d / "sae_weights.safetensors"))
        return d

    return make


COMMANDS = {
    "layers": lambda r, c: ["layers", r],
    "lens": lambda r, c: ["lens", r, "--layer", "1", *PLUGIN, *c],
    "monitor": lambda r, c: ["monitor", r, *PLUGIN, *c],
    "monitor --input": lambda r, c: ["monitor", r, "--input", r / "generations.jsonl", "--layer", "1", *PLUGIN, *c],
    "report": lambda r, c: ["report", r, "--no-compute"],
    "steer": lambda r, c: ["steer", r, "--layer", "1", "--questions", "1", "--max-new-tokens", "2", "--no-progress",
                           *PLUGIN, *c],
    "sweep": lambda r, c: ["sweep", r, "--layers", "1", "--coefs", "1", "--questions", "1", "--max-new-tokens", "2",
                           "--no-progress", *PLUGIN, *c],
    "sae": None,  # needs an SAE folder: built in the test
    "export": lambda r, c: ["export", r, "--format", "pt"],
}


@pytest.mark.parametrize("kind", ["nan", "inf", "zero", "shape"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_broken_vector_naming_what_is_wrong(base_run, tmp_path, capsys, sae_dir, command,
                                                                  kind):
    run = copy_run(base_run, tmp_path / "run")
    v, needle = _bad(kind)
    _write(run, v)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    c = ["--cache-dir", tmp_path / "c"]
    argv = COMMANDS[command](run, c) if command != "sae" else ["sae", run, "--sae", sae_dir("blocks.0.hook_resid_post")]
    rc, out, err = cli(argv, capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "vectors.safetensors" in lines[0] and needle in lines[0] and "Fix:" in lines[0], lines[0]
    if kind == "shape":
        assert f"({L1}, {H})" in lines[0]  # both shapes
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # nothing written from a broken vector


def test_load_vectors_checks_without_a_run_dir(tmp_path):
    from harness.core.artifacts import load_vectors

    p = tmp_path / "v.safetensors"
    _write(tmp_path, _bad("zero")[0])
    with pytest.raises(HarnessError, match="all zeros at layers 3"):
        load_vectors(tmp_path / "vectors.safetensors")
    v = torch.randn(L1, H)
    v[0] = 0.0  # the embedding-output index may be zero (e.g. a last-prompt-token difference)
    _write(tmp_path, v)
    assert load_vectors(tmp_path / "vectors.safetensors").tensors["response_avg_diff"].shape == (L1, H)
    from safetensors.torch import save_file

    save_file({"x": torch.randn(7)}, str(p))
    with pytest.raises(HarnessError, match=r"shape \(7,\)"):
        load_vectors(p)


@pytest.mark.parametrize("argv,needle", [
    (["steer", "{run}", "--layer", "999"], "--layer 999: this model's layers are 1..3"),
    (["steer", "{run}", "--layer", "0"], "--layer 0: this model's layers are 1..3"),
    (["lens", "{run}", "--layer", "999"], "--layer 999: this model's layers are 0..3"),
    (["lens", "{run}", "-k", "-5"], "-k -5: give a number of tokens per list >= 1"),
    (["lens", "{run}", "-k", "0"], "-k 0"),
    (["monitor", "{run}", "--input", "{run}/generations.jsonl", "--layer", "7"], "--layer 7"),
    (["sweep", "{run}", "--layers", "1,99"], "--layers 99"),
    (["sweep", "{run}", "--coefs=nan"], "not finite"),
    (["steer", "{run}", "--layer", "1", "--coef", "x"], "not a comma-separated list"),
])
def test_out_of_range_layers_and_counts_are_one_line_errors(base_run, tmp_path, capsys, argv, needle):
    run = copy_run(base_run, tmp_path / "run")
    args = [a.format(run=run) for a in argv] + [*PLUGIN, "--cache-dir", tmp_path / "c"]
    rc, out, err = cli(args, capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err[-3000:]


def test_sae_at_the_last_block_is_not_matched_to_the_index_after_the_final_norm(base_run, tmp_path, capsys, sae_dir):
    run = copy_run(base_run, tmp_path / "run")
    last = sae_dir("blocks.2.hook_resid_post")  # = hidden_states index 3 = num_layers: read after the final norm
    rc, out, err = cli(["sae", run, "--sae", last], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "before the final norm" in lines[0] and "Fix:" in lines[0]
    assert not (run / "sae.json").exists()
    with pytest.warns(UserWarning, match="after the final norm"):
        rc, out, err = cli(["sae", run, "--sae", last, "--allow-layer-mismatch"], capsys)
    assert rc == 0
    inner = sae_dir("blocks.1.hook_resid_post")  # hidden_states index 2: an inner layer
    rc, out, err = cli(["sae", run, "--sae", inner, "--force"], capsys)
    assert rc == 0 and json.loads((run / "sae.json").read_text())["layer"] == 2
    rc, out, err = cli(["sae", run, "--sae", inner, "-k", "0"], capsys)
    assert rc == 1 and "-k 0" in err
