"""A user's ``persona-harness run`` end to end, cold: a fresh process (``python -m harness.cli run``) on
a saved model folder, the local judge with judge model = the generation model (one copy in memory),
the shipped ``sycophantic`` trait and the default components (``generator`` / ``extractor`` ``auto``).

Sizes (full size with ``--bench-model qwen7b-shape`` on CUDA, smoke size otherwise):

- ``trait run``: 5 pairs x 20 questions x 1 sample x pos/neg = 200 generations of up to 256 new tokens,
  400 judgments, extraction (``--n-per-question 1 --max-new-tokens 256``; target on one H200: 25 s);
- ``paper`` (full size only with ``--bench-work paper``): ``--n-per-question 10 --max-new-tokens 360``,
  2000 generations, 4000 judgments, extraction (target: 120 s).
- smoke: a copy of the trait cut to 1 pair x 2 questions (``--trait-file``), 8 new tokens, 1 sample
  (trait run) or 2 (paper), on a 3-layer random Llama with the embedded model's tokenizer.

The model folder is written once per module (``save_pretrained`` + the embedded model's tokenizer,
which has a real chat template). A random-weight model of Qwen2.5's 152064 ids would mostly sample ids
that this 49152-id tokenizer cannot decode (decoding drops them), so the judge would read responses a
third as long as they are. The saved copy's output rows for those ids are zero and the others are
scaled to a root-mean-square norm of ``LOGIT_STD`` (3.5; the logits' spread for a unit-RMS hidden
state, about 1.2 at random initialisation for this shape): the undecodable ids then hold about 0.5 %
of the probability, and sampling at temperature 1 stays broad. Shapes and compute are unchanged.

Each timed process gets a fresh ``--cache-dir`` (no cached generations or judgments) and a fresh
``--out``; compile caches outside them (Inductor's and Triton's) persist from one process to the next,
as for a user's second run. Each size times one process (``first_process_s``: on a fresh machine, the
run with empty compile caches).
While the child runs, this process holds the session's benchmark model on the same device.

Filter: random weights give arbitrary scores, and a run that keeps no pair stops before extraction
with an error. The run uses ``--trait-threshold 0 --coherence-threshold 0 --judge-min-mass 0``: every
pair whose four judgments are scored is kept (pos >= 0, neg < 100, coherence >= 0; a min mass of 0
scores every item unless the judge puts more probability on "REFUSAL" than on all numbers). These
settings change which pairs are extracted, not the work of generation or judging; ``pairs_kept`` is
recorded and the extraction floor counts the kept pairs only.

Floor (a compute floor, in ``floor_s``; ``floor_by_stage`` per stage), at ``matmul_flops_per_s`` of
``_bench.ceilings`` measured in this session:

    floor_s = 2 x (B x T_body + H x T_head) / matmul_flops_per_s

B = the weights every token multiplies by except the output head, H = the output head's weights.
T_body = generation: every prompt and response id; judge: every judgment prompt's ids with each
rubric's shared prefix once, plus the number trie's nodes per judgment; extraction: prompt + response
ids of every kept pair's two generations. T_head (ids whose logits are needed) = every response id,
and per judgment its last prompt id plus the trie nodes. Model loading is not in the floor, and
decode steps are bandwidth-bound above it; ``ratio_to_floor`` is the process's wall seconds over it.

``extra_info`` also holds the process's wall seconds (``wall_s``; each process in ``process_s_each``),
run.json's ``timings`` per stage and ``components`` (with ``choices``: which generator and extractor
``auto`` picked and why), the work done (generations, prompt and generated tokens, judgments, pairs
kept), the device, and ``target_s``: the full-size target on one H200 (recorded at every size; it
applies where ``size`` is ``full``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _bench
import pytest

TRAIT = "sycophantic"
LOGIT_STD = 3.5  # the saved copy's logits of decodable ids (see the module docstring)
THRESHOLDS = ("--trait-threshold", "0", "--coherence-threshold", "0", "--judge-min-mass", "0")


@pytest.fixture(scope="module")
def cli_model(bench, tmp_path_factory):
    """The benchmark model saved as a model folder with a chat tokenizer, and a cut trait for smoke."""
    from transformers import AutoTokenizer

    from harness.models.loading import embedded_model_dir, prepare_tokenizer
    from harness.testing import make_tiny_lm

    lm = bench["lm"]
    if lm.model_id == "tiny":  # the _bench tiny model's 4096 ids cannot hold the tokenizer's 49152
        lm = make_tiny_lm(embedded_model_dir())
    tok = lm.tokenizer
    if tok is None or isinstance(tok, _bench._NoTok):
        tok = AutoTokenizer.from_pretrained(_bench.tokenizer_dir())
        prepare_tokenizer(tok)
    model = lm.model
    V, n = int(model.config.vocab_size), len(tok)
    if V < n:
        pytest.skip(f"--bench-model {lm.model_id}: {V} ids, fewer than the tokenizer's {n}")
    d = tmp_path_factory.mktemp("cli-model")
    state = None
    head = model.get_output_embeddings().weight
    if V > n and head is not model.get_input_embeddings().weight:
        name = next(k for k, p in model.named_parameters() if p is head)
        w = head.detach().clone()
        row_norm = w[:n].float().norm(dim=1).pow(2).mean().sqrt()  # ~ the logits' std (unit-RMS hidden state)
        w[:n] *= float(LOGIT_STD / row_norm)
        w[n:] = 0
        state = {**model.state_dict(), name: w}
    model.save_pretrained(str(d), state_dict=state)
    tok.save_pretrained(str(d))
    del state
    smoke_dir = tmp_path_factory.mktemp("cli-trait") / TRAIT
    spec = _bench.bench_trait(1, 2)
    smoke_dir.mkdir()
    (smoke_dir / "extract.json").write_text(json.dumps({
        "instruction": [{"pos": i.pos, "neg": i.neg} for i in spec.instructions],
        "questions": list(spec.questions), "eval_prompt": spec.eval_prompt}))
    _bench.sync(bench["lm"])
    if bench["lm"].device.type == "cuda":
        import torch

        torch.cuda.empty_cache()  # leave the child process what this one does not hold
    return {"dir": d, "lm": lm, "tok": tok, "smoke_trait": smoke_dir / "extract.json",
            "tmp": tmp_path_factory}


def _command(cli_model, full: bool, n_per_question: int, max_new: int, work: Path) -> list[str]:
    trait = ["--trait", TRAIT] if full else ["--trait-file", str(cli_model["smoke_trait"])]
    return [sys.executable, "-m", "harness.cli", "run", *trait, "--model", str(cli_model["dir"]),
            "--out", str(work / "run"), "--cache-dir", str(work / "cache"),
            "--n-per-question", str(n_per_question), "--max-new-tokens", str(max_new), *THRESHOLDS,
            "--no-progress", "--json"]


def _env() -> dict:
    # the user's own PERSONA_HARNESS_* settings would change the work; a fresh working directory has
    # no persona-harness.toml / pyproject.toml for the settings to read either
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_HARNESS_")}


def _cli_run(benchmark, bench, cli_model, key: str, full: bool, n_per_question: int, max_new: int,
             target_s: float):
    procs: list[dict] = []

    def go():
        work = cli_model["tmp"].mktemp(key)
        cmd = _command(cli_model, full, n_per_question, max_new, work)
        t = time.perf_counter()
        p = subprocess.run(cmd, check=False, cwd=str(work), env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t
        assert p.returncode == 0, f"exit {p.returncode}: {' '.join(cmd)}\n{p.stderr[-4000:]}"
        procs.append({"wall_s": wall, "run_dir": work / "run", "cmd": cmd})

    benchmark.pedantic(go, rounds=1, iterations=1)  # one process (also under --benchmark-disable)
    t = procs[-1]["wall_s"]
    last = procs[-1]
    res = _check(cli_model, last["run_dir"], full, n_per_question, max_new)
    floor = _floor(bench, cli_model, res)
    walls = [p["wall_s"] for p in procs]
    rj = res["run_json"]
    lm = cli_model["lm"]
    benchmark.extra_info.update(_bench.device_info(bench["lm"]))
    benchmark.extra_info.update({"model": lm.model_id, "params": sum(p.numel() for p in lm.model.parameters())})
    benchmark.extra_info.update(_bench.ceilings(bench["lm"]))
    benchmark.extra_info.update({
        "command": " ".join(last["cmd"][1:]), "size": "full" if full else "smoke",
        "wall_s": t, "process_s_each": walls, "first_process_s": walls[0],
        "timings": rj["timings"], "components": rj["components"],
        "work": res["work"], "floor_s": floor["total"], "floor_by_stage": floor,
        "ratio_to_floor": t / floor["total"], "target_s": target_s,
        "child_device": rj["model"].get("device"), "child_dtype": rj["model"].get("dtype")})
    bench["results"][key] = t


def _check(cli_model, run_dir: Path, full: bool, n_per_question: int, max_new: int) -> dict:
    """The mechanics: run.json, the generations asked for, vectors of the model's shape."""
    from harness.core.artifacts import load_vectors
    from harness.core.records import Generation
    from harness.core.traits import load_trait_path

    rj = json.loads((run_dir / "run.json").read_text())
    assert rj["status"] == "ok"
    spec = load_trait_path(Path(_bench.__file__).resolve().parent.parent / "traits" / TRAIT) if full \
        else load_trait_path(cli_model["smoke_trait"])
    asked = 2 * len(spec.instructions) * len(spec.questions) * n_per_question
    gens = [Generation.from_dict(json.loads(x)) for x in (run_dir / "generations.jsonl").read_text().splitlines() if x]
    assert rj["counts"]["generations"] == len(gens) == asked
    assert rj["counts"]["judgments"] == 2 * asked
    assert all(len(g.response_token_ids) <= max_new for g in gens)
    pairs = json.loads((run_dir / "selection.json").read_text())["pairs"]
    assert rj["counts"]["pairs_kept"] == len(pairs) > 0
    vs = load_vectors(run_dir / "vectors.safetensors")
    cfg = cli_model["lm"].model.config
    for v in vs.tensors.values():
        assert tuple(v.shape) == (cfg.num_hidden_layers + 1, cfg.hidden_size)
    assert vs.n_pos == vs.n_neg == len(pairs)
    generated = sum(len(g.response_token_ids) for g in gens)
    work = {"generations": len(gens), "prompt_tokens": sum(len(g.prompt_token_ids) for g in gens),
            "generated_tokens": generated, "mean_length": generated / len(gens),
            "stopped": sum(g.finish_reason == "stop" for g in gens), "judgments": rj["counts"]["judgments"],
            "unscored": rj["summary"].get("unscored", {}), "pairs_kept": len(pairs),
            "pairs_candidates": rj["summary"].get("pairs_candidates")}
    return {"run_json": rj, "spec": spec, "gens": gens, "pairs": pairs, "work": work}


