"""KV-cache blocks: who holds which (plain Python, no torch).

The cache is cut into blocks of `block_size` tokens (16: the waste per sequence is under one
block, 15 tokens at most, with one block-table entry per 16 keys; larger blocks waste more
memory per sequence and buy nothing the kernels need, which take any size). Block 0 is never
handed out: the model runner points padded rows of a captured CUDA graph at it, so they write
and read scratch, never a live sequence's keys.

A sequence's blocks are its block table: block i holds its tokens i*bs .. (i+1)*bs - 1.
"""
from __future__ import annotations

from collections import deque

from weavelm.errors import WeavelmError

BLOCK_SIZE = 16
RESERVED_BLOCKS = 1         # block 0: the scratch block of padded graph rows


class NoFreeBlocks(WeavelmError):
    """The cache has fewer free blocks than asked for."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        if num_blocks <= RESERVED_BLOCKS:
            raise WeavelmError(f"a KV cache of {num_blocks} blocks holds no sequence: it needs "
                               f"more than {RESERVED_BLOCKS}; lower the model's memory use or "
                               f"raise gpu_memory_utilization")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = deque(range(RESERVED_BLOCKS, num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out (all but the reserved ones)."""
        return self.num_blocks - RESERVED_BLOCKS

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """n blocks, all or none (NoFreeBlocks)."""
        if n > len(self._free):
            raise NoFreeBlocks(f"the KV cache has {len(self._free)} free blocks of "
                               f"{self.block_size} tokens, {n} needed")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is freed but was not allocated")
            self._used.remove(b)
            self._free.append(b)

    def grow(self, table: list[int], tokens: int) -> None:
        """Append blocks to a sequence's `table` until it holds `tokens` tokens."""
        missing = self.blocks_for(tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))
