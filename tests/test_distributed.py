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


TIMEOUT_S = 4321  # PERSONA_HARNESS_DIST_TIMEOUT given to the ranks; the gloo group must carry it


def _instrument(log: dict, generator: str, extractor: str) -> None:
    """Count what this process generates and extracts, and record every path the pipeline writes."""
    import harness.core.pipeline as pipeline
    from harness.engine import Engine
    from harness_plugins import extract_mean_diff
    from harness_plugins.generate_fast import FastGenerator
    from harness_plugins.generate_hf import HFGenerator

    gen_cls = {"fast": FastGenerator, "hf": HFGenerator}[generator]
    real_generate = gen_cls.generate

    def generate(self, requests, ctx):
        log["generated"] += [r.id for r in requests]
        return real_generate(self, requests, ctx)

    gen_cls.generate = generate
    real_sums = Engine.extract_sums

    def extract_sums(self, examples, *a, **k):
        log["extracted"] += len(examples)
        return real_sums(self, examples, *a, **k)

    Engine.extract_sums = extract_sums
    real_means = extract_mean_diff.mean_activations

    def mean_activations(lm, gens, *a, **k):
        log["extracted"] += len(gens)
        return real_means(lm, gens, *a, **k)

    extract_mean_diff.mean_activations = mean_activations
    for name in ("write_jsonl", "append_jsonl", "atomic_write_json", "save_vectors"):
        def wrap(path, *a, _real=getattr(pipeline, name), **k):
            log["writes"].append(os.path.abspath(path))
            return _real(path, *a, **k)

        setattr(pipeline, name, wrap)


