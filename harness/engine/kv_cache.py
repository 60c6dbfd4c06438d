"""The engine's static KV cache: one fixed buffer per layer, every row writing the same slot.

Static batches: prompts are left-padded into one shared slot layout, so at each step every row writes
the same slot (``write_pos``, a tensor, so CUDA graphs can replay the step). Continuous batching: each
row holds its own request from slot 0 and writes its own slot (``row_pos``); a new request's prefill
writes slots 0..P-1 of the rows it enters (``prefill_rows``). ``kv_len`` is how many slots the
attention reads (the decode loop rounds it up to a bucket). The decoder layers call ``update`` as on
any transformers ``Cache``.
"""

from __future__ import annotations


class StaticKVCache:
    """Per-layer K/V buffers ``[B, kv_heads, C, head_dim]``; ``update`` writes slots ``write_pos``."""

    def __init__(self, n_layers: int, B: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        import torch

        self.k = [torch.zeros(B, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_len = capacity
        self.capacity = capacity
        self.batch = B
        # continuous batching: each row writes its own slot (``row_pos[b]``, one token per row per call);
        # ``prefill_rows``: a prefill of new requests into these rows (slots 0..P-1 of each)
        self.row_pos = None
        self.prefill_rows = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.prefill_rows is not None:  # the new rows attend to their own prompt only
            P = key.shape[2]
            k[:, :, :P].index_copy_(0, self.prefill_rows, key.to(k.dtype))
            v[:, :, :P].index_copy_(0, self.prefill_rows, value.to(v.dtype))
            return key, value
        if self.row_pos is not None:  # scatter along the slot dimension: graph-safe, one slot per row
            idx = self.row_pos[:, None, None, None].expand(key.shape[0], key.shape[1], 1, key.shape[3])
            k.scatter_(2, idx, key.to(k.dtype))
            v.scatter_(2, idx, value.to(v.dtype))
            return k[:, :, : self.kv_len], v[:, :, : self.kv_len]
        k.index_copy_(2, self.write_pos, key.to(k.dtype))
        v.index_copy_(2, self.write_pos, value.to(v.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def rows(self, B: int) -> "StaticKVCache":
        """A cache over the first ``B`` rows of this one (views of the same buffers)."""
        c = object.__new__(StaticKVCache)
        c.k = [t[:B] for t in self.k]
        c.v = [t[:B] for t in self.v]
        c.write_pos, c.kv_len, c.capacity, c.batch = self.write_pos, self.kv_len, self.capacity, B
        c.row_pos = c.prefill_rows = None
        return c

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
