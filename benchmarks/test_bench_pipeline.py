"""The trait run without the judge (generate -> extract through the plugins) on the same work:
seed-style components (hf generator one request at a time, mean-diff extractor batch 1) vs fast."""

from __future__ import annotations

import _bench
from conftest import run


def _trait_run(bench, generator: str, extractor: str, n: int, one_at_a_time: bool):
    """Generation requests with fixed-length output (end-of-turn ignored), then extraction of all pairs."""
    from harness.config import Settings
    from harness.plugins import build_registry, get_plugin_manager
    from harness.records import Generation

    lm, w = bench["lm"], bench["work"]
    s = Settings(batch_size=1 if one_at_a_time else 0, extract_batch_size=1 if one_at_a_time else 16,
                 plugin_config={"fast": {"ignore_eos": True}})
    pm = get_plugin_manager(entrypoints=False)
    ex = build_registry(pm, "extractor").create(extractor, s)

    class Ctx:
        settings = s

        def model(self, model_id=None):
            return lm

    ctx = Ctx()
    prompts = _bench.prompts_for(lm, w)[:n]
    if generator == "fast":
        outs = _bench.fast_generate(lm, prompts, w.new_tokens)
    else:
        outs = [_bench.hf_generate(lm, [p], w.new_tokens)[0] for p in prompts] if one_at_a_time \
            else _bench.hf_generate(lm, prompts, w.new_tokens)
    gens = [Generation(id=str(i), trait="bench", split="extract", polarity="pos" if i % 2 == 0 else "neg",
                       question_index=i // 2, question="", instruction_index=0, sample_index=0, system_prompt="",
                       response="", response_token_ids=tuple(o), prompt_token_ids=tuple(p), finish_reason="length",
                       model_id=lm.model_id, generator=generator) for i, (p, o) in enumerate(zip(prompts, outs))]
    if lm.tokenizer is None:
        lm.tokenizer = _bench._NoTok()
    pos = [g for g in gens if g.polarity == "pos"]
    neg = [g for g in gens if g.polarity == "neg"]
    return ex.extract(type("T", (), {"name": "bench"})(), pos, neg, ctx)


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
