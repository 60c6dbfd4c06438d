"""``Engine``: generation and extraction for one loaded model, batch sizes from free memory.

The pieces live beside it: ``decode`` (prefill, decode loop, graphs), ``extract`` (hooked extraction),
``attention`` / ``kv_cache`` / ``kernels`` (what the decode loop runs), ``support`` (which
architectures, and the per-architecture pieces around the decoder blocks).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

from harness.core.batching import is_oom
from harness.engine.attention import AttnSwap, attention_name
from harness.engine.decode import Continuous, Decoder, GenOutput
from harness.engine.extract import extract_batch, extract_row_bytes, extract_sums
from harness.engine.kernels import FusedSwap, fused_impl
from harness.engine.support import base_model
from harness.models.activations import METHODS

_ENGINES: "weakref.WeakKeyDictionary[Any, Engine]" = weakref.WeakKeyDictionary()


def out_of_memory_error():
    """torch's out-of-memory exception class (``torch.OutOfMemoryError`` or the older CUDA one)."""
    import torch

    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class Engine:
    """Generation and extraction for one loaded model (``Engine.for_model(lm)`` caches it)."""

    def __init__(self, lm, *, graphs: str = "auto", kv_bucket: int = 64, max_batch: int = 512, fused: str = "auto",
                 continuous: bool = True, refill_every: int = 16, compact_min_rows: int = 16):
        self.lm = lm
        self.model = lm.model
        self.base = base_model(lm.model)
        cfg = self.model.config
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_layers = len(self.base.layers)
        self.hidden = int(cfg.hidden_size)
        self.n_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.n_heads)
        self.vocab = int(cfg.vocab_size)
        self.inter = int(getattr(cfg, "intermediate_size", 4 * self.hidden))
        self.graphs = graphs
        # fused: "auto" / "triton" (on CUDA: the Triton decode attention and Gumbel sampling; nothing on CPU),
        # "compile" (those plus Inductor-compiled elementwise pieces: a first call that compiles for tens of
        # seconds, and slower prefills of changing shapes), "eager" (the swap uncompiled: CPU tests), "off"
        if fused not in ("auto", "compile", "triton", "eager", "off"):
            raise ValueError(f"Engine(fused={fused!r}): use 'auto', 'compile', 'triton', 'eager' or 'off'")
        self.fused = fused
        cuda = self.device.type == "cuda"
        self.fused_compile = fused == "compile" and cuda
        self.fused_triton = fused in ("auto", "compile", "triton") and cuda
        self.fused_swap = self.fused == "eager" or self.fused_triton
        self.fused_mode = "compile" if self.fused_compile else "triton" if self.fused_triton else "eager"
        self.kv_bucket = kv_bucket
        self.max_batch = max_batch
        # continuous batching: a finished row takes the next request (checked every refill_every steps)
        self.continuous = bool(continuous)
        self.refill_every = int(refill_every)
        # once the queue is empty, the running rows move to a batch of the next power of two >= their number
        self.compact_min_rows = int(compact_min_rows)
        self.stats: dict[str, Any] = {}
        self.decoder = Decoder(self)

    @classmethod
    def for_model(cls, lm, **kw) -> "Engine":
        kw = {"graphs": "auto", "kv_bucket": 64, "max_batch": 512, "fused": "auto", "continuous": True,
              "refill_every": 16, "compact_min_rows": 16, **kw}
        e = _ENGINES.get(lm.model)
        if e is None or any(getattr(e, k) != v for k, v in kw.items()):
            e = cls(lm, **kw)
            _ENGINES[lm.model] = e
        return e

    # ---------------------------------------------------------------- memory / batch size
    def free_memory(self) -> int:
        import torch

        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free) + self.decoder.cache_bytes()
        return 8 << 30

    def gen_row_bytes(self, prompt_len: int, capacity: int) -> int:
        item = 2 if self.dtype.is_floating_point and self.dtype.itemsize == 2 else 4
        kv = self.n_layers * 2 * self.kv_heads * self.head_dim * capacity * item
        logits = self.vocab * 48  # fp32 logits, scaled copy, int64 noise temporaries
        prefill = prompt_len * (self.inter * 3 + self.hidden * 8 + self.n_heads * prompt_len * 2) * item
        return kv + logits + prefill

    def gen_batch_size(self, n: int, prompt_len: int, capacity: int) -> int:
        per = self.gen_row_bytes(prompt_len, capacity)
        b = int(self.free_memory() * 0.7 // max(per, 1))
        return max(1, min(n, self.max_batch, b))

    def extract_row_bytes(self) -> int:
        return extract_row_bytes(self)

    # ------------------------------------------------------------- what the passes run under
    def attention(self) -> AttnSwap:
        """The engine's attention on every config of the model (fused softmax when the swap is on)."""
        return AttnSwap(self.model, attention_name(fused_impl(self.fused_mode) if self.fused_swap else None))

    def fused_ctx(self, exact_norm: bool = False) -> FusedSwap:
        return FusedSwap(self.model, self.fused_mode, enabled=self.fused_swap, exact_norm=exact_norm)

    def note_fused(self) -> None:
        errs = fused_impl(self.fused_mode).errors
        if errs:
            self.stats.setdefault("fused_errors", {}).update(errs)

    # --------------------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seeds: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
                 pad_id: int = 0, ignore_eos: bool = False, batch_size: int | None = None) -> list[GenOutput]:
        """Generate for every prompt (token ids); batches chosen from free memory, halved on OOM.

        Continuous batching (default): the batch's rows take queued requests as earlier ones finish;
        without it, static batches of length-sorted prompts run until their longest row stops."""
        n = len(prompts)
        if n == 0:
            return []
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        seeds = list(seeds) if seeds is not None else [0] * n
        P_all = max(len(p) for p in prompts)
        cap = self._capacity(P_all, max_new_tokens)
        bs = batch_size or self.gen_batch_size(n, P_all, cap)
        results: dict[int, GenOutput] = {}
        if self.continuous:
            while len(results) < n:
                remaining = [j for j in order if j not in results]  # what an out-of-memory left unfinished
                try:
                    self._generate_continuous(remaining, prompts, max_new_tokens, temperature, top_p, seeds, stop_ids,
                                              pad_id, ignore_eos, cap, slots=min(bs, len(remaining)), n=n,
                                              results=results)
                except Exception as e:
                    bs = self._halve_after_oom(e, min(bs, len(remaining)))
            self.stats["batch_size"] = bs
            return [results[j] for j in range(n)]
        i = 0
        while i < n:
            nb = math.ceil((n - i) / bs)
            b = math.ceil((n - i) / nb)
            idx = order[i: i + b]
            try:  # batch row r is prompt idx[r]: the blocks' hooks (steering) get it with every call
                outs = self._generate_batch([prompts[j] for j in idx], max_new_tokens, temperature, top_p,
                                            [seeds[j] for j in idx], stop_ids, pad_id, ignore_eos, cap,
                                            rows=idx, n=n)
            except Exception as e:
                bs = self._halve_after_oom(e, bs)
                continue
            for j, o in zip(idx, outs):
                results[j] = o
            i += len(idx)
        self.stats["batch_size"] = bs
        return [results[j] for j in range(n)]

    def _halve_after_oom(self, error: Exception, bs: int) -> int:
        """Re-raise ``error`` unless it is an out-of-memory error at a batch size above 1; else free the
        decoder's state and the allocator's cache and return the halved batch size."""
        import torch

        if not is_oom(error) or bs == 1:
            raise error
        self.decoder.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats["oom_halvings"] = self.stats.get("oom_halvings", 0) + 1
        return max(1, bs // 2)

    def _capacity(self, P: int, max_new: int) -> int:
        need = P + max_new
        return int(math.ceil(need / self.kv_bucket) * self.kv_bucket)

    def _generate_batch(self, prompts, max_new, temperature, top_p, seeds, stop_ids, pad, ignore_eos, cap,
                        rows=None, n=None) -> list[GenOutput]:
        return self.decoder.run(prompts, max_new, temperature, top_p, seeds, stop_ids, pad, ignore_eos, cap,
                                rows=rows, n=n)

    def _generate_continuous(self, queue, prompts, max_new, temperature, top_p, seeds, stop_ids, pad, ignore_eos, cap,
                             slots, n, results) -> None:
        """Continuous batching of requests ``queue`` over ``slots`` rows; finished ones land in ``results``."""
        Continuous(self.decoder, slots, cap, max_new, temperature, top_p, stop_ids, pad, ignore_eos, n,
                   self.refill_every, self.compact_min_rows).run(queue, prompts, seeds, results)

    # ---------------------------------------------------------------------------- extract
    def extract_sums(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], methods: Sequence[str] = METHODS,
                     token_budget: int | None = None) -> tuple[dict[str, Any], int]:
        """Sum over examples of per-example means at every hidden_states index: {method: [L+1, H] fp32}."""
        return extract_sums(self, examples, methods, token_budget)

    def _extract_batch(self, chunk, T, pad, methods, state) -> None:
        extract_batch(self, chunk, T, pad, methods, state)
