"""Model identity: aliases are canonical before profiles, cache keys and run folders; cache keys hold
a model fingerprint (local folder, hub commit, embedded GGUF) and the dtype, so a changed checkpoint,
another dtype or another revision regenerates, and an alias or an unchanged model hits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from harness.core.config import Settings, load_settings
from harness.core.errors import HarnessError
from harness.core.model_ids import (
    EMBEDDED_ID,
    canonical_model_id,
    dtype_name,
    model_fingerprint,
    model_identity,
)
from harness.core.pipeline import RunContext, run_trait
from harness.testing import make_tiny_lm

N_GEN = 30  # mini trait: 3 extraction questions x 5 instruction pairs x pos/neg
N_JUDGE = 60  # trait + coherence per generation


def save_tiny(embedded_dir, folder: Path, seed: int = 0) -> Path:
    lm = make_tiny_lm(embedded_dir, layers=1, hidden=32, seed=seed)
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


def run(tmp_path, pm, traits_dir, stages=("generate",), **flags):
    s = load_settings({"max_new_tokens": 2, "temperature": 0.0, "cache_dir": str(tmp_path / "cache"),
                       "traits_dirs": (str(traits_dir),), "progress": False, "device": "cpu", **flags},
                      environ={}, cwd=tmp_path)
    res = run_trait("mini", s, pm=pm, stages=stages)
    rj = json.loads((res.run_dir / "run.json").read_text())
    return res, rj


def produced(rj, stage="generate"):
    total = rj["counts"]["generations" if stage == "generate" else "judgments"]
    return total - rj["timings"][f"{stage}_cached"]


@pytest.mark.parametrize("alias", ["smollm2", "smollm2-135m", "SmolLM2-135M", "SmolLM2-135M-Instruct",
                                   " smollm2-135m-instruct "])
def test_every_alias_of_the_embedded_model_is_one_canonical_id_with_the_embedded_profile(alias):
    assert canonical_model_id(alias) == EMBEDDED_ID
    s = load_settings({"model": alias}, environ={})
    assert s.model == EMBEDDED_ID and s.profile_applied == "embedded"
    assert Settings(model=alias).model == EMBEDDED_ID
    assert Settings(judge_model=alias).judge_model == EMBEDDED_ID
    assert load_settings({}, environ={"PERSONA_HARNESS_MODEL": alias}).profile_applied == "embedded"


def test_other_ids_are_kept_as_given_and_not_given_the_embedded_profile():
    for mid in ("Qwen/Qwen2.5-7B-Instruct", "./ckpt", "/models/llama"):
        assert canonical_model_id(mid) == mid
        s = load_settings({"model": mid}, environ={})
        assert s.model == mid and s.profile_applied not in ("", "embedded")


def test_an_alias_shares_the_cache_keys_and_the_run_folder(tiny_pm, mini_trait_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, rja = run(tmp_path, tiny_pm, mini_trait_dir, stages=("generate", "judge"), model="smollm2")
    b, rjb = run(tmp_path, tiny_pm, mini_trait_dir, stages=("generate", "judge"), model="smollm2-135m")
    folder = Path("runs") / "smollm2" / "mini"  # the run folder (a run may add a subfolder of its own)
    assert folder in (a.run_dir, *a.run_dir.parents) and folder in (b.run_dir, *b.run_dir.parents)
    assert rjb["model"]["id"] == "smollm2" and rjb["config"]["model"] == "smollm2"
    assert produced(rja) == N_GEN and produced(rja, "judge") == N_JUDGE
    assert produced(rjb) == 0 and produced(rjb, "judge") == 0  # every record from the cache
    assert [g.cache_key for g in a.generations] == [g.cache_key for g in b.generations]
    assert rja["model"]["identity"] == rjb["model"]["identity"]
    assert rjb["model"]["identity"]["fingerprint"]["kind"] == "embedded"


def test_a_changed_checkpoint_regenerates_and_rejudges_an_unchanged_one_hits(pm, embedded_dir, mini_trait_dir,
                                                                           tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = save_tiny(embedded_dir, tmp_path / "ckpt", seed=0)
    stages = ("generate", "judge")
    _, rj1 = run(tmp_path, pm, mini_trait_dir, stages=stages, model=str(ckpt))
    assert produced(rj1) == N_GEN and produced(rj1, "judge") == N_JUDGE
    fp1 = rj1["model"]["identity"]["fingerprint"]
    assert fp1["kind"] == "local" and fp1["weight_files"] == 1 and rj1["model"]["identity"]["dtype"] == "float32"

    _, rj2 = run(tmp_path, pm, mini_trait_dir, stages=stages, model=str(ckpt))
    assert produced(rj2) == 0 and produced(rj2, "judge") == 0
    assert "load_model" not in rj2["timings"]  # nothing to compute: the model is never loaded
    assert rj2["model"]["identity"]["fingerprint"] == fp1

    save_tiny(embedded_dir, ckpt, seed=1)  # retrained: model.safetensors rewritten in place
    _, rj3 = run(tmp_path, pm, mini_trait_dir, stages=stages, model=str(ckpt))
    assert rj3["model"]["identity"]["fingerprint"] != fp1
    assert produced(rj3) == N_GEN and produced(rj3, "judge") == N_JUDGE


def test_another_dtype_regenerates_and_dtype_spellings_share_keys(pm, embedded_dir, mini_trait_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = save_tiny(embedded_dir, tmp_path / "ckpt")
    _, rj = run(tmp_path, pm, mini_trait_dir, model=str(ckpt), dtype="float32")
    assert produced(rj) == N_GEN
    _, rj = run(tmp_path, pm, mini_trait_dir, model=str(ckpt), dtype="fp32")  # auto on CPU, fp32: float32
    assert produced(rj) == 0
    _, rj = run(tmp_path, pm, mini_trait_dir, model=str(ckpt), dtype="bfloat16")
    assert produced(rj) == N_GEN and rj["model"]["identity"]["dtype"] == "bfloat16"
    assert rj["model"]["dtype"] == "torch.bfloat16"
    _, rj = run(tmp_path, pm, mini_trait_dir, model=str(ckpt), dtype="bf16")
    assert produced(rj) == 0


def test_a_checkpoint_changed_after_the_keys_were_made_is_refused_at_load(pm, embedded_dir, tmp_path):
    ckpt = save_tiny(embedded_dir, tmp_path / "ckpt")
    ctx = RunContext(settings=Settings(model=str(ckpt), device="cpu"), pm=pm)
    ctx.model_identity()
    save_tiny(embedded_dir, ckpt, seed=3)
    with pytest.raises(HarnessError, match="changed after this run made its cache keys") as e:
        ctx.model()
    assert "\n" not in str(e.value)


def _fake_hub_repo(embedded_dir, hub: Path, repo: str, commits: list[str]) -> Path:
    """A hub cache (huggingface_hub layout) holding ``repo`` at each commit, refs/main at the first."""
    root = hub / f"models--{repo.replace('/', '--')}"
    for i, c in enumerate(commits):
        save_tiny(embedded_dir, root / "snapshots" / c, seed=i)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commits[0])
    return root


def test_a_hub_id_is_keyed_by_the_commit_its_revision_resolves_to(pm, embedded_dir, mini_trait_dir, tmp_path,
                                                                  monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hub"
    c1, c2 = "1" * 40, "2" * 40
    root = _fake_hub_repo(embedded_dir, hub, "acme/tiny-chat", [c1, c2])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_fingerprint("acme/tiny-chat") == {"kind": "hub", "repo": "acme/tiny-chat", "commit": c1}
    assert model_fingerprint("acme/tiny-chat", c2)["commit"] == c2

    _, rj = run(tmp_path, pm, mini_trait_dir, model="acme/tiny-chat")
    assert produced(rj) == N_GEN and rj["model"]["identity"]["fingerprint"]["commit"] == c1
    _, rj = run(tmp_path, pm, mini_trait_dir, model="acme/tiny-chat")
    assert produced(rj) == 0
    (root / "refs" / "main").write_text(c2)  # the hub's main moved on (and was downloaded)
    _, rj = run(tmp_path, pm, mini_trait_dir, model="acme/tiny-chat")
    assert produced(rj) == N_GEN and rj["model"]["identity"]["fingerprint"]["commit"] == c2
    _, rj = run(tmp_path, pm, mini_trait_dir, model="acme/tiny-chat", revision=c1)  # pinned: the first commit
    assert produced(rj) == 0


def test_an_id_no_loader_can_resolve_keeps_its_name_and_revision():
    assert model_fingerprint("not-a-model-anywhere") == {"kind": "id", "id": "not-a-model-anywhere", "revision": None}
    assert model_fingerprint("acme/x", "v2") == {"kind": "id", "id": "acme/x", "revision": "v2"}


def test_the_embedded_fingerprint_is_the_gguf_files_hash_and_size():
    from harness.models.loading import embedded_gguf_path

    fp = model_fingerprint("smollm2-135m")
    gguf = embedded_gguf_path()
    with open(gguf, "rb") as fh:
        want = hashlib.file_digest(fh, "sha256").hexdigest()
    assert fp == {"kind": "embedded", "id": "smollm2", "file": gguf.name, "size": gguf.stat().st_size, "sha256": want}


def test_the_embedded_conversion_folder_is_keyed_by_the_gguf_and_the_transformers_version(
        embedded_dir, tmp_path, monkeypatch):
    import transformers

    from harness.models.loading import (
        embedded_model_dir,
        embedded_model_path,
        embedded_model_source,
    )

    src = json.loads((embedded_dir / "persona-harness-source.json").read_text())
    assert src == embedded_model_source() and src["transformers"] == transformers.__version__
    monkeypatch.setenv("PERSONA_HARNESS_MODELS", str(tmp_path / "models"))
    here = embedded_model_path()
    for name in ("config.json", "model.safetensors"):  # a finished conversion under this version
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        (here / name).write_text("{}")
    assert embedded_model_dir() == here
    monkeypatch.setattr(transformers, "__version__", "4.57.0")
    assert embedded_model_path() != here  # a folder written under another version is not reused
    assert embedded_model_path().parent == here.parent


def test_dtype_names_and_a_bad_dtype():
    assert dtype_name("auto", "cpu") == "float32" and dtype_name("auto", "cuda:1") == "bfloat16"
    assert dtype_name("bf16", "cpu") == "bfloat16" and dtype_name("FP16") == "float16"
    with pytest.raises(HarnessError, match="--dtype 'int8'") as e:
        dtype_name("int8")
    assert "\n" not in str(e.value)


def test_chat_settings_are_part_of_the_generation_identity_not_of_the_judges(tmp_path):
    s = Settings(model="smollm2", device="cpu")
    base = model_identity("smollm2", s)
    assert base["chat"] == {"template_sha256": None, "thinking": False}
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with_file = model_identity("smollm2", s.replace(chat_template=str(tpl)))
    with_text = model_identity("smollm2", s.replace(chat_template=tpl.read_text()))
    assert with_file == with_text != base
    thinking = s.replace(enable_thinking=True)
    assert model_identity("smollm2", thinking) != base
    assert model_identity("smollm2", thinking, thinking=False) == base  # what the local judge keys on
    # --chat-template and --revision describe --model only, not another (judge) model
    other = s.replace(chat_template=str(tpl), revision="v1")
    assert model_identity("some/judge", other) == model_identity("some/judge", s)


def test_the_local_judges_key_holds_its_models_identity(tmp_path):
    from harness.core.plugins import build_registry, get_plugin_manager

    pm = get_plugin_manager(entrypoints=False)
    reg = build_registry(pm, "judge")
    a = reg.create("local", Settings(model="smollm2", device="cpu")).config()
    b = reg.create("local", Settings(model="smollm2", device="cpu", dtype="bfloat16")).config()
    c = reg.create("local", Settings(model="smollm2", device="cpu", judge_model="SmolLM2-135M")).config()
    assert a["model"]["fingerprint"]["kind"] == "embedded" and a != b and a == c
    gen = build_registry(pm, "generator").create("hf", Settings()).config()
    assert gen["version"]  # a generator's version is part of its config, so of its cache keys