def _floor(bench, cli_model, res) -> dict:
    lm, tok, spec, gens = cli_model["lm"], cli_model["tok"], res["spec"], res["gens"]
    head = lm.model.get_output_embeddings().weight
    H = head.numel()
    # linear_params leaves out the input embedding: that is the head itself when the two are tied
    B = _bench.linear_params(lm) - (0 if head is lm.model.get_input_embeddings().weight else H)
    rate = _bench.ceilings(bench["lm"])["matmul_flops_per_s"]
    # generation: every prompt and response id through the body, the head for every generated id
    resp = sum(len(g.response_token_ids) for g in gens)
    gen = 2 * (B * (sum(len(g.prompt_token_ids) for g in gens) + resp) + H * resp) / rate
    # judge: each rubric's shared prefix once, every prompt's remainder, the trie per judgment
    body, logits = _bench.judge_work(tok, spec, gens, bool(res["run_json"]["config"].get("judge_exact", True)))
    judge = 2 * (B * body + H * logits) / rate
    # extraction: prompt + response of both generations of every kept pair, no head
    byid = {g.id: g for g in gens}
    ext_tokens = sum(len(byid[i].prompt_token_ids) + len(byid[i].response_token_ids)
                     for pair in res["pairs"] for i in pair)
    extract = 2 * B * ext_tokens / rate
    res["work"].update({"judge_tokens_at_least": body, "extract_tokens": ext_tokens})
    return {"generate": gen, "judge": judge, "extract": extract, "total": gen + judge + extract}


def test_cli_trait_run(benchmark, bench, cli_model):
    """Cold CLI trait run: 200 generations x up to 256 new tokens, the local judge = the same model."""
    full = bench["work"].n >= 200
    _cli_run(benchmark, bench, cli_model, "cli_trait_run", full, 1, 256 if full else 8,
             target_s=25.0)


def test_cli_paper(benchmark, bench, cli_model):
    """The paper's workload from a cold CLI: 2000 generations x up to 360 new tokens, 4000 judgments."""
    full = bench["paper"].n >= 2000
    _cli_run(benchmark, bench, cli_model, "cli_paper", full, 10 if full else 2, 360 if full else 8,
             target_s=120.0)
