"""Decode-graph staging that rewrites only the rows that changed (`StagedTables`) fills the same
rows and tables as a fill from scratch, over steps where sequences grow block by block, get new
block lists (preemption), leave and join, and the graph size changes; rows past a step's
pieces are padded rows to the buffer's end."""
import random
from dataclasses import dataclass

import numpy as np

from weavelm.models.host_inputs import StagedTables, stage_decode_rows


@dataclass
class Piece:                      # the fields of the runner's StepPiece that staging reads
    token_ids: list
    start_pos: int
    blocks: list


def test_staged_fill_equals_a_fill_from_scratch():
    rng = random.Random(0)
    bs, G_max, M = 4, 64, 128
    rows_a, rows_b = np.zeros((3, G_max), np.int64), np.zeros((3, G_max), np.int64)
    tab_a, tab_b = np.zeros(G_max * M, np.int32), np.zeros(G_max * M, np.int32)
    staged = StagedTables()
    seqs = [[rng.randrange(1, 999) for _ in range(rng.randrange(1, 20))] for _ in range(40)]
    lengths = [len(b) * bs - rng.randrange(bs) for b in seqs]
    partial = 0
    for step in range(300):
        for i in range(len(seqs)):
            lengths[i] += 1
            if lengths[i] > len(seqs[i]) * bs:           # the list grows in place
                seqs[i].append(rng.randrange(1, 999))
            if rng.random() < 0.01:                       # preempted: a new list
                seqs[i] = [rng.randrange(1, 999) for _ in range(len(seqs[i]))]
        if rng.random() < 0.05 and len(seqs) > 2:         # one leaves, one joins
            gone = rng.randrange(len(seqs))
            del seqs[gone], lengths[gone]
        if rng.random() < 0.05 and len(seqs) < 60:
            seqs.append([rng.randrange(1, 999)])
            lengths.append(1)
        pieces = [Piece([s % 97], n - 1, b) for s, (n, b) in enumerate(zip(lengths, seqs))]
        G = 64 if len(pieces) > 32 else 32
        wa = stage_decode_rows(pieces, bs, rows_a, tab_a, G, staged)
        wb = stage_decode_rows(pieces, bs, rows_b, tab_b, G)
        assert wa == wb
        assert np.array_equal(rows_a[:, :G], rows_b[:, :G]), step
        assert np.array_equal(tab_a[:G * wa], tab_b[:G * wb]), step
        partial += staged.shape == (G, wa)
    assert partial > 200                   # the staged path ran on most steps


def test_rows_past_the_pieces_are_padded_to_the_buffers_end():
    """A step of 40 rows (placeholders -1 among its ids: tokens the device fills in) and then one
    of 5 in a graph of 8: every row from 5 on is token 0 at position 0 in the scratch block --
    what the runner copies to the device is valid input for any larger graph too."""
    bs, G_max, M = 4, 64, 16
    rows, tables = np.full((3, G_max), 7, np.int64), np.zeros(G_max * M, np.int32)
    big = [Piece([-1 if i % 3 else i], 1 + i % 10, [i + 1, i + 2, i + 3]) for i in range(40)]
    stage_decode_rows(big, bs, rows, tables, 64, StagedTables())
    assert (rows[0, :40] == -1).any() and not rows[:, 40:].any()
    small = [Piece([i + 1], 2, [i + 1]) for i in range(5)]
    stage_decode_rows(small, bs, rows, tables, 8, StagedTables())
    assert rows[0, :5].tolist() == [1, 2, 3, 4, 5]
    assert not rows[:, 5:].any()
