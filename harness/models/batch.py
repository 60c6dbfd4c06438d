"""Padded batches: the one place token lists become ``input_ids`` + masks.

* ``left_padded``: prompts for generation and judging (the last real token of every row sits in
  the last column, so one decode step serves all rows).
* ``examples_batch``: (prompt ids, response ids) pairs for a forward over prompt + response
  (extraction, activation norms), right-padded, with the masks of each part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """``(ids, mask)`` long tensors ``[B, max len]``, each row right-aligned and padded with ``pad``."""
    import torch

    P = max(len(p) for p in seqs)
    ids = torch.full((len(seqs), P), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, p in enumerate(seqs):
        if len(p):
            ids[i, P - len(p):] = torch.tensor(list(p))
            mask[i, P - len(p):] = 1
    return ids, mask


@dataclass
class ExamplesBatch:
    """A right-padded batch of prompt + response examples (all ``[B, T]`` but ``last``)."""

    ids: Any
    attention: Any
    prompt: Any  # bool: prompt tokens
    response: Any  # bool: response tokens
    last: Any  # long [B]: index of each row's last prompt token

    def to(self, device: Any) -> ExamplesBatch:
        return ExamplesBatch(*(t.to(device) for t in (self.ids, self.attention, self.prompt, self.response, self.last)))


def examples_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int) -> ExamplesBatch:
    import torch

    T = max(len(p) + len(r) for p, r in examples)
    B = len(examples)
    ids = torch.full((B, T), pad, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.bool)
    prm = torch.zeros((B, T), dtype=torch.bool)
    last = torch.zeros(B, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(list(p) + list(r))
        att[i, :n] = 1
        prm[i, : len(p)] = True
        resp[i, len(p): n] = True
        last[i] = len(p) - 1
    return ExamplesBatch(ids, att, prm, resp, last)
