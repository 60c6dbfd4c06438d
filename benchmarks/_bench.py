"""Shared pieces of the benchmarks: models, workloads, the floor, the seed-style loops.

Models: ``qwen7b-shape`` (Qwen2.5-7B's public config, random bf16 weights, built on the device, no
download), ``smollm2`` (the embedded model) and ``tiny``. Work: ``n`` prompts of ``prompt_len`` ids,
``new_tokens`` generated ids each (end-of-turn ignored, so every path does the same work), then
all-layer means over the ``n x (prompt_len + new_tokens)`` tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Qwen2.5-7B(-Instruct) config.json values
QWEN7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
              intermediate_size=18944, vocab_size=152064, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=False, max_position_embeddings=32768, hidden_act="silu",
              use_sliding_window=False, sliding_window=None, max_window_layers=28)


@dataclass
class Work:
    n: int
    prompt_len: int
    new_tokens: int
    seed_items: int  # items the seed-style loops run (their per-item time is scaled to n)
    rounds: int


def work_for(model: str, smoke: bool) -> Work:
    if model == "qwen7b-shape" and not smoke:
        return Work(n=200, prompt_len=70, new_tokens=256, seed_items=2, rounds=3)
    if smoke:
        return Work(n=6, prompt_len=12, new_tokens=8, seed_items=2, rounds=1)
    return Work(n=32, prompt_len=40, new_tokens=32, seed_items=2, rounds=2)


def build_model(name: str, device: str = "auto", dtype: str | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.models.loading import LoadedModel, load_hf_model, resolve_device

    dev = resolve_device(device)
    if name == "smollm2":
        return load_hf_model("smollm2", device=str(dev), dtype="auto")
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if name == "qwen7b-shape":
        cfg = AutoConfig.for_model("qwen2", **QWEN7B)
    elif name == "tiny":
        cfg = AutoConfig.for_model("qwen2", **{**QWEN7B, "hidden_size": 64, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "num_key_value_heads": 2,
                                               "intermediate_size": 128, "vocab_size": 4096})
    else:
        raise ValueError(f"--bench-model {name!r}: use qwen7b-shape, smollm2 or tiny")
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)  # no autograd graphs through the weights (not a process-wide switch)
    return LoadedModel(model=model, tokenizer=None, model_id=name, device=dev, dtype=dtype,
                       info={"class": type(model).__name__, "random_weights": True})


def prompts_for(lm, w: Work, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    hi = min(int(lm.model.config.vocab_size), 32000)
    return [[rng.randrange(10, hi) for _ in range(w.prompt_len)] for _ in range(w.n)]


def examples_for(lm, w: Work) -> list[tuple[list[int], list[int]]]:
    import random

    rng = random.Random(1)
    hi = min(int(lm.model.config.vocab_size), 32000)
    return [(p, [rng.randrange(10, hi) for _ in range(w.new_tokens)]) for p in prompts_for(lm, w)]


def tokenizer_dir() -> str:
    """The tokenizer the random-weight benchmark models use: ``$PERSONA_HARNESS_BENCH_TOKENIZER`` (a folder
    with the embedded model's tokenizer files, for machines without the embedded GGUF) or the embedded
    model's own folder."""
    import os

    from harness.models.loading import embedded_model_dir

    return os.environ.get("PERSONA_HARNESS_BENCH_TOKENIZER") or str(embedded_model_dir())


def judge_work(tok, spec, gens, exact: bool) -> tuple[int, int]:
    """Ids the local judge must run at least (each rubric's shared prefix once, every prompt's remainder,
    the number trie per judgment) and the rows that need logits, for ``gens`` judged on ``spec``."""
    import os

    from harness_plugins.judge_local import NumberTrie

    from harness.core.rubrics import judge_items
    from harness.models.loading import prompt_ids

    trie = NumberTrie(tok)
    tree = trie.n if exact else len(set(trie.parent[1:]))  # not exact: the nodes with children
    by_metric: dict[str, list[list[int]]] = {}
    for it in judge_items(spec.name, spec.eval_prompt, gens):
        by_metric.setdefault(it.metric, []).append(prompt_ids(tok, [{"role": "user", "content": it.prompt}],
                                                              thinking=False))
    body = logits = 0
    for ps in by_metric.values():
        lp = len(os.path.commonprefix(ps))
        body += lp + sum(len(p) - lp + tree for p in ps)
        logits += len(ps) * (1 + tree)
    return body, logits


def sync(lm) -> None:
    import torch

    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def device_info(lm) -> dict:
    import platform

    import torch
    import transformers

    name = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "dtype": str(lm.dtype).replace("torch.", ""), "torch": torch.__version__,
            "transformers": transformers.__version__, "model": lm.model_id,
            "params": sum(p.numel() for p in lm.model.parameters())}


