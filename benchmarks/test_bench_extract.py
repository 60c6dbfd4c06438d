"""Extraction: the seed's loop (one example at a time), the batched reference, and the fast engine."""

from __future__ import annotations

import _bench
from _bench import run


def _extra(benchmark, bench, key, seconds, n_items):
    w, lm = bench["work"], bench["lm"]
    bench["results"][key] = seconds
    floor = _bench.extract_floor(lm, w)
    benchmark.extra_info.update(bench["info"])
    benchmark.extra_info.update(_bench.ceilings(lm))
    benchmark.extra_info.update({"work": w.__dict__, "seconds_for_all": seconds, "floor_s": floor,
                                 "ratio_to_floor": seconds / floor,
                                 "tokens_per_s": w.n * (w.prompt_len + w.new_tokens) / seconds})
    seed = bench["results"].get("extract_seed")
    if seed:
        benchmark.extra_info["speedup_vs_seed"] = seed / seconds


def test_extract_seed_loop(benchmark, bench):
    w = bench["work"]
    ex = _bench.examples_for(bench["lm"], w)[: w.seed_items * 4]
    t = run(benchmark, bench, lambda: _bench.ref_extract(bench["lm"], ex, 1), 1)
    _extra(benchmark, bench, "extract_seed", t * w.n / len(ex), len(ex))


def test_extract_reference_batched(benchmark, bench):
    w = bench["work"]
    ex = _bench.examples_for(bench["lm"], w)
    t = run(benchmark, bench, lambda: _bench.ref_extract(bench["lm"], ex, 16), max(1, w.rounds - 1))
    _extra(benchmark, bench, "extract_ref", t, w.n)


def test_extract_fast(benchmark, bench):
    import torch

    w = bench["work"]
    ex = _bench.examples_for(bench["lm"], w)
    t = run(benchmark, bench, lambda: _bench.fast_extract(bench["lm"], ex), w.rounds)
    _extra(benchmark, bench, "extract_fast", t, w.n)
    got, _ = _bench.fast_extract(bench["lm"], ex[:8])
    ref, _ = _bench.ref_extract(bench["lm"], ex[:8], 8)
    err = max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
    benchmark.extra_info["rel_err_vs_reference"] = err
    assert err < (2e-2 if bench["lm"].dtype == torch.bfloat16 else 1e-4)
