"""The trait run without the judge (generate -> extract through the plugins) on the same work:
seed-style components (hf generator one request at a time, mean-diff extractor batch 1) vs fast."""

from __future__ import annotations

import _bench
from _bench import run


def _trait_run(bench, generator: str, extractor: str, n: int, one_at_a_time: bool):
    return _bench.trait_run(bench["lm"], bench["work"], generator, extractor, n, one_at_a_time)


def _extra(benchmark, bench, key, seconds):
    w, lm = bench["work"], bench["lm"]
    bench["results"][key] = seconds
    floor = _bench.gen_floor(lm, w) + _bench.extract_floor(lm, w)
    benchmark.extra_info.update(bench["info"])
    benchmark.extra_info.update({"work": w.__dict__, "seconds_for_all": seconds, "floor_s": floor,
                                 "ratio_to_floor": seconds / floor})
    if bench["results"].get("pipeline_seed") and key != "pipeline_seed":
        benchmark.extra_info["speedup_vs_seed"] = bench["results"]["pipeline_seed"] / seconds


def test_pipeline_seed_style(benchmark, bench):
    """Measured on 2 items with 1/8 of the work's tokens per item isn't comparable; so 2 full items, scaled."""
    w = bench["work"]
    n = 2
    t = run(benchmark, bench, lambda: _trait_run(bench, "hf", "mean-diff", n, True), 1)
    _extra(benchmark, bench, "pipeline_seed", t * w.n / n)


def test_pipeline_fast(benchmark, bench):
    w = bench["work"]
    t = run(benchmark, bench, lambda: _trait_run(bench, "fast", "fast", w.n, False), w.rounds)
    _extra(benchmark, bench, "pipeline_fast", t)