_CEIL: dict = {}


def ceilings(lm) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16/fp32 matmul rate."""
    import torch

    key = str(lm.device)
    if key in _CEIL:
        return _CEIL[key]
    dev = lm.device
    cuda = dev.type == "cuda"
    nbytes = (1 << 30) if cuda else (64 << 20)
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    n = 8192 if cuda else 512
    dt = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(n, n, device=dev, dtype=dt)
    y = torch.randn(n, n, device=dev, dtype=dt)

    def timeit(fn, reps):
        fn()
        sync(lm)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(lm)
        return (time.perf_counter() - t) / reps

    tc = timeit(lambda: b.copy_(a), 20 if cuda else 5)
    tm = timeit(lambda: x @ y, 20 if cuda else 3)
    _CEIL[key] = {"copy_bytes_per_s": 2 * nbytes / tc, "matmul_flops_per_s": 2 * n ** 3 / tm}
    del a, b, x, y
    return _CEIL[key]


def warm_up(lm) -> None:
    """One short HF generate and one forward, so the first timed test (a baseline) does not pay for
    CUDA/cuBLAS initialisation. The fast engine's own compile + graph capture is paid per shape in
    each fast test's warm-up round."""
    import torch

    hi = min(int(lm.model.config.vocab_size), 32000)
    hf_generate(lm, [[11 % hi] * 8, [12 % hi] * 6], 4)
    with torch.inference_mode():
        lm.model(torch.full((2, 16), 13 % hi, device=lm.device), output_hidden_states=True)
    sync(lm)


def linear_params(lm) -> int:
    """Weights a token's forward multiplies by (all but the embedding table)."""
    emb = lm.model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in lm.model.parameters()) - emb


def gen_floor(lm, w: Work) -> float:
    """Seconds: prefill compute + per decode step max(weights + KV bytes / bw, flops / rate)."""
    c = ceilings(lm)
    cfg = lm.model.config
    item = lm.model.dtype.itemsize
    wbytes = sum(p.numel() for p in lm.model.parameters()) * item
    kvh = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_tok = cfg.num_hidden_layers * 2 * kvh * hd * item
    P = linear_params(lm)
    t = 2 * P * w.n * w.prompt_len / c["matmul_flops_per_s"]
    for s in range(1, w.new_tokens):
        by = wbytes + kv_tok * w.n * (w.prompt_len + s)
        t += max(by / c["copy_bytes_per_s"], 2 * P * w.n / c["matmul_flops_per_s"])
    return t


def extract_floor(lm, w: Work) -> float:
    c = ceilings(lm)
    P = linear_params(lm) - lm.model.get_output_embeddings().weight.numel()  # no lm_head
    return 2 * P * w.n * (w.prompt_len + w.new_tokens) / c["matmul_flops_per_s"]


# ----------------------------------------------------------------------------- the paths
def hf_generate(lm, prompts, new_tokens: int):
    """Plain HF ``generate`` on the given prompts at once (left-padded), fixed length."""
    import torch
    from transformers import GenerationConfig

    P = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    gc = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), generation_config=gc)
    return out[:, P:].tolist()


def seed_generate(lm, prompts, new_tokens: int):
    """The seed's loop: one prompt at a time."""
    return [hf_generate(lm, [p], new_tokens)[0] for p in prompts]


def fast_generate(lm, prompts, new_tokens: int, temperature: float = 1.0, fused: str = "auto"):
    from harness.engine import Engine

    outs = Engine.for_model(lm, fused=fused).generate(prompts, new_tokens, temperature=temperature,
                                                      seeds=list(range(len(prompts))), ignore_eos=True)
    return [o.ids for o in outs]


