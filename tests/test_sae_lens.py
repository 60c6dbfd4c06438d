"""SAEs built and saved with the real SAELens package, read back by ``persona-harness sae``.

SAELens pulls about 45 packages (transformer-lens, datasets, wandb, ...), so it lives in the optional
``sae`` extra and the ``tox -e sae`` environment; without it these tests skip.
"""

from __future__ import annotations

import json

import pytest

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install 'persona-harness[sae]' "
                                                  "or tox -e sae)")

D_IN, D_SAE, N_LAYERS = 16, 48, 4
HOOK_LAYER = 2  # hidden_states index 2 = blocks.1.hook_resid_post
PLANTED = 7  # the latent whose decoder row is the vector's direction


def _build(arch: str, v):
    """An SAELens SAE of ``arch`` reading blocks.1.hook_resid_post, random weights, latent PLANTED = v."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg_cls, cls = {"standard": (StandardSAEConfig, StandardSAE), "jumprelu": (JumpReLUSAEConfig, JumpReLUSAE)}[arch]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=f"blocks.{HOOK_LAYER - 1}.hook_resid_post",
                                                                   model_name="tiny")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g))
        sae.W_dec[PLANTED] = v * 3.0
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.1)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.8)
    return sae


@pytest.fixture
def run_dir(tmp_path):
    import torch

    from harness.core.artifacts import atomic_write_json, save_vectors
    from harness.core.records import VectorSet

    g = torch.Generator().manual_seed(0)
    vec = torch.randn(N_LAYERS + 1, D_IN, generator=g)
    d = tmp_path / "run"
    save_vectors(d / "vectors.safetensors", VectorSet("t", "tiny", {"response_avg_diff": vec}, 1, 1))
    atomic_write_json(d / "run.json", {"format": "persona-harness-run/1", "status": "ok", "trait": {"name": "t"},
                                       "model": {"id": "tiny"}, "config": {}, "summary": {}})
    return d, vec


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_saelens_sae_is_read_back_by_the_sae_command(arch, run_dir, tmp_path, capsys):
    import torch

    from harness.analysis.sae import encode, load_sae
    from harness.cli.main import main

    d, vec = run_dir
    sae = _build(arch, vec[HOOK_LAYER])
    folder = tmp_path / f"sae-{arch}"
    sae.save_model(folder)
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == arch

    assert main(["sae", str(d), "--sae", str(folder), "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["architecture"] == arch and res["hook_name"] == "blocks.1.hook_resid_post"
    assert res["layer"] == res["sae_layer"] == HOOK_LAYER and res["d_sae"] == D_SAE
    assert res["top"][0]["latent"] == PLANTED and res["top"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    # the cosines are those of SAELens's own decoder rows with the vector
    W = sae.W_dec.detach()
    v = vec[HOOK_LAYER]
    cos = (W @ v) / (W.norm(dim=1) * v.norm())
    want = torch.topk(cos, 5)
    assert [x["latent"] for x in res["top"]] == want.indices.tolist()
    assert [x["cosine"] for x in res["top"]] == pytest.approx(want.values.tolist(), abs=1e-5)
    # the encoder: what SAELens's encode gives for the vector, JumpReLU thresholds included
    with torch.no_grad():
        theirs = sae.encode(v[None])[0]
    assert res["encoded"]["active"] == int((theirs > 0).sum())
    top = torch.topk(theirs, min(5, int((theirs > 0).sum())))
    assert [x["latent"] for x in res["encoded"]["top"]] == top.indices.tolist()
    # and for a batch of activations
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(encode(load_sae(folder), x), sae.encode(x), atol=1e-5, rtol=1e-5)
    # text output names the architecture
    assert main(["sae", str(d), "--sae", str(folder), "-k", "5", "--force"]) == 0
    assert f"({arch})" in capsys.readouterr().out


def test_jumprelu_thresholds_matter(run_dir, tmp_path):
    """Reading a JumpReLU SAE as if it were a ReLU one would switch on latents SAELens keeps off."""
    import torch

    from harness.analysis.sae import encode, load_sae

    _, vec = run_dir
    sae = _build("jumprelu", vec[HOOK_LAYER])
    sae.save_model(tmp_path / "jr")
    loaded = load_sae(tmp_path / "jr")
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = sae.encode(x)
    as_relu = torch.relu((x - loaded.b_dec) @ loaded.W_enc + loaded.b_enc)
    assert int((as_relu > 0).sum()) > int((theirs > 0).sum())
    torch.testing.assert_close(encode(loaded, x), theirs, atol=1e-5, rtol=1e-5)
