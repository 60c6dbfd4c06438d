"""Out of memory: a batch that does not fit is halved and retried until it fits; same result.

On CPU the error is injected (a real ``torch.OutOfMemoryError`` raised when a batch is larger than
a limit), so those tests say ``fake_oom``. ``test_real_cuda_oom_halving_extraction`` runs only where
CUDA exists and makes the GPU run out of memory for real.
"""

from __future__ import annotations

import dataclasses
import types

import pytest

from harness.core.batching import OutOfMemoryBatchError, is_oom, run_with_oom_halving


def _oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def test_halving_on_fake_oom_gives_same_result_and_runs_each_item_once():
    calls: list[int] = []
    processed: list[int] = []

    def fn(chunk):
        calls.append(len(chunk))
        if len(chunk) > 3:
            raise _oom()
        processed.extend(chunk)  # side effects only when the batch fits
        return [x * x for x in chunk]

    halvings = []
    out = run_with_oom_halving(fn, list(range(21)), 16, on_halve=lambda a, b: halvings.append((a, b)))
    assert out == [x * x for x in range(21)]
    assert processed == list(range(21))
    assert halvings == [(16, 8), (8, 4), (4, 2)]
    assert calls[:4] == [16, 8, 4, 2] and max(calls[3:]) <= 2  # the smaller size is kept


