"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences from a free list.

The tensors themselves live in the model runner; this module only decides which block holds which
token, so sequences of any length share one preallocated pool without fragmentation.
"""

from __future__ import annotations

from engine.sequence import Sequence

SCRATCH_BLOCK = 0  # never handed out: padding tokens write their K/V here


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) - len(seq.block_table) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Make room for every token the sequence has now (prompt, or prompt + output on re-admission)."""
        for _ in range(self.blocks_needed(seq.num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._free.pop())

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step (one more token) fits."""
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free > 0

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
