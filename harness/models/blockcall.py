"""What a loop that calls the decoder blocks itself tells the forward hooks on those blocks.

HF's own forward hands the block stack's owner a 2-D attention mask and a cache, where a hook can
read which positions are real and whether a call is a generation's first (prefill). A loop that
calls the blocks directly (``harness.engine``) passes that information explicitly instead: every
block call gets a :class:`BlockCall` as the keyword argument ``BLOCK_CALL_KWARG``, and a forward hook
registered with ``with_kwargs=True`` reads it with :func:`block_call_of` (None under HF's forward).
The blocks themselves ignore the argument (it ends in the attention function's ``**kwargs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

BLOCK_CALL_KWARG = "harness_block_call"


@dataclass(frozen=True)
class BlockCall:
    """One forward call of the decoder blocks by a loop that calls them itself.

    ``mask``: bool ``[B, T]`` real (non-pad) positions of the call, None = all real; ``prefill``: the call is
    a generation's first (no cached tokens), None = unknown; ``rows`` and ``n``: batch row ``i`` is row
    ``rows[i]`` of the caller's ``n`` rows (None: the loop does not say, so its row order is not the caller's);
    ``kv_lengths``: int ``[B]`` tensor, batch row ``b`` attends to cache slots ``< kv_lengths[b]`` only (a bound
    the attention may use to skip slots the mask excludes anyway; None = every slot it is given).
    """

    mask: Any = None
    prefill: bool | None = None
    rows: Sequence[int] | None = None
    n: int | None = None
    kv_lengths: Any = None

    def replace(self, **changes: Any) -> "BlockCall":
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict[str, "BlockCall"]:
        """The keyword argument to pass to each block call."""
        return {BLOCK_CALL_KWARG: self}


def block_call_of(kwargs: Mapping[str, Any]) -> BlockCall | None:
    """The :class:`BlockCall` among a block call's keyword arguments, or None (HF's own forward)."""
    call = kwargs.get(BLOCK_CALL_KWARG)
    return call if isinstance(call, BlockCall) else None