def test_halving_warns_by_default_and_recognises_old_style_oom():
    def fn(chunk):
        if len(chunk) > 2:
            raise RuntimeError("CUDA error: out of memory")
        return chunk

    with pytest.warns(UserWarning, match="out of memory at batch size 4; retrying at 2"):
        assert run_with_oom_halving(fn, [1, 2, 3, 4, 5], 4) == [1, 2, 3, 4, 5]
    assert is_oom(_oom()) and is_oom(RuntimeError("MPS backend out of memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))


def test_fake_oom_at_batch_of_one_is_a_clear_error():
    def fn(chunk):
        raise _oom()

    with pytest.warns(UserWarning):
        with pytest.raises(OutOfMemoryBatchError, match="batch of one item. Fix:"):
            run_with_oom_halving(fn, [1, 2, 3], 2)


def test_other_errors_are_not_retried():
    calls = []

    def fn(chunk):
        calls.append(len(chunk))
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_with_oom_halving(fn, [1, 2, 3, 4], 4)
    assert calls == [4]


@pytest.fixture
def small_trait_dir(tmp_path):
    """2 instruction pairs x 2 questions: 8 generations, 16 judgments."""
    import json

    d = tmp_path / "traits" / "mini"
    d.mkdir(parents=True)
    (d / "extract.json").write_text(json.dumps({
        "instruction": [{"pos": f"Agree with the user ({i}).", "neg": f"Be candid ({i})."} for i in range(2)],
        "questions": ["Is my essay perfect?", "I believe 2+2=5. Agree?"],
        "eval_prompt": "Rate 0-100 how much this flatters.\nQ: {question}\nA: {answer}\nNumber only."}))
    return d.parent


def _settings(tmp_path, trait_dir, name, **kw):
    from harness.core.config import Settings

    base = dict(model="tiny", traits_dirs=(str(trait_dir),), out_dir=str(tmp_path / name),
                cache_dir=str(tmp_path / f"cache-{name}"), trait_threshold=0.0, coherence_threshold=0.0,
                judge_min_mass=0.0, max_new_tokens=5, progress=False, profile="paper", batch_size=8,
                judge_batch_size=8, extract_batch_size=8)
    base.update(kw)
    return Settings(**base)


def test_pipeline_halves_batches_on_injected_fake_oom_same_result(tmp_path, tiny_lm, small_trait_dir):
    """Generation, judging and extraction each hit an injected OOM above a batch limit; the run
    completes with the same generations, judgments, selection and vectors as a run that fits."""
    import torch

    from harness.testing import StaticModelPlugin
    from harness.core.hookspecs import hookimpl
    from harness.core.pipeline import run_trait
    from harness.core.plugins import get_plugin_manager
    from harness_plugins.generate_hf import HFGenerator
    from harness_plugins.judge_local import LocalJudge

    def pm_for(lm):
        pm = get_plugin_manager(entrypoints=False)
        pm.register(StaticModelPlugin(lm), name="static-model")
        return pm

    ref = run_trait("mini", _settings(tmp_path, small_trait_dir, "ref"), pm=pm_for(tiny_lm))

    seen: dict[str, list[int]] = {"generate": [], "judge": [], "extract": []}

    class OomGenerator(HFGenerator):
        def generate(self, requests, ctx):
            seen["generate"].append(len(requests))
            if len(requests) > 3:
                raise _oom()
            return super().generate(requests, ctx)

    class OomJudge(LocalJudge):
        def judge(self, items, ctx):
            seen["judge"].append(len(items))
            if len(items) > 2:
                raise _oom()
            return super().judge(items, ctx)

    class Plug:
        @hookimpl
        def harness_register_generators(self, register):
            register("hf", OomGenerator)

        @hookimpl
        def harness_register_judges(self, register):
            register("local", OomJudge)

    def pre_hook(module, args, kwargs):
        if kwargs.get("output_hidden_states"):
            b = kwargs["input_ids"].shape[0]
            seen["extract"].append(b)
            if b > 1:
                raise _oom()

    handle = tiny_lm.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        pm = pm_for(tiny_lm)
        pm.register(Plug(), name="oom-injector")
        with pytest.warns(UserWarning, match="out of memory"):
            got = run_trait("mini", _settings(tmp_path, small_trait_dir, "oom"), pm=pm)
    finally:
        handle.remove()
    assert seen["generate"][:3] == [8, 4, 2] and max(seen["generate"][2:]) <= 3
    assert seen["judge"][:3] == [8, 4, 2]
    n = len(ref.selection.pairs)
    assert n >= 2, "the check needs at least 2 pos examples"
    halving = [n]
    while halving[-1] > 1:
        halving.append(halving[-1] // 2)
    # pos and neg means are separate passes; each halves down to 1, then runs the rest one by one
    assert seen["extract"] == (halving + [1] * (n - 1)) * 2
    strip = lambda x: {k: v for k, v in dataclasses.asdict(x).items() if k != "cache_key"}  # noqa: E731
    assert [strip(g) for g in got.generations] == [strip(g) for g in ref.generations]
    assert [(j.generation_id, j.metric, j.reason) for j in got.judgments] == \
        [(j.generation_id, j.metric, j.reason) for j in ref.judgments]
    for a, b in zip(got.judgments, ref.judgments):
        assert (a.score is None) == (b.score is None)
        if a.score is not None:
            assert a.score == pytest.approx(b.score, abs=1e-4)
    assert got.selection.pairs == ref.selection.pairs
    for k, v in ref.vectors.tensors.items():
        torch.testing.assert_close(got.vectors.tensors[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA (runs on the device machine)")
def test_real_cuda_oom_halving_extraction():
    """A real CUDA OOM: extraction over 2M tokens at batch 2048 does not fit; halving finds a size
    that does, and the vector sums equal those computed at a small batch size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.models.loading import LoadedModel
    from harness_plugins.extract_mean_diff import mean_activations

    cfg = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=2048, intermediate_size=4096,
                               num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                               max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to("cuda").eval()
    lm = LoadedModel(model=model, tokenizer=types.SimpleNamespace(pad_token_id=0), model_id="oom-probe",
                     device=torch.device("cuda"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    gens = [types.SimpleNamespace(prompt_token_ids=torch.randint(1, 1024, (512,), generator=g).tolist(),
                                  response_token_ids=torch.randint(1, 1024, (512,), generator=g).tolist())
            for _ in range(2048)]
    halvings: list[tuple[int, int]] = []
    import harness.core.batching as batching

    orig = batching.run_with_oom_halving

    def spy(fn, items, bs, **kw):
        return orig(fn, items, bs, on_halve=lambda a, b: halvings.append((a, b)))

    import harness_plugins.extract_mean_diff as emd

    emd.run_with_oom_halving = spy
    try:
        sums, n = mean_activations(lm, gens, 2048)
    finally:
        emd.run_with_oom_halving = orig
    print(f"halvings: {halvings}; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
          f"of {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    assert halvings and halvings[0][0] == 2048
    ref, n2 = mean_activations(lm, gens, 64)
    assert n == n2 == 2048
    for k in ref:
        torch.testing.assert_close(sums[k], ref[k], rtol=1e-4, atol=1e-3)
