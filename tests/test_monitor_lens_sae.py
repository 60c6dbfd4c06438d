"""Monitoring statistics, projections, logit lens on hand-built vectors, SAE reading with a built SAE,
and layer recommendation."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from harness.core.errors import HarnessError
from harness.analysis.layers import recommend_layer
from harness.analysis.metrics import auroc, cohens_d
from harness.analysis.monitor import project_records, separation


# -- statistics -----------------------------------------------------------------------------------
def test_auroc_on_constructed_data():
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1, 2], [3, 4, 5]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    # interleaved: pos {1,3}, neg {2,4}: pairs (1>2 no,1>4 no,3>2 yes,3>4 no) -> 1/4
    assert auroc([1, 3], [2, 4]) == 0.25
    rng = random.Random(0)
    for _ in range(20):
        p = [rng.choice(range(8)) + rng.random() * (rng.random() < 0.5) for _ in range(rng.randint(1, 9))]
        n = [rng.choice(range(8)) for _ in range(rng.randint(1, 9))]
        brute = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(p, n)) / (len(p) * len(n))
        assert auroc(p, n) == pytest.approx(brute)


def test_cohens_d_known_value():
    # means 2 and 0, both sample SDs 1 -> d = 2
    assert cohens_d([1, 2, 3], [-1, 0, 1]) == pytest.approx(2.0)
    assert cohens_d([1, 1], [1, 1]) != cohens_d([1, 1], [1, 1])  # NaN when both constant and equal


def test_separation_per_layer():
    pos = [[0.0, 1.0, 5.0], [0.0, 2.0, 6.0]]
    neg = [[0.0, 3.0, 1.0], [0.0, 4.0, 2.0]]
    rows = separation(pos, neg)
    assert [r["auroc"] for r in rows] == [0.5, 0.0, 1.0]
    assert rows[2]["pos_mean"] == 5.5 and rows[2]["neg_mean"] == 1.5


def test_projection_formula_and_records(tiny_lm):
    torch = pytest.importorskip("torch")
    from harness.models.activations import example_means
    from harness.analysis.monitor import record_example, scalar_projection

    a, v = torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 2.0])
    assert scalar_projection(a, v).tolist() == [4.0]
    torch.manual_seed(0)
    vec = torch.randn(tiny_lm.num_layers + 1, tiny_lm.hidden_size)
    recs = [{"messages": [{"role": "user", "content": "Is the sky green?"}, {"role": "assistant", "content": "No, blue."}]},
            {"question": "Hello?", "answer": "Hi there", "id": "x"}]
    out = project_records(tiny_lm, recs, vec, [1, 3])
    assert [r["id"] for r in out] == [0, "x"] and set(out[0]["proj"]) == {1, 3}
    ex = record_example(tiny_lm, recs[1])
    mean = next(example_means(tiny_lm, [ex], methods=("response_avg",)))["response_avg"][0]
    want = float(mean[3] @ vec[3] / vec[3].norm())
    assert out[1]["proj"][3] == pytest.approx(want, abs=1e-4)
    with pytest.raises(HarnessError, match="last message must be the assistant"):
        record_example(tiny_lm, {"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(HarnessError, match=r"\(4, 64\)"):
        project_records(tiny_lm, recs, torch.zeros(5, 64), [1])


# -- logit lens -----------------------------------------------------------------------------------
def test_logit_lens_puts_the_unembedding_row_on_top(tiny_lm):
    torch = pytest.importorskip("torch")
    from harness.analysis.lens import logit_lens

    W = tiny_lm.model.get_output_embeddings().weight.detach()[: len(tiny_lm.tokenizer)]
    # the row of largest norm: W_t . W_t = ||W_t||^2 >= W_j . W_t for every j (Cauchy-Schwarz)
    t = int(W.norm(dim=1).argmax())
    res = logit_lens(tiny_lm, W[t].clone(), k=5)
    for mode in ("raw", "final_norm"):  # the tiny model's final norm gain is all ones
        assert res[mode]["top"][0]["id"] == t, mode
        assert res[mode]["top"][0]["token"]
    neg = logit_lens(tiny_lm, -W[t].clone(), k=5)
    assert neg["raw"]["bottom"][0]["id"] == t and neg["final_norm"]["bottom"][0]["id"] == t
    assert res["raw"]["top"][0]["logit"] == pytest.approx(float(W[t] @ W[t]), rel=1e-4)


def test_logit_lens_final_norm_uses_the_gain(tiny_lm):
    """With a gain that zeroes every channel but one, the normed lens ranks by that channel alone."""
    torch = pytest.importorskip("torch")
    from harness.analysis.lens import find_final_norm, logit_lens

    norm = find_final_norm(tiny_lm.model)
    W = tiny_lm.model.get_output_embeddings().weight.detach()[: len(tiny_lm.tokenizer)]
    old = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.zero_()
            norm.weight[5] = 1.0
        v = torch.randn(tiny_lm.hidden_size)
        res = logit_lens(tiny_lm, v, k=3)
        want = int((W[:, 5] * float(torch.sign(v[5]))).argmax())
        assert res["final_norm"]["top"][0]["id"] == want
    finally:
        with torch.no_grad():
            norm.weight.copy_(old)


def test_logit_lens_shape_error(tiny_lm):
    torch = pytest.importorskip("torch")
    from harness.analysis.lens import logit_lens

    with pytest.raises(HarnessError, match=r"\(63,\).*\(64,\)"):
        logit_lens(tiny_lm, torch.zeros(63))


# -- SAE ------------------------------------------------------------------------------------------
def _write_sae(path, W_dec, hook="blocks.4.hook_resid_post", layout="v6"):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    d_sae, d_in = W_dec.shape
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": "standard", "dtype": "float32"}
    if layout == "v6":
        cfg["metadata"] = {"hook_name": hook, "model_name": "tiny"}
    else:
        cfg["hook_name"] = hook
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_dec": W_dec.contiguous(), "W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae),
               "b_dec": torch.zeros(d_in)}, str(path / "sae_weights.safetensors"))
    return path


@pytest.mark.parametrize("layout", ["v6", "flat"])
def test_sae_ranks_the_planted_latent_first(tmp_path, layout):
    torch = pytest.importorskip("torch")
    from harness.analysis.sae import load_sae, read_vector

    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 32, generator=g)
    vec = torch.randn(8, 32, generator=g)  # hidden_states 0..7 (5 is an inner layer: before the final norm)
    W[137] = vec[5] * 3.0  # planted: same direction as the layer-5 vector
    W[42] = -vec[5]  # anti-aligned
    sae = load_sae(_write_sae(tmp_path / "sae", W, layout=layout))
    assert (sae.d_in, sae.d_sae, sae.layer) == (32, 256, 5)
    res = read_vector(sae, vec)  # layer defaults to the SAE's: blocks.4.hook_resid_post = hidden_states[5]
    assert res["layer"] == 5
    assert res["top"][0]["latent"] == 137 and res["top"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert res["bottom"][0]["latent"] == 42 and res["bottom"][0]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert res["top"][1]["cosine"] < 0.9


def test_sae_layer_mapping_and_mismatch(tmp_path):
    torch = pytest.importorskip("torch")
    from harness.analysis.sae import hook_for_layer, layer_for_hook, load_sae, read_vector

    assert hook_for_layer(20) == "blocks.19.hook_resid_post"
    assert layer_for_hook("blocks.19.hook_resid_post") == 20
    assert layer_for_hook("blocks.20.hook_resid_pre") == 20
    assert layer_for_hook("blocks.3.hook_mlp_out") is None
    with pytest.raises(HarnessError):
        hook_for_layer(0)
    W = torch.randn(16, 8)
    sae = load_sae(_write_sae(tmp_path / "s", W))
    vec = torch.randn(6, 8)
    with pytest.raises(HarnessError, match=r"index 3 .*hidden_states index 5.*Fix: read vectors\[5\]"):
        read_vector(sae, vec, 3)
    with pytest.warns(UserWarning, match="index 3"):
        read_vector(sae, vec, 3, allow_layer_mismatch=True)
    with pytest.raises(HarnessError, match="d_in=8"):
        read_vector(sae, torch.randn(6, 9))
    mlp = load_sae(_write_sae(tmp_path / "m", W, hook="blocks.4.hook_mlp_out"))
    with pytest.raises(HarnessError, match="not the residual stream"):
        read_vector(mlp, vec, 5)


def test_sae_bad_files(tmp_path):
    torch = pytest.importorskip("torch")
    from harness.analysis.sae import load_sae

    with pytest.raises(HarnessError, match="cfg.json"):
        load_sae(tmp_path)
    p = _write_sae(tmp_path / "t", torch.randn(16, 8))
    cfg = json.loads((p / "cfg.json").read_text())
    cfg["d_in"], cfg["d_sae"] = 16, 8
    (p / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HarnessError, match="transposed"):
        load_sae(p)


# -- layer recommendation -------------------------------------------------------------------------
def test_recommend_layer_prefers_sweep_then_separation_then_norm():
    norms = [0.0, 1, 2, 9, 3, 100.0]  # index 5 is after the final norm: never chosen
    r = recommend_layer(norms)
    assert (r["layer"], r["basis"]) == (3, "norm")
    mon = {"split": "eval", "n_pos": 4, "n_neg": 4, "layers": [
        {"layer": i, "auroc": a, "cohens_d": d} for i, (a, d) in enumerate(
            [(0.5, 0), (0.6, 0.2), (0.95, 2.0), (0.9, 3.0), (0.8, 1.0), (1.0, 5.0)])]}
    r = recommend_layer(norms, mon)
    assert (r["layer"], r["basis"]) == (2, "separation") and "held-out" in r["explanation"]
    sweep = {"scale": "raw", "positions": "response", "cells": [
        {"layer": 2, "coef": 0.0, "trait_mean": 10.0, "coherence_mean": 80.0},
        {"layer": 2, "coef": 2.0, "trait_mean": 30.0, "coherence_mean": 70.0},
        {"layer": 4, "coef": 0.0, "trait_mean": 10.0, "coherence_mean": 80.0},
        {"layer": 4, "coef": 2.0, "trait_mean": 60.0, "coherence_mean": 60.0},
        {"layer": 4, "coef": 4.0, "trait_mean": 90.0, "coherence_mean": 20.0},  # incoherent: ignored
    ]}
    r = recommend_layer(norms, mon, sweep, min_coherence=50)
    assert (r["layer"], r["basis"]) == (4, "sweep")
    assert "+50.0" in r["explanation"] and "separation favours 2" in r["explanation"]
    r = recommend_layer(norms, mon, sweep, min_coherence=75)
    assert r["basis"] == "separation" and "does not decide" in r["explanation"]
