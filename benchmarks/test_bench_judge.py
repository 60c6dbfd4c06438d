"""The local judge stage (``run_judge`` with the ``local`` judge): the trait rubric and coherence for
every response, as the pipeline runs it (length-sorted batches of one rubric, cache writes).

Work: ``n`` responses of ``answer_words`` words to the shipped ``sycophantic`` questions, 2 judgments
each; full size (``--bench-full`` or CUDA) is the paper's 2000 responses of ~360 tokens = 4000
judgments. The judge model is the benchmark model (``qwen7b-shape`` gets the embedded model's tokenizer:
random weights, real chat template); ``tiny`` is a 3-layer random Llama with that tokenizer.

The floor: every id the judge must run exactly once (each rubric's shared prefix once, each prompt's
remainder, the trie tokens) times 2 x the weights a token multiplies by, at the measured matmul rate.
Compared: the judge (prefix KV reused across batches) and the per-batch-prefix path it replaced.
"""

from __future__ import annotations

import random

import pytest

import _bench
from _bench import run


@pytest.fixture(scope="module")
def judge_setup(bench, tmp_path_factory):
    from harness.core.config import Settings
    from harness.core.plugins import get_plugin_manager
    from harness.core.records import Generation
    from transformers import AutoTokenizer

    from harness.models.loading import LoadedModel, embedded_model_dir, prepare_tokenizer
    from harness.testing import StaticModelPlugin, make_tiny_lm

    lm = bench["lm"]
    if lm.model_id == "tiny":
        lm = make_tiny_lm(embedded_model_dir())
    elif lm.tokenizer is None:
        tok = AutoTokenizer.from_pretrained(_bench.tokenizer_dir())
        prepare_tokenizer(tok)
        lm = LoadedModel(model=lm.model, tokenizer=tok, model_id=lm.model_id, device=lm.device, dtype=lm.dtype,
                         info=lm.info)
    full = bench["work"].n >= 200
    n, words = (2000, 270) if full else (4, 12)
    spec = _bench.bench_trait()
    rng = random.Random(0)
    vocab = " ".join(spec.questions).split()
    gens = [Generation(id=str(i), trait=spec.name, split="extract", polarity="pos" if i % 2 else "neg",
                       question_index=i % len(spec.questions), question=spec.questions[i % len(spec.questions)],
                       instruction_index=0, sample_index=i,
                       system_prompt="", response=" ".join(rng.choice(vocab) for _ in range(rng.randint(words // 2, words))),
                       response_token_ids=(1,), prompt_token_ids=(1,), finish_reason="stop", model_id=lm.model_id,
                       generator="hf") for i in range(n)]
    pm = get_plugin_manager(entrypoints=False)
    pm.register(StaticModelPlugin(lm), name="bench-static-model")
    s = Settings(model=lm.model_id, judge_min_mass=0.0, judge_exact=False, progress=False,
                 judge_batch_size=64 if lm.device.type == "cuda" else 16)
    return {"lm": lm, "gens": gens, "spec": spec, "pm": pm, "settings": s, "tmp": tmp_path_factory}


def _judge_once(setup, reuse_prefix: bool):
    from harness.core.cache import Cache
    from harness.core.pipeline import RunContext, run_judge
    from harness_plugins.judge_local import LocalJudge

    s = setup["settings"]
    ctx = RunContext(settings=s, pm=setup["pm"], cache=Cache(str(setup["tmp"].mktemp("judge-cache"))))
    judge = LocalJudge(s)
    if not reuse_prefix:
        judge.prefixes = None  # each batch runs its own common prefix
    return run_judge(ctx, setup["spec"], setup["gens"], judge)


def _floor(setup) -> tuple[float, int]:
    lm = setup["lm"]
    tokens, _ = _bench.judge_work(lm.tokenizer, setup["spec"], setup["gens"], exact=False)
    flops = 2 * _bench.linear_params(lm) * tokens
    return flops / _bench.ceilings(lm)["matmul_flops_per_s"], tokens


def _extra(benchmark, bench, setup, key, seconds):
    floor, tokens = _floor(setup)
    bench["results"][key] = seconds
    benchmark.extra_info.update(_bench.device_info(setup["lm"]))
    benchmark.extra_info.update(_bench.ceilings(setup["lm"]))
    benchmark.extra_info.update({"judgments": 2 * len(setup["gens"]), "tokens_run_at_least": tokens,
                                 "seconds_for_all": seconds, "floor_s": floor, "ratio_to_floor": seconds / floor})
    if key != "judge_per_batch_prefix" and bench["results"].get("judge_per_batch_prefix"):
        benchmark.extra_info["speedup_vs_per_batch_prefix"] = bench["results"]["judge_per_batch_prefix"] / seconds


def test_judge_per_batch_prefix(benchmark, bench, judge_setup):
    t = run(benchmark, bench, lambda: _judge_once(judge_setup, False), 1)
    _extra(benchmark, bench, judge_setup, "judge_per_batch_prefix", t)


def test_judge_local(benchmark, bench, judge_setup):
    full = len(judge_setup["gens"]) >= 2000
    t = run(benchmark, bench, lambda: _judge_once(judge_setup, True), 1 if full else bench["work"].rounds)
    _extra(benchmark, bench, judge_setup, "judge_local", t)
    few = {**judge_setup, "gens": judge_setup["gens"][:64]}  # the same scores with and without prefix reuse
    a, b = _judge_once(few, True), _judge_once(few, False)
    assert len(a) == 2 * len(few["gens"])
    assert all((x.score is None) == (y.score is None) and (x.score is None or abs(x.score - y.score) < 1e-3)
               for x, y in zip(a, b))
