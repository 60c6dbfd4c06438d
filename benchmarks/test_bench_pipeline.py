"""The trait run without the judge, through ``run_trait`` and the plugins (requests, chat template,
generate, a constant stand-in judge, filter, extract, run directory): the seed-style components (hf
generator one request at a time, mean-diff extractor batch 1) vs the fast ones, on the shipped
``sycophantic`` extraction split (5 x 20 x pos/neg = 200 requests; smoke mode cuts it)."""

from __future__ import annotations

import pytest

import _bench
from _bench import run


@pytest.fixture(scope="module")
def pipe(bench, tmp_path_factory):
    lm = bench["lm"]
    smoke = bench["work"].n < 200
    spec = _bench.bench_trait(1, 3) if smoke else _bench.bench_trait()
    if lm.tokenizer is None or isinstance(lm.tokenizer, _bench._NoTok):
        from harness.core.config import Settings
        from harness.core.pipeline import build_requests

        lm.tokenizer = _bench.word_tokenizer([m["content"] for r in build_requests(spec, Settings(), ["extract"])
                                              for m in r.messages])
    n = 2 * len(spec.instructions) * len(spec.questions)
    return {"spec": spec, "n": n, "seed_spec": _bench.bench_trait(1, 1), "dir": tmp_path_factory.mktemp("pipe")}


def _extra(benchmark, bench, pipe, key, seconds, result=None):
    w, lm = bench["work"], bench["lm"]
    bench["results"][key] = seconds
    floor = _bench.gen_floor(lm, w) + _bench.extract_floor(lm, w)
    benchmark.extra_info.update(bench["info"])
    benchmark.extra_info.update(_bench.ceilings(lm))
    benchmark.extra_info.update({"work": w.__dict__, "requests": pipe["n"], "seconds_for_all": seconds,
                                 "floor_s": floor, "ratio_to_floor": seconds / floor,
                                 "tokens_per_s": pipe["n"] * w.new_tokens / seconds})
    if result is not None:
        import json

        benchmark.extra_info["stage_seconds"] = json.loads((result.run_dir / "run.json").read_text())["timings"]
    if bench["results"].get("pipeline_seed") and key != "pipeline_seed":
        benchmark.extra_info["speedup_vs_seed"] = bench["results"]["pipeline_seed"] / seconds


def test_pipeline_seed_style(benchmark, bench, pipe):
    """One pair x one question (2 requests) one at a time, scaled to the full request count."""
    w = bench["work"]
    t = run(benchmark, bench, lambda: _bench.pipeline_run(bench["lm"], w, "hf", "mean-diff", True,
                                                          pipe["seed_spec"], pipe["dir"]), 1)
    _extra(benchmark, bench, pipe, "pipeline_seed", t * pipe["n"] / 2)


def test_pipeline_fast(benchmark, bench, pipe):
    w = bench["work"]
    res = {}

    def go():
        res["r"] = _bench.pipeline_run(bench["lm"], w, "fast", "fast", False, pipe["spec"], pipe["dir"])

    t = run(benchmark, bench, go, w.rounds)
    r = res["r"]
    _extra(benchmark, bench, pipe, "pipeline_fast", t, r)
    assert r.selection is not None and len(r.selection.pairs) == pipe["n"] // 2
    assert all(len(g.response_token_ids) == w.new_tokens for g in r.generations)
