"""torch.distributed on CPU: 2 gloo processes on 127.0.0.1 give the single-process records and vectors."""

from __future__ import annotations

import json
import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trait_dir(root):
    d = root / "traits" / "duo"
    d.mkdir(parents=True)
    base = {"instruction": [{"pos": "Agree with everything.", "neg": "Be candid."},
                            {"pos": "Flatter the user.", "neg": "Be balanced."}],
            "eval_prompt": "Rate 0-100 how much this flatters.\nQ: {question}\nA: {answer}\nNumber only."}
    (d / "extract.json").write_text(json.dumps({**base, "questions": ["Is my essay perfect?", "Am I always right?",
                                                                      "Is 2+2=5?"]}))
    return d.parent


def _run(rank: int, world: int, port: int, root: str, out: str, extractor: str, generator: str):
    """One process of the run (rank 0 of 1 is the single-process reference)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "PERSONA_HARNESS_DIST_BACKEND": "gloo", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    import sys

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    from harness.testing import StaticModelPlugin, make_tiny_lm

    from harness.config import Settings
    from harness.modeling import embedded_model_dir
    from harness.pipeline import run_trait
    from harness.plugins import get_plugin_manager

    lm = make_tiny_lm(embedded_model_dir(), layers=2, hidden=32, seed=7)
    pm = get_plugin_manager(entrypoints=False)
    pm.register(StaticModelPlugin(lm), name="static")
    s = Settings(model="tiny", traits_dirs=(os.path.join(root, "traits"),), out_dir=out,
                 cache_dir=os.path.join(root, f"cache-{world}"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, profile="paper", temperature=1.0,
                 generator=generator, extractor=extractor)
    run_trait("duo", s, pm=pm)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _spawn(world, *args):
    import torch.multiprocessing as mp

    port = _free_port()
    if world == 1:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_run, args=(0, 1, port, *args))
        p.start()
        p.join(300)
        assert p.exitcode == 0
        return
    mp.spawn(_run, args=(world, port, *args), nprocs=world, join=True)


@pytest.mark.parametrize("extractor,generator", [("fast", "fast"),
                                                 pytest.param("mean-diff", "hf", marks=pytest.mark.slow)])
def test_two_gloo_ranks_equal_single_process(tmp_path, extractor, generator):
    import torch

    from harness.artifacts import load_vectors, read_jsonl

    root = tmp_path
    _trait_dir(root)
    _spawn(1, str(root), str(root / "one"), extractor, generator)
    _spawn(2, str(root), str(root / "two"), extractor, generator)
    one, two = root / "one", root / "two"
    g1 = list(read_jsonl(one / "generations.jsonl"))
    g2 = list(read_jsonl(two / "generations.jsonl"))
    key = lambda g: (g["id"], tuple(g["response_token_ids"]), tuple(g["prompt_token_ids"]))  # noqa: E731
    assert sorted(map(key, g1)) == sorted(map(key, g2)) and len(g1) == 12
    j1 = sorted((j["generation_id"], j["metric"], j["score"]) for j in read_jsonl(one / "judgments.jsonl"))
    j2 = sorted((j["generation_id"], j["metric"], j["score"]) for j in read_jsonl(two / "judgments.jsonl"))
    assert j1 == j2
    v1, v2 = load_vectors(one / "vectors.safetensors"), load_vectors(two / "vectors.safetensors")
    assert set(v1.tensors) == set(v2.tensors)
    for k in v1.tensors:
        torch.testing.assert_close(v2.tensors[k], v1.tensors[k], rtol=1e-5, atol=1e-6)
    run = json.loads((two / "run.json").read_text())
    assert run["counts"]["generations"] == 12
