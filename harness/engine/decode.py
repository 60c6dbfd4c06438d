"""The engine's generation: prefill, the decode loop, CUDA graphs.

* the model's own decoder layers are called as modules (forward hooks fire), with the engine's
  attention (``attention.py``), a static cache (``kv_cache.py``) and the architecture's pieces around
  the blocks (``support.Arch``: embedding multiplier, rotary tables per layer type, sliding-window
  masks, logit scaling and soft-capping);
* every block call gets a ``harness.models.blockcall.BlockCall`` (real positions, prefill or decode,
  which caller row each batch row is), so hooks such as steering know what HF's forward would tell them;
* logits for the last position only; sampling on the device (``kernels.sample_step`` or the fused
  Gumbel kernel), with the step as a tensor;
* on CUDA each decode step is captured once per KV-length bucket in a CUDA graph and replayed; graphs are
  kept between calls of the same batch shape and dropped when the model's hooks change; with hooks on the
  model (steering) the step runs eagerly unless ``graphs="always"`` (replay freezes what a hook does);
* per-row stop at end-of-turn (finished rows emit padding; the loop ends once all rows stop);
* continuous batching (``Continuous``, the engine's default): a finished row takes the next queued
  request, prefilled into that row's own slots, so the batch stays full until the queue drains; every
  row has its own positions, write slot, mask and sampling step, so its tokens equal a static batch's.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from harness.engine.kernels import gumbel_argmax_cuda, sample_step
from harness.engine.kv_cache import StaticKVCache
from harness.engine.support import ARCHS, Arch, layer_windows
from harness.models.batch import left_padded
from harness.models.blockcall import BlockCall
from harness.models.loading import cache_kwarg

if TYPE_CHECKING:  # pragma: no cover
    from harness.engine.engine import Engine


@dataclass
class GenOutput:
    ids: list[int]  # generated ids, end-of-turn token excluded
    finish_reason: str  # "stop" | "length"

    @classmethod
    def of(cls, row: Sequence[int], stopset: set, ignore_eos: bool, max_new: int) -> "GenOutput":
        """A row of generated ids, cut before its first stop id ("stop"), else its first ``max_new`` ("length")."""
        cut = None if ignore_eos else next((k for k, x in enumerate(row) if x in stopset), None)
        return cls(list(row[:cut]), "stop") if cut is not None else cls(list(row[:max_new]), "length")


def stop_key_of(stop_ids, ignore_eos: bool) -> tuple[int, ...] | None:
    """The stop ids a loop checks, sorted and unique; None when it checks none (``ignore_eos`` or no ids)."""
    return None if ignore_eos or not stop_ids else tuple(sorted(set(int(x) for x in stop_ids)))


def hook_signature(model) -> tuple:
    """Forward hooks on the model's modules, ignoring transformers' own (inactive) output-capturing hooks."""
    sig = []
    for name, m in model.named_modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            keys = tuple(k for k, f in d.items() if not getattr(f, "__module__", "").startswith("transformers."))
            if keys:
                sig.append((name, keys))
    return tuple(sig)


class Slot:
    """Cache, state tensors and captured graphs for one (batch, capacity) shape."""

    def __init__(self, engine: "Engine", B: int, capacity: int, max_new: int):
        import torch

        e = engine
        dev = e.device
        self.B, self.capacity, self.max_new = B, capacity, max_new
        self.cache = StaticKVCache(e.n_layers, B, e.kv_heads, capacity, e.head_dim, e.dtype, dev)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(B, capacity, dtype=torch.bool, device=dev)
        self.slots = torch.arange(capacity, device=dev)  # slot index, for sliding-window masks
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(B, dtype=torch.long, device=dev)
        self.wpos = torch.zeros(1, dtype=torch.long, device=dev)
        self.stops = None  # stop table (``Decoder.stop_table``) of ``stop_key``
        self.stop_key = None
        self.out = torch.zeros(B, max_new, dtype=torch.long, device=dev)
        self.graphs: dict = {}
        self.pool = None
        self.hook_sig = None

    def graphs_for(self, sig: tuple) -> None:
        """Keep the captured graphs if they were captured under ``sig`` (hooks, sampling, stops), else drop
        them. New graphs get a new private pool: capturing into the pool of the graphs just destroyed trips
        the caching allocator (use_count assert, torch 2.11), and every later step then ran eagerly."""
        if self.hook_sig != sig:
            self.graphs.clear()
            self.pool = None
            self.hook_sig = sig


class Decoder:
    """Prefill and decode for one engine's model; owns the slot (cache, state, graphs) of the last shape."""

    def __init__(self, engine: "Engine"):
        import torch

        self.e = engine
        self.model, self.base = engine.model, engine.base
        cfg = self.model.config
        arch = ARCHS.get(getattr(cfg, "model_type", ""), Arch(""))
        self.emb_mult = getattr(cfg, arch.embedding_multiplier) if arch.embedding_multiplier else None
        self.logits_div = getattr(cfg, arch.logits_divisor) if arch.logits_divisor else None
        self.logits_mul = getattr(cfg, arch.logits_multiplier) if arch.logits_multiplier else None
        self.softcap = getattr(cfg, arch.final_softcap, None) if arch.final_softcap else None
        self.windows = layer_windows(cfg, engine.n_layers)
        rope = getattr(self.base, "rotary_emb", None)
        takes_type = rope is not None and "layer_type" in inspect.signature(rope.forward).parameters
        types = getattr(cfg, "layer_types", None)
        self.rope_types = list(types)[: engine.n_layers] if takes_type and types else None  # table per layer type
        self.cache_kw = cache_kwarg(self.base.layers[0])
        self.min_val = torch.finfo(torch.float32).min
        self.slot: Slot | None = None

    def stop_table(self, stop_key: tuple[int, ...]):
        """Bool ``[V]`` table, True at the stop ids: ``table[tokens]`` is a gather, which a CUDA graph can
        capture (``torch.isin`` against a few hundred ids sorts, and invalidates the capture)."""
        import torch

        head = getattr(self.model.get_output_embeddings(), "weight", None)
        width = max(self.e.vocab, 0 if head is None else head.shape[0], max(stop_key) + 1)
        table = torch.zeros(width, dtype=torch.bool, device=self.e.device)
        table[torch.tensor(stop_key, dtype=torch.long, device=self.e.device)] = True
        return table

    def cache_bytes(self) -> int:
        return self.slot.cache.nbytes() if self.slot is not None else 0

    def reset(self) -> None:
        self.slot = None

    # ------------------------------------------------------------------------ forward bits
    def forward(self, ids, pos, masks: dict, cache, call: BlockCall):
        """Logits at the last position; ``masks``: additive mask per sliding window (None: full attention)."""
        import torch

        h = self.base.embed_tokens(ids)
        if self.emb_mult is not None:
            h = h * self.emb_mult
        if self.rope_types is not None:
            tables = {t: self.base.rotary_emb(h, pos, t) for t in dict.fromkeys(self.rope_types)}
        else:
            pe = self.base.rotary_emb(h, pos)
        kw = {self.cache_kw: cache, **call.kwargs()}
        for i, layer in enumerate(self.base.layers):
            if self.rope_types is not None:
                pe = tables[self.rope_types[i]]
            out = layer(h, attention_mask=masks[self.windows[i]], position_ids=pos, use_cache=True,
                        position_embeddings=pe, **kw)
            h = out[0] if isinstance(out, tuple) else out
        h = self.base.norm(h[:, -1])
        logits = self.model.lm_head(h)  # model dtype: argmax of bf16 equals argmax of its fp32 copy
        if self.logits_div is not None:
            logits = logits / self.logits_div
        if self.logits_mul is not None:
            logits = logits * self.logits_mul
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def prefill_masks(self, att) -> dict:
        """Additive ``[B, 1, P, P]`` masks: causal, real keys only, and each sliding window."""
        import torch

        P = att.shape[1]
        dev = att.device
        allow = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None] & att[:, None, :]
        masks = {}
        for w in dict.fromkeys(self.windows):
            a = allow
            if w is not None:
                i = torch.arange(P, device=dev)
                a = a & ((i[:, None] - i[None, :]) < w)[None]  # HF: key index > query index - window
            masks[w] = torch.where(a, 0.0, self.min_val)[:, None]
        return masks

    def decode_masks(self, s: Slot, kv: int) -> dict:
        """Additive ``[B, 1, 1, kv]`` masks for the token at slot ``s.wpos``."""
        import torch

        valid = s.valid[:, :kv]
        masks = {}
        for w in dict.fromkeys(self.windows):
            a = valid if w is None else valid & (s.slots[:kv] > s.wpos - w)
            masks[w] = torch.where(a, 0.0, self.min_val)[:, None, None, :]
        return masks

    def sample(self, logits, seeds, step_t, temperature: float, top_p: float):
        e = self.e
        if e.fused_triton and temperature > 0 and top_p >= 1.0 and "gumbel" not in e.stats.get("fused_errors", {}):
            try:
                return gumbel_argmax_cuda(logits, seeds, step_t, temperature)
            except Exception as ex:
                e.stats.setdefault("fused_errors", {})["gumbel"] = repr(ex)[:400]
        return sample_step(logits, seeds, step_t, temperature, top_p)

    def decode_step(self, s: Slot, temperature: float, top_p: float, pad: int, stop_ids, call: BlockCall) -> None:
        """One decode step, all in place on the slot's state (so it can be captured in a graph)."""
        import torch

        logits = self.forward(s.ids, s.pos, self.decode_masks(s, s.cache.kv_len), s.cache, call)
        nxt = self.sample(logits, s.seeds, s.step, temperature, top_p)
        nxt = torch.where(s.done, torch.full_like(nxt, pad), nxt)
        s.out.index_copy_(1, s.step, nxt[:, None])
        if stop_ids is not None:
            s.done |= stop_ids[nxt]
        s.ids.copy_(nxt[:, None])
        s.pos.add_(1)
        s.cache.write_pos.add_(1)
        s.valid.index_fill_(1, s.cache.write_pos, True)
        s.step.add_(1)

    def use_graphs(self) -> bool:
        e = self.e
        if e.device.type != "cuda" or e.graphs == "never":
            return False
        if e.graphs == "always":
            return True
        return not hook_signature(self.model)

    def get_slot(self, B: int, cap: int, max_new: int) -> Slot:
        s = self.slot
        if s is None or s.B != B or s.capacity < cap or s.max_new < max_new:
            self.slot = None
            s = self.slot = Slot(self.e, B, max(cap, s.capacity if s is not None and s.B == B else 0),
                                 max(max_new, s.max_new if s is not None and s.B == B else 0))
        return s

    # --------------------------------------------------------------------------- one batch
    def run(self, prompts, max_new, temperature, top_p, seeds, stop_ids, pad, ignore_eos, cap,
            rows: Sequence[int] | None = None, n: int | None = None) -> list[GenOutput]:
        """Generate for one batch of prompts (token ids); ``rows``/``n``: which of the caller's ``n``
        rows each batch row is (told to the hooks on the blocks)."""
        import torch

        e = self.e
        dev = e.device
        B = len(prompts)
        P = max(len(p) for p in prompts)
        s = self.get_slot(B, cap, max_new)
        cache = s.cache
        # ---- reset state and prefill (eager; prompt lengths vary between calls)
        ids, att = left_padded(prompts, pad)
        ids, att = ids.to(dev), att.bool().to(dev)
        pos = (att.long().cumsum(-1) - 1).masked_fill(~att, 1)
        s.valid.zero_()
        s.valid[:, :P] = att
        s.done.zero_()
        s.out.fill_(pad)
        s.step.zero_()
        s.seeds.copy_(torch.tensor(seeds, dtype=torch.long))
        stop_key = stop_key_of(stop_ids, ignore_eos)
        if stop_key is None:
            s.stops = None
        elif s.stops is None or s.stop_key != stop_key:
            s.stops, s.stop_key = self.stop_table(stop_key), stop_key
        stops = s.stops
        cache.row_pos = cache.prefill_rows = None  # static layout: every row writes the same slot
        cache.write_pos = torch.arange(P, device=dev)
        cache.kv_len = P
        # hooks on the blocks: the real positions, prefill vs decode, and the caller's row of each batch row
        call = BlockCall(mask=att, prefill=True, rows=None if rows is None else tuple(rows), n=n)
        with torch.inference_mode(), e.attention(), e.fused_ctx():
            logits = self.forward(ids, pos, self.prefill_masks(att), cache, call)
            call = call.replace(mask=None, prefill=False)  # decode: one new, real token per row
            tok = self.sample(logits, s.seeds, s.step, temperature, top_p)
            s.out[:, 0] = tok
            if stops is not None:
                s.done |= stops[tok]
            s.ids.copy_(tok[:, None])
            s.pos.copy_(pos[:, -1:] + 1)
            s.wpos.fill_(P)
            cache.write_pos = s.wpos
            s.valid[:, P] = True
            s.step.fill_(1)
            use_graphs = self.use_graphs()
            if use_graphs:
                s.graphs_for((hook_signature(self.model), float(temperature), float(top_p), stop_key, pad))
            t = 1
            while t < max_new:
                kv = min(s.capacity, int(math.ceil((P + t) / e.kv_bucket) * e.kv_bucket))
                cache.kv_len = kv
                g = s.graphs.get(kv) if use_graphs else None
                if g is not None:
                    g.replay()
                elif use_graphs:
                    g = self.capture(s, kv, temperature, top_p, pad, stops, call)
                    if g is None:
                        use_graphs = False
                else:
                    self.decode_step(s, temperature, top_p, pad, stops, call)
                t += 1
                if stops is not None and t % 16 == 0 and bool(s.done.all()):
                    break
            out = s.out[:, :max_new].tolist()
        e.note_fused()
        stopset = set(stop_ids)
        return [GenOutput.of(out[r][:t] if stops is not None else out[r], stopset, ignore_eos, max_new)
                for r in range(B)]

    def capture(self, s: Slot, kv: int, temperature, top_p, pad, stops, call: BlockCall):
        return capture_graph(self.e, s, kv, lambda: self.decode_step(s, temperature, top_p, pad, stops, call))


