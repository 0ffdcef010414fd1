"""Step inputs built on the host (numpy) and their way to the device."""
from __future__ import annotations

import itertools

import numpy as np
import torch


def fill_block_table(out: np.ndarray, tables, counts: np.ndarray) -> None:
    """out[r, :counts[r]] = tables[r] for every row r (block lists, counts[r] = their lengths);
    the rest of `out` is left as it is (zeros). Vectorised: a Python loop over 256 rows costs
    ~1 ms of a step on a 2-core host."""
    out[np.arange(out.shape[1]) < counts[:, None]] = np.fromiter(   # row by row, in order
        itertools.chain.from_iterable(tables), dtype=out.dtype, count=int(counts.sum()))


def host_to_device(array: np.ndarray, device) -> torch.Tensor:
    """A step input built on the host, on `device`. To a GPU through pinned memory (torch's
    caching host allocator, which keeps the block until the copy has run): a copy from pageable
    memory may wait for the work already queued on the stream, and the engine queues a step
    while the one before it runs."""
    t = torch.from_numpy(array)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class StagedTables:
    """What a decode staging buffer's block table holds: its rows' block lists, their lengths
    and the [G, width] layout. The next fill of the same buffer then rewrites only the rows that
    changed: a sequence's list only grows (the scheduler extends it or gives the sequence a new
    one), and in steady decode a row gains a block once in block_size steps. The full fill of
    1,024 rows of ~130 blocks took ~2 ms of a 2-core host's step. Holding the lists keeps their
    ids from being reused while they are compared by identity."""

    def __init__(self):
        self.lists: list = []
        self.counts: list[int] = []
        self.shape: tuple | None = None


def stage_decode_rows(pieces, block_size: int, rows: np.ndarray,
                      tables: np.ndarray, G: int, staged: StagedTables | None = None) -> int:
    """Fill a decode graph's host staging for `pieces` (the runner's `StepPiece`s: token_ids,
    start_pos, blocks): rows[0:3] = token ids, positions, cache slots, every row past the pieces
    a padded one (token 0 at position 0, its one key in the scratch block 0) to the buffer's
    end, not just to G -- the runner copies all of `rows` to the device, where an earlier,
    larger step's rows (placeholder ids -1 among them) would be garbage to a larger graph
    replayed on these inputs; tables[:G * width] = the block tables as [G, width] (zeros past
    a row's blocks). Returns width. Vectorised: a Python loop over 256 rows costs ~1 ms of a
    decode step on a 2-core host. `staged`: what this buffer held after its last fill (kept
    up to date here); only changed rows are written where the layout is the same."""
    B = len(pieces)
    lists = [p.blocks for p in pieces]
    count_list = list(map(len, lists))
    counts = np.array(count_list, dtype=np.int64)
    width = int(counts.max())
    t = tables[:G * width].reshape(G, width)
    changed = None
    if staged is not None and staged.shape == (G, width):
        old, old_counts = staged.lists, staged.counts
        changed = [r for r, (a, b, n, m) in enumerate(zip(lists, old, count_list, old_counts))
                   if a is not b or n != m] + list(range(len(old), B))
        if len(changed) * 4 > B:
            changed = None                         # most rows changed: fill them all
    if changed is None:
        t[:] = 0
        fill_block_table(t[:B], lists, counts)
    else:
        for r in changed:
            grown = r < len(old) and lists[r] is old[r]
            start = old_counts[r] if grown else 0
            if not grown:
                t[r, count_list[r]:] = 0
            t[r, start:count_list[r]] = lists[r][start:]
        t[B:len(old)] = 0                          # rows the last fill used, padding now
    if staged is not None:
        staged.lists, staged.counts, staged.shape = lists, count_list, (G, width)
    pos = np.fromiter((p.start_pos for p in pieces), dtype=np.int64, count=B)
    rows[0, :B] = np.fromiter((p.token_ids[0] for p in pieces), dtype=np.int64, count=B)
    rows[1, :B] = pos
    rows[2, :B] = t[np.arange(B), pos // block_size].astype(np.int64) * block_size \
        + pos % block_size
    rows[:, B:] = 0
    return width
