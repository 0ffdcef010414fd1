"""KV-cache blocks: who holds which (plain Python, no torch).

The cache is cut into blocks of `block_size` tokens (16: the waste per sequence is under one
block, 15 tokens at most, with one block-table entry per 16 keys; larger blocks waste more
memory per sequence and buy nothing the kernels need, which take any size). Block 0 is never
handed out: the model runner points padded rows of a captured CUDA graph at it, so they write
and read scratch, never a live sequence's keys.

A sequence's blocks are its block table: block i holds its tokens i*bs .. (i+1)*bs - 1.
With prefix caching, full blocks of prompts are named by a hash of their tokens (chained over
everything before them) and kept after their sequence ends, until the space is needed; a new
prompt that starts with the same tokens takes them instead of computing them again.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from weavelm.errors import WeavelmError

BLOCK_SIZE = 16
RESERVED_BLOCKS = 1         # block 0: the scratch block of padded graph rows


class NoFreeBlocks(WeavelmError):
    """The cache has fewer free blocks than asked for."""


class BlockAllocator:
    """The blocks, their reference counts and, with prefix caching, the cache of full blocks
    whose content is known (by a hash chained over their tokens: `prefix_hashes`).

    A block is free (nobody holds it), used (held by one or more sequences: `ref` counts them)
    or cached-and-free (nobody holds it but its content is known: a later prompt that starts
    with the same tokens takes it back with `lookup`). Allocation takes never-cached free
    blocks first, then evicts the least recently freed cached ones. Only full blocks are
    shared, and a sequence never writes into a full block, so no block has two writers."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, caching: bool = False):
        if num_blocks <= RESERVED_BLOCKS:
            raise WeavelmError(f"a KV cache of {num_blocks} blocks holds no sequence: it needs "
                               f"more than {RESERVED_BLOCKS}; lower the model's memory use or "
                               f"raise gpu_memory_utilization")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        # Free blocks whose content is unknown: the set says which; the queue gives the order
        # they are handed out in, and may hold stale entries of blocks taken out of turn
        # (`allocate(after=...)`), skipped when they come up.
        self._free = deque(range(RESERVED_BLOCKS, num_blocks))
        self._free_set = set(self._free)
        self._evictable: OrderedDict[int, bytes] = OrderedDict()    # free, content known: LRU
        self._ref: dict[int, int] = {}                              # used block -> holders
        self._hash_of: dict[int, bytes] = {}                        # cached block -> its hash
        self._block_of: dict[bytes, int] = {}                       # hash -> cached block
        self.queries = self.hits = 0                  # blocks admitted sequences looked up / found

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (free, or cached and free: evicted when needed)."""
        return len(self._free_set) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out (all but the reserved ones)."""
        return self.num_blocks - RESERVED_BLOCKS

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """n blocks for one writer, all or none (NoFreeBlocks). `after`: the writer's last
        block; the ones following it are taken where free, so that a sequence's blocks form
        runs of consecutive ids (decode reads a shared prefix's run in place:
        models/cascade.py)."""
        if n > self.num_free:
            raise NoFreeBlocks(f"the KV cache has {self.num_free} free blocks of "
                               f"{self.block_size} tokens, {n} needed")
        blocks = []
        for _ in range(n):
            if after is not None and after + 1 in self._free_set:
                b = after + 1                       # its queue entry goes stale
            elif self._free_set:
                b = self._free.popleft()
                while b not in self._free_set:      # stale: taken out of turn
                    b = self._free.popleft()
            else:                                   # evict the least recently freed
                b, h = self._evictable.popitem(last=False)
                del self._block_of[h], self._hash_of[b]
            self._free_set.discard(b)
            self._ref[b] = 1
            blocks.append(b)
            after = b
        if len(self._free) > 2 * len(self._free_set) + 64:   # mostly stale entries
            self._compact()
        return blocks

    def _compact(self) -> None:
        """Drop the queue's stale entries (each free block once, in its queue order)."""
        self._free = deque(b for b in dict.fromkeys(self._free) if b in self._free_set)

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block; a block nobody holds is free again (cached and
        evictable if its content is known)."""
        for b in blocks:
            if b not in self._ref:
                raise ValueError(f"block {b} is freed but was not allocated")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                del self._ref[b]
                if b in self._hash_of:
                    self._evictable[b] = self._hash_of[b]
                else:
                    self._free.append(b)
                    self._free_set.add(b)

    def grow(self, table: list[int], tokens: int) -> None:
        """Append blocks to a sequence's `table` until it holds `tokens` tokens."""
        missing = self.blocks_for(tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing, after=table[-1] if table else None))

    # -- prefix caching ---------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` found, each now held once more
        by the caller (free it like an allocated block)."""
        if not self.caching:
            return []
        found = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            found.append(b)
        for b in found:
            if b in self._evictable:
                del self._evictable[b]
                self._ref[b] = 1
            else:
                self._ref[b] += 1
        return found

    def is_cached(self, h: bytes) -> bool:
        return h in self._block_of

    def count_lookup(self, queried: int, found: int) -> None:
        """Count an admitted sequence's lookup in the hit rate (a sequence that waits and
        looks again is counted once, when it is admitted)."""
        self.queries += queried
        self.hits += found

    def register(self, block: int, h: bytes) -> None:
        """`block` (held, full, its content computed or queued) holds the tokens `h` hashes.
        If another block already holds them, this one stays unnamed (it is freed as usual)."""
        if self.caching and h not in self._block_of and block not in self._hash_of:
            self._block_of[h], self._hash_of[block] = block, h

    def reset_cache(self) -> bool:
        """Forget every cached block's content (free ones become plain free blocks). False if
        some are held by running sequences (those stay named until freed)."""
        for b in list(self._evictable):
            del self._block_of[self._hash_of.pop(b)]
            self._free.append(b)
            self._free_set.add(b)
        self._evictable.clear()
        return not self._hash_of

    def check(self) -> None:
        """Raise AssertionError unless the books balance (tests)."""
        free = self._free_set
        assert free <= set(self._free), "a free block is missing from the queue"
        assert not free & set(self._evictable) and not free & set(self._ref)
        assert not set(self._evictable) & set(self._ref)
        assert len(free) + len(self._evictable) + len(self._ref) == self.capacity
        assert all(n > 0 for n in self._ref.values())
        assert {b: h for h, b in self._block_of.items()} == self._hash_of
        assert set(self._evictable) <= set(self._hash_of)


def prefix_hashes(tokens: list[int], block_size: int, n_blocks: int,
                  salt: bytes = b"") -> list[bytes]:
    """The chained hashes of the first `n_blocks` full blocks of `tokens`: block i's hash
    covers every token before its end (and `salt`: whatever else would change the keys and
    values, such as the model or an adapter), so equal hashes mean equal cached content."""
    out, parent = [], salt
    for i in range(n_blocks):
        chunk = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype=np.int64)
        parent = hashlib.sha256(parent + chunk.tobytes()).digest()
        out.append(parent)
    return out
