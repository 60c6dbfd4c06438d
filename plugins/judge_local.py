"""Local judge (offline default): an HF causal LM scores in-process.

Score = expected value of the number 0..100 the judge would write, where each number's
probability is that of its *full token sequence* followed by a non-digit token:

    P(n) = P(t1) * P(t2 | t1) * ... * P(not a digit | t1..tk)

so it works for tokenizers that split numbers into digits (Qwen, Llama, SmolLM2). All 101
numbers share one prompt forward (KV cache) plus one forward of a token trie of the numbers
(one token per number for digit tokenizers) under a tree attention mask, for every row of a batch at once.

Cost: the pipeline hands the judge batches of one rubric sorted by length (little padding). The
rubric's shared prefix (chat header and the rubric text before the question) is run once per judge and
rubric and its KV cache reused by every later batch (``PrefixCache``), not once per batch. When the
judge model is the generation model (``judge_model`` empty or the same id), ``ctx.model`` hands both
stages the same loaded copy.

Unscored (``score=None``) when the judge puts more probability on the first token of
"REFUSAL" than on all numbers together (reason ``refusal``), or when the numbers' total
probability is below ``min_mass`` (reason ``low_mass``; the paper's 0.25 by default).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from harness.core.hookspecs import hookimpl
from harness.core.model_ids import model_identity
from harness.core.protocols import BaseJudge
from harness.models.batch import left_padded
from harness.models.loading import cache_kwarg, output_cache, prompt_ids
from harness.core.records import JudgeItem, Judgment

LO, HI = 0, 100


class NumberTrie:
    """Token trie of the numbers LO..HI. Node 0 is the root (the prompt)."""

    def __init__(self, tok):
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]
        self.depth: list[int] = [0]
        children: dict[tuple[int, int], int] = {}
        self.number_node: dict[int, int] = {}
        for n in range(LO, HI + 1):
            node = 0
            for t in tok.encode(str(n), add_special_tokens=False):
                key = (node, int(t))
                if key not in children:
                    children[key] = len(self.parent)
                    self.parent.append(node)
                    self.token.append(int(t))
                    self.depth.append(self.depth[node] + 1)
                node = children[key]
            self.number_node[n] = node
        self.n = len(self.parent) - 1  # non-root nodes
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        texts = [tok.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
        self.digit_start = [bool(t) and t[0].isdigit() for t in texts]
        ref = tok.encode("REFUSAL", add_special_tokens=False)
        self.refusal_token = int(ref[0]) if ref else None

    def ancestors(self):
        """[n, n] bool: node i (row) may attend to node j (col) — j is i or an ancestor."""
        import torch

        m = torch.zeros(self.n, self.n, dtype=torch.bool)
        for i in range(1, self.n + 1):
            j = i
            while j > 0:
                m[i - 1, j - 1] = True
                j = self.parent[j]
        return m


def _lcp(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs[1:]):
            return i
    return n


class PrefixCache:
    """KV caches (batch 1) of prompt prefixes already run, reused by later batches that share them.

    A batch whose common prefix is (all but fewer than ``MIN`` ids of) a stored prefix's start reuses
    that prefix's KV, cropped to the shared length (a causal model's KV of the first ``c`` positions
    does not depend on what follows); otherwise the batch's own common prefix is run and stored. At most ``size``
    prefixes are kept (one per rubric in practice), the oldest dropped first."""

    MIN = 8

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[Any, list[int], Any]] = []  # (weak ref to the model, ids, KV cache)
        self.runs = 0  # prefix forwards run (for tests and benchmarks)

    def get(self, model, prompts: list[list[int]], device) -> tuple[int, Any]:
        """(shared length, a fresh cache of that prefix repeated for every row), or (0, None)."""
        import copy
        import weakref

        import torch

        B = len(prompts)
        limit = min(len(p) for p in prompts) - 1  # every row keeps at least one id of its own
        lcp = min(_lcp(prompts), limit)
        best, cache = 0, None
        for ref, ids, c in self.entries:
            if ref() is not model:
                continue
            n = min(_lcp([ids, prompts[0][:lcp]]), lcp)
            if n >= self.MIN and n > best:
                best, cache = n, c
        if cache is None or lcp - best >= self.MIN:  # none shared, or this batch shares a longer prefix
            if lcp < self.MIN:
                return 0, None
            pre = torch.tensor([prompts[0][:lcp]], device=device)
            cache = output_cache(model(input_ids=pre, use_cache=True, logits_to_keep=1))
            self.runs += 1
            self.entries = [*self.entries[max(0, len(self.entries) + 1 - self.size):],
                            (weakref.ref(model), list(prompts[0][:lcp]), cache)]
            best = lcp
        cache = copy.deepcopy(cache)
        if cache.get_seq_length() > best:
            cache.crop(best - cache.get_seq_length())  # a negative count: that many positions dropped
        cache.batch_repeat_interleave(B)
        return best, cache


def number_distribution(model, tok, trie: NumberTrie, prompts: list[list[int]], device,
                        share_prefix: bool = True, exact: bool = True,
                        prefixes: PrefixCache | None = None) -> tuple[Any, Any]:
    """Return (P(n) for n in LO..HI as [B, 101], P(first REFUSAL token) [B]).

    ``exact=False`` skips the forward of trie leaves (for digit tokenizers: the 2-digit numbers
    other than 10, and 100) and takes P(not a digit | leaf) as 1, i.e. the judge stops after a
    number that cannot be extended within 0..100; 12 tree tokens instead of 101.

    The longest common prefix of the batch's prompts (chat header + rubric preamble) is run
    once and its KV cache shared by every row; the rest runs left-padded. With ``prefixes`` the
    prefix's KV comes from (and goes to) that ``PrefixCache``, shared with other batches.
    """
    import torch

    B = len(prompts)
    ckw = cache_kwarg(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lp, cache = 0, None
    if share_prefix and (prefixes is not None or B > 1):  # without a shared cache: this batch's prefix only
        lp, cache = (prefixes if prefixes is not None else PrefixCache(size=1)).get(model, prompts, device)
    suffixes = [p[lp:] for p in prompts]
    ids, smask = left_padded(suffixes, pad)
    ids, smask = ids.to(device), smask.to(device)
    mask = torch.cat([torch.ones((B, lp), dtype=torch.long, device=device), smask], 1)
    P = lp + ids.shape[1]
    pos = (lp + smask.cumsum(-1) - 1).clamp(min=0)
    kw = {ckw: cache} if cache is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
    root = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    has_child = set(trie.parent[1:])
    needed = [n for n in range(1, trie.n + 1) if exact or n in has_child]
    row = {0: 0, **{n: k + 1 for k, n in enumerate(needed)}}
    N = len(needed)
    tree_ids = torch.tensor([trie.token[n] for n in needed], device=device).expand(B, N)
    depth = torch.tensor([trie.depth[n] for n in needed], device=device)
    lens = mask.sum(-1)
    tree_pos = (lens[:, None] - 1) + depth[None, :]
    dtype = next(model.parameters()).dtype
    neg = torch.finfo(dtype).min
    anc = trie.ancestors()[[n - 1 for n in needed]][:, [n - 1 for n in needed]]
    allowed = torch.cat([mask.bool()[:, None, :].expand(B, N, P), anc.to(device)[None].expand(B, N, N)], -1)
    mask4 = torch.zeros(B, 1, N, P + N, dtype=dtype, device=device).masked_fill(~allowed[:, None], neg)
    out2 = model(input_ids=tree_ids, attention_mask=mask4, position_ids=tree_pos,
                 use_cache=True, **{cache_kwarg(model): output_cache(out)})
    node_lp = torch.log_softmax(out2.logits.float(), dim=-1)  # [B, N, V]
    all_lp = torch.cat([root[:, None], node_lp], 1)  # index by row[node]
    digit = torch.tensor(trie.digit_start, device=device)
    if digit.numel() < all_lp.shape[-1]:
        digit = torch.cat([digit, torch.zeros(all_lp.shape[-1] - digit.numel(), dtype=torch.bool, device=device)])
    p_cont = all_lp.exp()[..., : digit.numel()][..., digit].sum(-1)  # [B, N+1]
    p_end_rows = (1 - p_cont).clamp(min=0)
    p_end = torch.ones(B, trie.n + 1, device=device)
    p_end[:, torch.tensor(list(row), device=device)] = p_end_rows[:, torch.tensor(list(row.values()), device=device)]
    # log P(path to node), one depth of the trie at a time (the same additions as node by node)
    path_lp = torch.zeros(B, trie.n + 1, device=device)
    for d in range(1, max(trie.depth) + 1):
        nodes_d = [n for n in range(1, trie.n + 1) if trie.depth[n] == d]
        par = [trie.parent[n] for n in nodes_d]
        edge = all_lp[:, torch.tensor([row[p] for p in par], device=device),
                      torch.tensor([trie.token[n] for n in nodes_d], device=device)]
        path_lp[:, torch.tensor(nodes_d, device=device)] = path_lp[:, torch.tensor(par, device=device)] + edge
    nodes = torch.tensor([trie.number_node[n] for n in range(LO, HI + 1)], device=device)
    probs = path_lp[:, nodes].exp() * p_end[:, nodes]
    p_ref = root[:, trie.refusal_token].exp() if trie.refusal_token is not None else torch.zeros(B, device=device)
    return probs, p_ref


def score_from_distribution(probs: Sequence[float], p_refusal: float, min_mass: float) -> tuple[float | None, str | None, dict]:
    """Expected score, or (None, reason). ``probs[k]`` = P(number LO + k)."""
    mass = float(sum(probs))
    top = sorted(range(len(probs)), key=lambda k: -probs[k])[:5]
    detail = {"mass": round(mass, 6), "p_refusal": round(float(p_refusal), 6),
              "top": [[LO + k, round(float(probs[k]), 6)] for k in top]}
    if p_refusal > mass:
        return None, "refusal", detail
    if mass <= 0 or mass < min_mass or not math.isfinite(mass):
        return None, "low_mass", detail
    score = sum((LO + k) * p for k, p in enumerate(probs)) / mass
    return float(min(max(score, 0.0), 100.0)), None, detail


class LocalJudge(BaseJudge):
    name = "local"

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.min_mass = settings.judge_min_mass if settings.judge_min_mass >= 0 else 0.25
        self._trie = None
        self.prefixes = PrefixCache()  # rubric prefixes' KV, reused across batches

    def config(self) -> dict:
        # the judge model's identity (fingerprint, dtype, chat settings; thinking off) is part of the keys
        return {"min_mass": self.min_mass, "method": "full-sequence-expectation/1",
                "exact": bool(self.settings.judge_exact),
                "model": model_identity(self.model_id, self.settings, thinking=False)}

    def batch_size(self, ctx) -> int:
        """``judge_batch_size``, or 0 = automatic: 64 prompts on CUDA (out-of-memory halves it), 8 on CPU."""
        if self.settings.judge_batch_size:
            return int(self.settings.judge_batch_size)
        return 64 if ctx.model(self.model_id).device.type == "cuda" else 8

    def judge(self, items: Sequence[JudgeItem], ctx) -> list[Judgment]:
        import torch

        lm = ctx.model(self.model_id)
        if self._trie is None:
            self._trie = NumberTrie(lm.tokenizer)
        prompts = [prompt_ids(lm.tokenizer, [{"role": "user", "content": it.prompt}], thinking=False) for it in items]
        with torch.inference_mode():
            probs, p_ref = number_distribution(lm.model, lm.tokenizer, self._trie, prompts, lm.device,
                                               exact=bool(self.settings.judge_exact), prefixes=self.prefixes)
        probs, p_ref = probs.cpu().tolist(), p_ref.cpu().tolist()
        out = []
        for it, pr, rf in zip(items, probs, p_ref):
            score, reason, detail = score_from_distribution(pr, rf, self.min_mass)
            out.append(Judgment(generation_id=it.generation_id, metric=it.metric, score=score, reason=reason,
                                judge=self.name, judge_model=lm.model_id, detail=detail))
        return out


@hookimpl
def harness_register_judges(register):
    register("local", LocalJudge, description="in-process HF judge: expected score over full number sequences")