def capture_graph(e: "Engine", s: Slot, key, step):
    """Run ``step`` eagerly on a side stream (warm-up: kernels compiled, allocations made), then capture
    it into a CUDA graph in the slot's private pool, kept as ``s.graphs[key]``. None when the capture
    fails (a hook that syncs or allocates on the host): the caller runs eagerly, ``graph_error`` says why."""
    import torch

    st = torch.cuda.Stream(e.device)
    st.wait_stream(torch.cuda.current_stream(e.device))
    with torch.cuda.stream(st):
        step()
    torch.cuda.current_stream(e.device).wait_stream(st)
    if s.pool is None:
        s.pool = torch.cuda.graph_pool_handle()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, pool=s.pool):
            step()
    except Exception as ex:
        e.stats["graph_error"] = repr(ex)[:300]
        s.pool = None  # a failed capture leaves its pool unusable for the next one
        return None
    s.graphs[key] = g
    e.stats["graphs"] = len(s.graphs)
    return g


def to_device(t, dev):
    """``t`` (a CPU tensor) on ``dev`` without waiting for the work queued there: on CUDA through pinned
    memory with a non-blocking copy (a plain ``.to("cuda")`` synchronizes the stream first)."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


class _Rows:
    """The loop's per-row state: views ``[:B]`` of the slot's full-size tensors (compaction shrinks ``B``
    in place: the rows still running move to the front and the step runs on the shorter views)."""

    def __init__(self, s: Slot, wp, stepv, B: int):
        self.B = B
        self.ids, self.pos, self.valid, self.done = s.ids[:B], s.pos[:B], s.valid[:B], s.done[:B]
        self.seeds, self.out = s.seeds[:B], s.out[:B]
        self.wp, self.stepv = wp[:B], stepv[:B]
        self.cache = s.cache.rows(B)


class _HostCopy:
    """A device-to-host copy that does not wait: pinned memory and an event on CUDA; a plain copy on CPU."""

    def __init__(self, t):
        import torch

        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.to("cpu", copy=True)

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Continuous:
    """Continuous batching over one slot of ``B`` rows: when a row's request finishes, the row takes
    the next queued request (its prompt prefilled into slots 0..P-1 of that row), so the batch stays
    full until the queue drains.

    Every row keeps its own position, write slot (``StaticKVCache.row_pos``), valid-key mask and sampling
    step, so a request's tokens depend on its prompt, seed and the model only (not on the batch, nor on
    when it entered): the same tokens as a static batch. Between checks, finished rows emit padding.

    The host never waits for the device in the loop: every ``refill_every`` steps it starts a copy of the
    rows' done flags to the host and reads the previous check's copy (long finished by then), harvests
    those rows' tokens with another copy that is read later, and prefills queued requests into the freed
    rows; the device keeps running the steps queued meanwhile. Once the queue is empty and at most half
    the rows still run, the running rows move to the front (KV cache included) and the step runs on a
    batch of the next power of two (down to ``min_rows``), so the drain does not pay for empty rows.
    On CUDA the decode step is captured once per (rows, KV-length bucket) and replayed."""

    def __init__(self, dec: "Decoder", B: int, cap: int, max_new: int, temperature: float, top_p: float,
                 stop_ids, pad: int, ignore_eos: bool, n: int, refill_every: int = 16, min_rows: int = 16):
        import torch

        self.dec, self.e = dec, dec.e
        dev = self.e.device
        self.cap, self.max_new = cap, max_new
        self.temperature, self.top_p, self.pad, self.n = temperature, top_p, pad, n
        self.refill_every = refill_every
        self.min_rows = max(1, min_rows)
        self.stop_key = stop_key_of(stop_ids, ignore_eos)
        self.stops = None if self.stop_key is None else dec.stop_table(self.stop_key)
        self.stopset = set(int(x) for x in stop_ids)
        self.ignore_eos = ignore_eos
        s = self.s = dec.get_slot(B, cap, max_new + 1)
        s.valid.zero_()
        s.done.fill_(True)  # empty rows: done until a request enters
        s.out.fill_(pad)
        self._wp = torch.zeros(B, dtype=torch.long, device=dev)
        self._stepv = torch.zeros(B, dtype=torch.long, device=dev)
        self.r = _Rows(s, self._wp, self._stepv, B)
        self.req: list[int | None] = [None] * B  # the request each row holds
        self.entry: list[tuple[int, int]] = [(0, 0)] * B  # (write slot of its first decode step, global step)
        self.pending: list = []  # harvests under way: (requests, steps copy, tokens copy)
        # where the loop's time goes (host clock; ``wait_s``: host waiting for a done-flag copy)
        self.prof = {"rows": B, "steps": 0, "replays": 0, "eager_steps": 0, "captures": 0, "refills": 0,
                     "entered": 0, "compactions": 0, "enter_s": 0.0, "wait_s": 0.0, "harvest_s": 0.0,
                     "busy_row_checks": 0, "row_checks": 0, "row_steps": 0, "loop_s": 0.0}

    @property
    def B(self) -> int:
        return self.r.B

    @property
    def cache(self):
        return self.r.cache

    # the current views' write slots and steps (diagnostics set and read them)
    @property
    def wp(self):
        return self.r.wp

    @property
    def stepv(self):
        return self.r.stepv

    def kv_needed(self, t: int) -> int:
        """Slots the step ``t`` reads: the furthest row's write slot + 1, rounded up to the bucket."""
        far = max((min(p + t - t0, p + self.max_new - 1) for (p, t0), r in zip(self.entry, self.req) if r is not None),
                  default=0)
        kv = int(math.ceil((far + 1) / self.e.kv_bucket) * self.e.kv_bucket)
        return min(self.cap, kv)

    def enter(self, rows: list[int], reqs: list[int], prompts, seeds, t: int, call: BlockCall) -> None:
        """Prefill requests ``reqs`` into the free ``rows`` (eager) and sample their first token."""
        import torch

        dec, r, dev = self.dec, self.r, self.e.device
        ids, att = left_padded([prompts[q] for q in reqs], self.pad)
        ids, att = to_device(ids, dev), to_device(att.bool(), dev)
        P = ids.shape[1]
        pos = (att.long().cumsum(-1) - 1).masked_fill(~att, 1)
        r_t = to_device(torch.tensor(rows, dtype=torch.long), dev)
        cache = r.cache
        cache.prefill_rows, cache.row_pos = r_t, None
        try:
            logits = dec.forward(ids, pos, dec.prefill_masks(att), cache,
                                 call.replace(mask=att, prefill=True, rows=tuple(reqs)))
        finally:
            cache.prefill_rows = None
        seeds_t = to_device(torch.tensor([seeds[q] for q in reqs], dtype=torch.long), dev)
        tok = dec.sample(logits, seeds_t, torch.zeros(1, dtype=torch.long, device=dev), self.temperature, self.top_p)
        done = torch.zeros(len(rows), dtype=torch.bool, device=dev) | (self.max_new <= 1)
        if self.stops is not None:
            done |= self.stops[tok]
        r.seeds.index_copy_(0, r_t, seeds_t)
        r.out.index_fill_(0, r_t, self.pad)
        r.out[r_t, 0] = tok
        r.ids[r_t, 0] = tok
        r.pos[r_t, 0] = pos[:, -1] + 1
        valid = torch.zeros(len(rows), self.cap, dtype=torch.bool, device=dev)
        valid[:, :P] = att
        valid[:, P] = True
        r.valid.index_copy_(0, r_t, valid)
        r.done.index_copy_(0, r_t, done)
        r.stepv.index_fill_(0, r_t, 1)
        r.wp.index_fill_(0, r_t, P)
        for row, q in zip(rows, reqs):
            self.req[row] = q
            self.entry[row] = (P, t)
        cache.row_pos = r.wp

    def step(self, call: BlockCall) -> None:
        """One decode step of every row, in place on the rows' state (graph-capturable)."""
        import torch

        dec, r = self.dec, self.r
        cache = r.cache
        valid = r.valid[:, : cache.kv_len]
        masks = {}
        for w in dict.fromkeys(dec.windows):
            a = valid if w is None else valid & (self.s.slots[: cache.kv_len][None, :] > r.wp[:, None] - w)
            masks[w] = torch.where(a, 0.0, dec.min_val)[:, None, None, :]
        # each row's keys are its slots 0..wp: a fused decode attention reads only those
        logits = dec.forward(r.ids, r.pos, masks, cache, call.replace(kv_lengths=r.wp + 1))
        nxt = dec.sample(logits, r.seeds, r.stepv, self.temperature, self.top_p)
        was = r.done.clone()
        nxt = torch.where(was, torch.full_like(nxt, self.pad), nxt)
        r.out.scatter_(1, r.stepv[:, None], nxt[:, None])
        adv = (~was).long()
        r.stepv.add_(adv)
        done = was | (r.stepv >= self.max_new)
        if self.stops is not None:
            done |= self.stops[nxt]
        r.done.copy_(done)
        r.ids.copy_(nxt[:, None])
        r.pos.add_(adv[:, None])
        r.wp.add_(adv)
        at = r.wp.clamp(max=self.cap - 1)[:, None]
        r.valid.scatter_(1, at, r.valid.gather(1, at) | (~was)[:, None])

    def harvest(self, rows: list[int]) -> None:
        """Start copying the finished ``rows``' tokens to the host and free the rows (``collect`` reads them)."""
        import torch

        r = self.r
        idx = to_device(torch.tensor(rows, dtype=torch.long), self.e.device)
        self.pending.append(([self.req[x] for x in rows], _HostCopy(r.stepv.index_select(0, idx)),
                             _HostCopy(r.out.index_select(0, idx))))
        for x in rows:
            self.req[x] = None

    def collect(self, results: dict, wait: bool) -> None:
        """Move finished harvests (all of them when ``wait``) into ``results``."""
        keep = []
        for reqs, steps, toks in self.pending:
            if not wait and not toks.ready():
                keep.append((reqs, steps, toks))
                continue
            for q, n, row in zip(reqs, steps.tolist(), toks.tolist()):
                results[q] = GenOutput.of(row[:n], self.stopset, self.ignore_eos, self.max_new)
        self.pending = keep

    def compact(self) -> bool:
        """Once the queue is empty: move the running rows to the front and shrink the batch to the next power
        of two at or above their number (at least ``min_rows``), if that at least halves it."""
        import torch

        keep = [x for x in range(self.B) if self.req[x] is not None]
        B2 = max(self.min_rows, 1 << max(0, len(keep) - 1).bit_length())
        if B2 > self.B // 2 or not keep:
            return False
        s, r = self.s, self.r
        idx = to_device(torch.tensor(keep, dtype=torch.long), self.e.device)
        n = len(keep)
        for t in (r.ids, r.pos, r.valid, r.done, r.seeds, r.out, r.wp, r.stepv, *r.cache.k, *r.cache.v):
            t[:n] = t.index_select(0, idx)
        self.r = _Rows(s, self._wp, self._stepv, B2)
        r = self.r
        r.done[n:] = True
        r.valid[n:] = False
        r.wp[n:] = 0
        r.stepv[n:] = 0
        r.cache.row_pos = r.wp
        self.req = [self.req[x] for x in keep] + [None] * (B2 - n)
        self.entry = [self.entry[x] for x in keep] + [(0, 0)] * (B2 - n)
        self.prof["compactions"] += 1
        return True

    def run(self, queue: list[int], prompts, seeds, results: dict) -> None:
        """Generate every request of ``queue`` (indices into ``prompts``/``seeds``) into ``results``."""
        import torch

        e = self.e
        queue = list(queue)
        call = BlockCall(mask=None, prefill=False, rows=None, n=self.n)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), e.attention(), e.fused_ctx():
                self._loop(queue, prompts, seeds, results, call)
        except BaseException:
            try:  # what finished is kept, whatever stopped the loop (an out-of-memory error: the retry skips it)
                self.collect(results, wait=True)
            except Exception:  # pragma: no cover - the device itself failed: the original error says why
                pass
            raise
        else:
            self.collect(results, wait=True)
        finally:
            self.cache.row_pos = None
            self.cache.prefill_rows = None
            self.prof["loop_s"] = time.perf_counter() - t0
            e.stats["continuous"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.prof.items()}
        e.note_fused()

    @contextlib.contextmanager
    def timed(self, key: str):
        """Add the host seconds of the ``with`` block to ``prof[key]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.prof[key] += time.perf_counter() - t0

    def next_due(self) -> float:
        """The first step at which some row has surely reached ``max_new``."""
        return min((t0 + self.max_new - 1 for (_, t0), q in zip(self.entry, self.req) if q is not None),
                   default=math.inf)

    def _rows_call(self, call: BlockCall) -> BlockCall:
        return call.replace(rows=tuple(q if q is not None else -1 for q in self.req))

    def _loop(self, queue, prompts, seeds, results, call) -> None:
        dec, s, prof = self.dec, self.s, self.prof
        first = queue[: self.B]
        del queue[: len(first)]
        with self.timed("enter_s"):
            self.enter(list(range(len(first))), first, prompts, seeds, 1, call)
        prof["entered"] += len(first)
        call = self._rows_call(call)
        use_graphs = dec.use_graphs()
        if use_graphs:
            s.graphs_for(("continuous", hook_signature(dec.model), float(self.temperature), float(self.top_p),
                          self.stop_key, self.pad))
        flags, flags_t = _HostCopy(self.r.done), 0  # the done flags as of step flags_t
        next_due = self.next_due()
        t = 0
        while True:
            t += 1
            if t % self.refill_every == 0 or t >= next_due:
                # rows past max_new are done for sure; the others as the flags copied refill_every steps ago say
                # (the device is past that step, so reading them does not wait); fresher flags are not waited for
                done = [False] * self.B
                if t - flags_t >= max(1, self.refill_every // 2):
                    with self.timed("wait_s"):
                        done = flags.tolist()
                fin = [x for x in range(self.B) if self.req[x] is not None
                       and (done[x] or self.entry[x][1] + self.max_new - 1 <= t)]
                prof["row_checks"] += self.B
                prof["busy_row_checks"] += sum(1 for x in range(self.B) if self.req[x] is not None) - len(fin)
                changed = bool(fin)
                if fin:
                    with self.timed("harvest_s"):
                        self.harvest(fin)
                free = [x for x in range(self.B) if self.req[x] is None]
                if free and queue:
                    take = queue[: len(free)]
                    del queue[: len(take)]
                    with self.timed("enter_s"):
                        self.enter(free[: len(take)], take, prompts, seeds, t, call)
                    prof["entered"] += len(take)
                    prof["refills"] += 1
                    changed = True
                if all(q is None for q in self.req):
                    break
                if not queue and self.compact():
                    changed = True
                if changed:
                    call = self._rows_call(call)
                    next_due = self.next_due()
                if t - flags_t >= self.refill_every or changed:
                    flags, flags_t = _HostCopy(self.r.done), t
                self.collect(results, wait=False)
            kv = self.kv_needed(t)
            self.cache.kv_len = kv
            key = (self.B, kv)
            g = s.graphs.get(key) if use_graphs else None
            prof["steps"] += 1
            prof["row_steps"] += self.B
            if g is not None:
                g.replay()
                prof["replays"] += 1
            elif use_graphs:
                g = self.capture(key, call)
                prof["captures"] += 1
                if g is None:
                    use_graphs = False
            else:
                self.step(call)
                prof["eager_steps"] += 1

    def capture(self, key, call: BlockCall):
        return capture_graph(self.e, self.s, key, lambda: self.step(call))
