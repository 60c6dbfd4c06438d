"""Generation: the seed's loop (one prompt at a time), plain HF generate on all prompts, the engine."""

from __future__ import annotations

import _bench
from _bench import run


def _extra(benchmark, bench, key, seconds):
    w, lm = bench["work"], bench["lm"]
    bench["results"][key] = seconds
    floor = _bench.gen_floor(lm, w)
    benchmark.extra_info.update(bench["info"])
    benchmark.extra_info.update(_bench.ceilings(lm))
    benchmark.extra_info.update({"work": w.__dict__, "seconds_for_all": seconds, "floor_s": floor,
                                 "ratio_to_floor": seconds / floor, "tokens_per_s": w.n * w.new_tokens / seconds})
    for base in ("generate_seed", "generate_hf"):
        if bench["results"].get(base) and key != base:
            benchmark.extra_info[f"speedup_vs_{base}"] = bench["results"][base] / seconds


def test_generate_seed_loop(benchmark, bench):
    """One prompt at a time; measured on ``seed_items`` prompts with 1/4 of the tokens, scaled to the work."""
    w = bench["work"]
    ps = _bench.prompts_for(bench["lm"], w)[: w.seed_items]
    k = max(2, w.new_tokens // 4)
    t = run(benchmark, bench, lambda: _bench.seed_generate(bench["lm"], ps, k), 1)
    _extra(benchmark, bench, "generate_seed", t * (w.n / len(ps)) * (w.new_tokens / k))


def test_generate_hf_all_at_once(benchmark, bench):
    w = bench["work"]
    ps = _bench.prompts_for(bench["lm"], w)
    t = run(benchmark, bench, lambda: _bench.hf_generate(bench["lm"], ps, w.new_tokens), 1)
    _extra(benchmark, bench, "generate_hf", t)


def test_generate_fast(benchmark, bench):
    w = bench["work"]
    ps = _bench.prompts_for(bench["lm"], w)
    t = run(benchmark, bench, lambda: _bench.fast_generate(bench["lm"], ps, w.new_tokens), w.rounds)
    _extra(benchmark, bench, "generate_fast", t)
    out = _bench.fast_generate(bench["lm"], ps, w.new_tokens)
    assert all(len(o) == w.new_tokens for o in out)