def _gens(examples):
    from harness.core.records import Generation

    return [Generation(id=str(i), trait="b", split="extract", polarity="pos", question_index=i, question="",
                       instruction_index=0, sample_index=0, system_prompt="", response="",
                       response_token_ids=tuple(r), prompt_token_ids=tuple(p), finish_reason="length",
                       model_id="b", generator="b") for i, (p, r) in enumerate(examples)]


def ref_extract(lm, examples, batch_size: int):
    """The reference extractor (output_hidden_states); batch_size=1 is the seed's loop."""
    from harness_plugins.extract_mean_diff import mean_activations

    if lm.tokenizer is None:
        lm.tokenizer = _NoTok()
    return mean_activations(lm, _gens(examples), batch_size)


def fast_extract(lm, examples, fused: str = "auto"):
    from harness.engine import Engine

    return Engine.for_model(lm, fused=fused).extract_sums(examples)


class _NoTok:
    pad_token_id = 0


CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(texts):
    """A word-level ChatML tokenizer built in code from ``texts`` (no files, no hub): the benchmark
    models have random weights and no tokenizer; this one gives prompts of realistic length (~70
    tokens for a trait's system prompt + question) so the pipeline benchmark runs the real stages."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t):
            vocab.setdefault(w, len(vocab))
    for w in ("system", "user", "assistant"):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def bench_trait(n_pairs: int | None = None, n_questions: int | None = None):
    """The shipped ``sycophantic`` extraction split (5 pairs x 20 questions = 200 requests), or a cut."""
    import dataclasses
    from pathlib import Path

    from harness.core.traits import load_trait_path

    spec = load_trait_path(Path(__file__).resolve().parent.parent / "traits" / "sycophantic")
    return dataclasses.replace(spec, instructions=spec.instructions[:n_pairs], questions=spec.questions[:n_questions],
                               eval_questions=())


class ConstantJudge:
    """Stands in for the judge (the benchmark is the run *without* the judge): pos 90, neg 10,
    coherence 90, so every pair is kept and extraction covers every response."""

    name = "bench-constant"
    needs_model = False

    def __init__(self, settings):
        self.settings = settings

    @property
    def model_id(self):
        return "constant"

    def config(self):
        return {}

    def batch_size(self, ctx):
        return int(self.settings.judge_batch_size)

    def judge(self, items, ctx):
        from harness.core.records import Judgment

        out = []
        for it in items:  # request ids are {trait}_{split}_{question}_{pos|neg}_{pair}_{sample}
            pol = it.generation_id.rsplit("_", 3)[1]
            score = 90.0 if it.metric == "coherence" or pol == "pos" else 10.0
            out.append(Judgment(generation_id=it.generation_id, metric=it.metric, score=score, reason=None,
                                judge=self.name, judge_model="constant", detail={}))
        return out


class BenchJudgePlugin:
    from harness.core.hookspecs import hookimpl

    @hookimpl
    def harness_register_judges(self, register):
        register("bench-constant", ConstantJudge, description="benchmark stand-in: pos 90, neg 10")


def pipeline_run(lm, w, generator: str, extractor: str, one_at_a_time: bool, spec, workdir):
    """``run_trait`` over the real stages (requests, chat template, generate, judge stand-in, filter,
    extract, run directory) into a fresh ``workdir`` (no cache hits), fixed-length responses."""
    import os
    import tempfile

    from harness.core.config import Settings
    from harness.core.pipeline import run_trait
    from harness.core.plugins import get_plugin_manager

    d = tempfile.mkdtemp(dir=workdir)
    s = Settings(model=lm.model_id, generator=generator, extractor=extractor, judge="bench-constant",
                 out_dir=os.path.join(d, "run"), cache_dir=os.path.join(d, "cache"), max_new_tokens=w.new_tokens,
                 temperature=1.0, profile="paper", progress=False, splits=("extract",),
                 batch_size=1 if one_at_a_time else 0, extract_batch_size=1 if one_at_a_time else 16,
                 plugin_config={"fast": {"ignore_eos": True}, "hf": {"ignore_eos": True}})
    pm = get_plugin_manager(entrypoints=False)
    from harness.testing import StaticModelPlugin

    pm.register(StaticModelPlugin(lm), name="bench-model")
    pm.register(BenchJudgePlugin(), name="bench-judge")
    return run_trait(spec, s, pm=pm, splits=("extract",))


def run(benchmark, bench, fn, rounds):
    """Time ``fn`` (pedantic: fixed rounds, one warm-up) and return the median seconds."""
    lm = bench["lm"]

    def call():
        r = fn()
        sync(lm)
        return r

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1 if rounds > 1 else 0, iterations=1)
    st = getattr(benchmark, "stats", None)
    if st is None or getattr(st, "stats", None) is None:  # --benchmark-disable: time once ourselves
        import time

        t = time.perf_counter()
        call()
        return time.perf_counter() - t
    return st.stats.median


# --------------------------------------------------------------------------- the paper's workload
@dataclass
class PaperWork:
    """The paper's extraction generation for one trait: 5 pairs x 20 questions x 10 samples x pos/neg
    = 2000 requests, up to 1000 new tokens, temperature 1.

    Prompt lengths: the shipped traits' (system prompt + question) word counts x 1.3 + 12 (chat
    template), cycled over the shipped traits' pairs and questions. Stop model: ``n_stop`` ids form the
    end-of-turn set; a random-weight model's logits are near uniform, so every step stops with
    probability about ``n_stop / vocab``: lengths are geometric with mean ``vocab / n_stop`` (2.5 per
    mille of the vocabulary per token: mean 400, about 360 after the cap at 1000 for Qwen2.5's 152064
    ids), capped at ``max_new``."""

    n: int
    max_new: int
    rounds: int


def paper_work(smoke: bool) -> PaperWork:
    return PaperWork(n=12, max_new=24, rounds=1) if smoke else PaperWork(n=2000, max_new=1000, rounds=1)


def paper_prompts(lm, w: PaperWork) -> list[list[int]]:
    import random
    from pathlib import Path

    from harness.core.traits import load_trait_path

    lens = []
    for d in sorted((Path(__file__).resolve().parent.parent / "traits").iterdir()):
        if not (d / "extract.json").is_file():
            continue
        spec = load_trait_path(d)
        for ins in spec.instructions:
            for q in spec.questions:
                for sysp in (ins.pos, ins.neg):
                    lens.append(int(1.3 * len((sysp + " " + q).split())) + 12)
    rng = random.Random(7)
    hi = min(int(lm.model.config.vocab_size), 32000)
    return [[rng.randrange(10, hi) for _ in range(lens[i % len(lens)])] for i in range(w.n)]


def paper_stop_ids(lm, w: PaperWork) -> list[int]:
    V = int(lm.model.config.vocab_size)
    k = max(1, round(V * 2.5 / 1000)) if w.max_new >= 1000 else max(1, round(V / (0.4 * w.max_new)))
    return list(range(V - k, V))  # ids the prompts never use (they draw from the first 32000)


def paper_generate(lm, w: PaperWork, *, continuous: bool, ignore_eos: bool = False, n: int | None = None,
                   graphs: str = "auto"):
    import torch

    from harness.engine import Engine

    prompts = paper_prompts(lm, w)[: n or w.n]
    seeds = [(i * 0x9E3779B97F4A7C15) & ((1 << 62) - 1) for i in range(len(prompts))]
    eng = Engine.for_model(lm, continuous=continuous, graphs=graphs)
    with torch.inference_mode():
        outs = eng.generate(prompts, w.max_new, temperature=1.0, seeds=seeds, stop_ids=paper_stop_ids(lm, w),
                            pad_id=0, ignore_eos=ignore_eos)
    return prompts, outs, eng


def paper_examples(lm, w: PaperWork) -> list[tuple[list[int], list[int]]]:
    """The paper's extraction input: each request's prompt and a response whose length follows the stop
    model (geometric, mean ``vocab / n_stop``, capped at ``max_new``), seeded, of random ids."""
    import math
    import random

    rng = random.Random(11)
    V = int(lm.model.config.vocab_size)
    q = len(paper_stop_ids(lm, w)) / V
    hi = min(V, 32000)
    out = []
    for p in paper_prompts(lm, w):
        n = min(w.max_new, 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - q)))
        out.append((p, [rng.randrange(10, hi) for _ in range(n)]))
    return out


def paper_floor(lm, prompts, lengths) -> float:
    """Compute floor: 2 x weights x every prompt and generated token, at the measured matmul rate."""
    c = ceilings(lm)
    return 2 * linear_params(lm) * (sum(map(len, prompts)) + sum(lengths)) / c["matmul_flops_per_s"]
