"""Block allocator over the KV budget: the only place that decides whether a token may be stored."""

from __future__ import annotations

import heapq

from backends.kvcache.sequence import Sequence

FIRST_BLOCK = 1  # block 0 is the store's scratch block (padding target), never handed out


class BlockManager:
    """Hands out fixed-size blocks (lowest id first, so physical storage stays compact)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"KV budget holds {num_blocks} blocks; need at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(FIRST_BLOCK, FIRST_BLOCK + num_blocks))
        heapq.heapify(self._free)
        self.peak_used = 0

    @property
    def num_used(self) -> int:
        """Blocks held by sequences."""
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` entries."""
        return -(-tokens // self.block_size)

    def can_hold(self, seq: Sequence, tokens: int) -> bool:
        """Whether ``seq`` could grow to hold ``tokens`` entries now."""
        return self.blocks_for(tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, tokens: int) -> None:
        """Give ``seq`` enough blocks for ``tokens`` entries (caller checked can_hold)."""
        need = self.blocks_for(tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError("block budget exceeded (scheduler bug)")
        for _ in range(need):
            seq.block_table.append(heapq.heappop(self._free))
        self.peak_used = max(self.peak_used, self.num_used)

    def shrink(self, seq: Sequence, tokens: int) -> None:
        """Return the blocks beyond ``tokens`` entries (after eviction)."""
        keep = self.blocks_for(tokens)
        for block in seq.block_table[keep:]:
            heapq.heappush(self._free, block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks."""
        self.shrink(seq, 0)