def _run(rank: int, world: int, port: int, root: str, out: str, extractor: str, generator: str):
    """One process of the run (rank 0 of 1 is the single-process reference)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PERSONA_HARNESS_DIST_TIMEOUT": str(TIMEOUT_S),
                       "PERSONA_HARNESS_DIST_BACKEND": "gloo", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    import sys
    import tempfile

    import torch

    torch.set_num_threads(1)
    # this rank's temporary folders (its throwaway run directory) go here, to be checked after exit
    tempfile.tempdir = os.path.join(root, f"tmp-{world}-rank{rank}")
    os.makedirs(tempfile.tempdir, exist_ok=True)
    log: dict = {"rank": rank, "world": world, "generated": [], "extracted": 0, "writes": []}
    _instrument(log, generator, extractor)
    sys.path.insert(0, os.path.dirname(__file__))
    from harness.testing import StaticModelPlugin, make_tiny_lm

    from harness.core.config import Settings
    from harness.models.loading import embedded_model_dir
    from harness.core.pipeline import run_trait
    from harness.core.plugins import get_plugin_manager

    lm = make_tiny_lm(embedded_model_dir(), layers=2, hidden=32, seed=7)
    pm = get_plugin_manager(entrypoints=False)
    pm.register(StaticModelPlugin(lm), name="static")
    s = Settings(model="tiny", traits_dirs=(os.path.join(root, "traits"),), out_dir=out,
                 cache_dir=os.path.join(root, f"cache-{world}"), trait_threshold=0.0, coherence_threshold=0.0,
                 judge_min_mass=0.0, max_new_tokens=4, progress=False, profile="paper", temperature=1.0,
                 generator=generator, extractor=extractor)
    res = run_trait("duo", s, pm=pm)
    log["run_dir"] = os.path.abspath(res.run_dir)
    log["n_pos"], log["n_neg"] = res.vectors.n_pos, res.vectors.n_neg
    if world > 1:
        import torch.distributed as dist

        backend = dist.group.WORLD._get_backend(torch.device("cpu"))  # ProcessGroupGloo
        log["timeout_s"] = backend.options._timeout.total_seconds()
        dist.barrier()
        dist.destroy_process_group()
    with open(os.path.join(root, f"log-{world}-rank{rank}.json"), "w") as fh:
        json.dump(log, fh)


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

    from harness.core.artifacts import load_vectors, read_jsonl

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
    _check_sharding_and_writes(root, [g["id"] for g in g2], extractor)


def _check_sharding_and_writes(root, ids, extractor):
    """Each rank generated its own half; rank 1 wrote nothing into the run directory and left no folder."""
    single = json.loads((root / "log-1-rank0.json").read_text())
    r0, r1 = (json.loads((root / f"log-2-rank{r}.json").read_text()) for r in (0, 1))
    assert sorted(single["generated"]) == sorted(ids)
    # generations.jsonl is in request order and rank r generates requests[r::2]
    assert sorted(r0["generated"]) == sorted(ids[0::2]) and len(r0["generated"]) == 6
    assert sorted(r1["generated"]) == sorted(ids[1::2]) and len(r1["generated"]) == 6
    n = r0["n_pos"] + r0["n_neg"]
    assert single["extracted"] == n
    if extractor == "fast":  # sharded: every example once, split between the ranks
        assert r0["extracted"] + r1["extracted"] == n and abs(r0["extracted"] - r1["extracted"]) <= 2
        assert r1["extracted"] > 0
    else:  # not distributed-aware: rank 0 extracts, rank 1 receives the broadcast
        assert (r0["extracted"], r1["extracted"]) == (n, 0)
    two = str(root / "two")
    assert r0["run_dir"] == two and r0["writes"]
    assert all(w.startswith(two + os.sep) for w in r0["writes"])
    tmp1 = str(root / "tmp-2-rank1")
    assert r1["run_dir"].startswith(tmp1 + os.sep) and r1["writes"]
    assert not any(w.startswith(two + os.sep) for w in r1["writes"])
    assert all(w.startswith(r1["run_dir"] + os.sep) for w in r1["writes"])
    assert os.path.dirname(r1["run_dir"]) == tmp1 and not os.path.exists(r1["run_dir"])
    assert [d for d in os.listdir(tmp1) if d.startswith("persona-harness-")] == []  # deleted at exit
    assert r0["timeout_s"] == r1["timeout_s"] == TIMEOUT_S  # PERSONA_HARNESS_DIST_TIMEOUT reached init


def test_timeout_setting(monkeypatch):
    from harness.core import distributed as hd
    from harness.core.errors import HarnessError

    monkeypatch.delenv("PERSONA_HARNESS_DIST_TIMEOUT", raising=False)
    assert hd.timeout_seconds() == 6 * 3600
    monkeypatch.setenv("PERSONA_HARNESS_DIST_TIMEOUT", "90")
    assert hd.timeout_seconds() == 90 and hd.timeout_seconds(12) == 12
    for bad in ("0", "-5", "six hours", "inf"):
        monkeypatch.setenv("PERSONA_HARNESS_DIST_TIMEOUT", bad)
        with pytest.raises(HarnessError, match="PERSONA_HARNESS_DIST_TIMEOUT"):
            hd.timeout_seconds()


@pytest.mark.parametrize("env,arg,want", [(None, None, 6 * 3600), ("777", None, 777), ("777", 55, 55)])
def test_init_gives_the_timeout_to_gloo(monkeypatch, env, arg, want):
    """One real gloo process group (world 1): the group's timeout is the one asked for."""
    import torch
    import torch.distributed as dist

    from harness.core import distributed as hd

    monkeypatch.setattr(hd, "is_distributed", lambda: True)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                 "PERSONA_HARNESS_DIST_BACKEND": "gloo"}.items():
        monkeypatch.setenv(k, v)
    if env is None:
        monkeypatch.delenv("PERSONA_HARNESS_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PERSONA_HARNESS_DIST_TIMEOUT", env)
    assert not dist.is_initialized()
    try:
        assert hd.init(arg) == (0, 1)
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        assert backend.options._timeout.total_seconds() == want
    finally:
        dist.destroy_process_group()


def test_other_ranks_throwaway_run_dirs_are_deleted(tmp_path, monkeypatch):
    import tempfile

    from harness.core import distributed as hd

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(hd, "rank_world", lambda: (0, 2))
    assert hd.private_run_dir(tmp_path / "run") == tmp_path / "run"
    monkeypatch.setattr(hd, "rank_world", lambda: (1, 2))
    a = hd.private_run_dir(tmp_path / "run")
    assert a.is_dir() and a.parent == tmp_path / "tmp" and a != tmp_path / "run"
    (a / "generations.jsonl").write_text("{}\n")
    b = hd.private_run_dir(tmp_path / "run")  # the next run deletes the previous folder
    assert not a.exists() and b.is_dir()
    hd.cleanup_private_run_dirs()  # registered with atexit too
    assert not b.exists() and list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "run").exists()
