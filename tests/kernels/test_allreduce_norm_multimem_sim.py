"""The multimem all-reduce kernels (fused + plain), the source the GPU compiles, in the simulator.

The multimem instructions run on an emulated multicast object (`weavelm.kernels.multicast_sim`:
a multicast address is a group table of every rank's buffer and an offset; ld_reduce sums the
members in f32 and rounds once to the element type, st and red act on every member). The
harness is the p2p tests' (`sim_ranks.Ranks`); every kernel case also runs p2p on the same
inputs and compares.

Two references: `fused_ref` (torch, f32 sum kept in f32: the op's definition) within `TOL`, and
the "switch-rounded" reference `fused_ref([allreduce_ref(parts)], ...)` (the sum rounded once to
the dtype before the residual add, as multimem.ld_reduce returns it), which the residual must
equal bit for bit. multimem vs p2p: within `transport_check.tolerance` (the extra rounding of
the sum, and on hardware the switch's unspecified order of adds; see that module).

The primitive models themselves are tested in this process (no simulator needed): they are plain
Python. `test_in_simulator` re-runs the `test_sim_*` tests with NUMBA_ENABLE_CUDASIM=1.
T = tokens, D = hidden size, N = ranks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sim_ranks import Ranks, rand
from simulator_run import IN_SIM, run_sim_tests

from weavelm.kernels import allreduce_norm as A
from weavelm.kernels import multicast_sim as M
from weavelm.kernels.allreduce_norm_layout import EPOCH_OFF, ERR_OFF, decode_error
from weavelm.parallel import transport_check as C
from weavelm.parallel.communicator import row_range

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")
EPS = 1e-6
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
ELEM = {"bf16": "bf16x2", "f16": "f16x2", "f32": "f32"}
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}  # y vs fused_ref


@pytest.mark.skipif(IN_SIM, reason="this is the launcher of the simulator run")
def test_in_simulator():
    run_sim_tests(__file__, timeout=600)


# ----------------------------------------------------------------------------- the models

def _members(n, nbytes=64):
    bufs = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n)]
    return bufs, M.MulticastGroup([b.data_ptr() for b in bufs], nbytes)


@pytest.mark.parametrize("dt", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_multimem_ld_reduce_model_sums_every_member(dt, n):
    """16 bytes at offset 32 of every member, summed lane by lane in f32 in rank order and
    rounded once (torch's f32 adds and RNE conversion as the reference); other bytes unread."""
    dtype = DTYPES[dt]
    bufs, g = _members(n)
    lanes = 16 // dtype.itemsize
    vals = [rand((lanes,), dtype, 7 * r) * (r + 1) for r in range(n)]
    for b, v in zip(bufs, vals):
        b[32:48].view(dtype).copy_(v)
        b[48:].fill_(0xFF)                       # NaN garbage right after the vector
    want = sum((v.float() for v in vals[1:]), vals[0].float()).to(dtype)
    words = M.ld_reduce_add_v4(g.address + 32, ELEM[dt])
    got = torch.tensor([int(w) for w in words], dtype=torch.int64).to(torch.int32)
    assert torch.equal(got.view(dtype), want)


def test_multimem_ld_reduce_accumulates_in_f32():
    """bf16 1 + 2^-8 + 2^-8: in bf16 each add would round back to 1; in f32 the sum is
    1 + 2^-7, which bf16 holds exactly."""
    bufs, g = _members(3)
    for b, v in zip(bufs, (1.0, 2.0 ** -8, 2.0 ** -8)):
        b[:16].view(torch.bfloat16).fill_(v)
    w = M.ld_reduce_add_v4_bf16x2(g.address)
    got = torch.tensor([int(x) for x in w], dtype=torch.int64).to(torch.int32)
    assert got.view(torch.bfloat16).float().eq(1 + 2.0 ** -7).all()


def test_multimem_st_and_red_reach_every_member():
    bufs, g = _members(4)
    M.st_v4(g.address + 16, 1, 2, 0xFFFFFFFF, 4)
    M.red_add_u32(g.address + 60, 3)
    M.red_add_u32(g.address + 60, 0xFFFFFFFF)    # wraps modulo 2^32
    for b in bufs:
        w = b.view(torch.int32)
        assert w[4:8].tolist() == [1, 2, -1, 4] and w[15] == 2
        assert not w[:4].any() and not w[8:15].any()


def test_multimem_models_refuse_addresses_outside_a_group():
    bufs, g = _members(2, 64)
    for bad, nbytes in [(g.address + 8, 16), (g.address + 2, 4), (g.address + 64, 4),
                        (bufs[0].data_ptr(), 16), (0, 4)]:
        with pytest.raises(ValueError):
            M.resolve(bad, nbytes)
    g.close()
    with pytest.raises(ValueError, match="not a multicast address"):
        M.st_v4(g.address, 0, 0, 0, 0)


def test_multimem_fault_drops_the_last_member():
    bufs, g = _members(3)
    g.fault = "drop_last"
    for r, b in enumerate(bufs):
        b[:16].view(torch.float32).fill_(10.0 ** r)
    w = M.ld_reduce_add_v4_f32(g.address)
    assert np.uint32(w[0]).view(np.float32) == 11.0  # 1 + 10: the 100 is left out


# ----------------------------------------------------------------------------- the kernels

def _setup(n, T, D, dtype, seed=0):
    R = Ranks(n, T * D * dtype.itemsize)
    parts = [rand((T, D), dtype, seed + r) for r in range(n)]
    res, w = rand((T, D), dtype, seed + 100), rand((D,), dtype, seed + 101)
    return R, parts, res, w


def _fused_round(R, kind, parts, res, w, ctas=2):
    """Every rank's sharded fused kernel over fresh copies of the inputs; returns (y of rank
    0's buffer, [residual rows of each rank])."""
    n, (T, D), dtype = R.n, parts[0].shape, parts[0].dtype
    for r in range(n):
        R.x(r, T, D, dtype).copy_(parts[r])
    res_rows = [res[slice(*row_range(T, r, n))].clone() for r in range(n)]

    def launch(r):
        s, e = row_range(T, r, n)
        A.launch_fused(R.peers(r, kind), kind, A.DTYPES[dtype], x_off=0,
                       n_vec=D * dtype.itemsize // 16, row_start=s, n_rows=e - s,
                       max_rows=-(-T // n), has_residual=True, res_ptr=res_rows[r].data_ptr(),
                       w_ptr=w.data_ptr(), out_ptr=0, eps=EPS, push=True, ctas=ctas,
                       timeout_ns=10**9)
    R.run_round(launch)
    for r in range(n):
        assert torch.equal(R.x(r, T, D, dtype), R.x(0, T, D, dtype)), f"rank {r} buffer"
        assert R.sig(r)[ERR_OFF // 4] == 0
    return R.x(0, T, D, dtype).clone(), res_rows


@sim
@pytest.mark.parametrize("dt", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("n,T,D", [(1, 3, 16), (2, 5, 24), (3, 7, 16), (4, 3, 8), (8, 5, 16),
                                   (3, 41, 24)])
def test_sim_multimem_fused_push_matches_reference_and_p2p(dt, n, T, D):
    """Sharded fused kernel over the multicast address: T not divisible by N, ranks with no rows
    (4 ranks / 3 tokens, 8 ranks / 5 tokens), several iterations per CTA (41 tokens)."""
    dtype = DTYPES[dt]
    R, parts, res, w = _setup(n, T, D, dtype)
    want_y, _ = A.fused_ref(parts, res, w, EPS)
    sw_y, sw_res = A.fused_ref([A.allreduce_ref(parts)], res, w, EPS)  # switch-rounded sum
    y, res_rows = _fused_round(R, "multimem", parts, res, w)
    torch.testing.assert_close(y, want_y, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(y, sw_y, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(torch.cat(res_rows), sw_res), "residual rows"
    grid = min(2, -(-T // n))
    for r in range(n):   # 2 barriers: every rank's multimem.red reached every slot once each
        assert R.slots(r)[:grid, :n].eq(2).all() and not R.slots(r)[grid:].any()
        assert R.sig(r)[EPOCH_OFF // 4: EPOCH_OFF // 4 + grid].eq(2).all()
    y_p2p, res_p2p = _fused_round(Ranks(n, R.data), "p2p", parts, res, w)
    assert C.mismatch([y, torch.cat(res_rows)], [y_p2p, torch.cat(res_p2p)], n, "fused") is None
    R.close()


@sim
@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("dt", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("n,T,D", [(3, 5, 40), (8, 1, 16)])
def test_sim_multimem_allreduce_matches_reference_and_p2p(push, dt, n, T, D):
    """Plain all-reduce, two-shot (push: vectors split unevenly, 8 ranks / 2 vectors leaves six
    ranks without any) and one-shot. The sum is rounded once either way: bit-exact."""
    dtype = DTYPES[dt]
    off, nbytes = 128, T * D * dtype.itemsize
    parts = [rand((T, D), dtype, r + 30) for r in range(n)]
    want = A.allreduce_ref(parts)
    total = nbytes // 16
    max_vecs = -(-total // n) if push else total
    for kind in ("multimem", "p2p"):
        R = Ranks(n, nbytes + 256)
        for r in range(n):
            R.bufs[r][off: off + nbytes].view(dtype).view(T, D).copy_(parts[r])
        outs = [torch.full((T, D), float("nan"), dtype=dtype) for _ in range(n)]

        def launch(r):
            s, e = row_range(total, r, n) if push else (0, total)
            A.launch_allreduce(R.peers(r, kind), kind, dt, x_off=off, v_start=s, n_vecs=e - s,
                               max_vecs=max_vecs, out_ptr=outs[r].data_ptr(), push=push,
                               ctas=2, timeout_ns=10**9)
        R.run_round(launch)
        for r in range(n):
            got = R.bufs[r][off: off + nbytes].view(dtype).view(T, D) if push else outs[r]
            assert torch.equal(got, want), f"{kind} rank {r}"
        R.close()


@sim
def test_sim_multimem_fused_oneshot_matches_reference():
    n, T, D, dtype = 3, 4, 32, torch.bfloat16
    R, parts, res0, w = _setup(n, T, D, dtype, seed=10)
    for r in range(n):
        R.x(r, T, D, dtype).copy_(parts[r])
    sw_y, sw_res = A.fused_ref([A.allreduce_ref(parts)], res0, w, EPS)
    outs = [(torch.full((T, D), float("nan"), dtype=dtype), res0.clone()) for _ in range(n)]

    def launch(r):
        out, res = outs[r]
        A.launch_fused(R.peers(r, "multimem"), "multimem", "bf16", x_off=0, n_vec=D * 2 // 16,
                       row_start=0, n_rows=T, max_rows=T, has_residual=True,
                       res_ptr=res.data_ptr(), w_ptr=w.data_ptr(), out_ptr=out.data_ptr(),
                       eps=EPS, push=False, ctas=3, timeout_ns=10**9)
    R.run_round(launch)
    for r, (out, res) in enumerate(outs):
        torch.testing.assert_close(out, sw_y, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(out, outs[0][0]) and torch.equal(res, sw_res)
        assert torch.equal(R.x(r, T, D, dtype), parts[r])  # one-shot leaves the buffers alone


@sim
def test_sim_multimem_repeated_launches_keep_epochs_in_step():
    """Three rounds with new inputs on the same buffers: each round's outputs are right and every
    CTA's epoch and slot advance by exactly 2 (multimem.red signals every rank at once)."""
    n, T, D, dtype = 3, 7, 16, torch.bfloat16
    R = Ranks(n, T * D * 2)
    for it in range(3):
        _, parts, res, w = _setup(n, T, D, dtype, seed=40 * it)
        y, res_rows = _fused_round(R, "multimem", parts, res, w)
        sw_y, sw_res = A.fused_ref([A.allreduce_ref(parts)], res, w, EPS)
        torch.testing.assert_close(y, sw_y, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(torch.cat(res_rows), sw_res)
        for r in range(n):
            assert R.sig(r)[EPOCH_OFF // 4: EPOCH_OFF // 4 + 2].tolist() == [2 * (it + 1)] * 2
            assert R.slots(r)[:2, :n].eq(2 * (it + 1)).all()
    R.close()


@sim
@pytest.mark.parametrize("missing,barrier", [(1, 1), (2, 2)])
def test_sim_multimem_missing_rank_times_out_with_its_name(missing, barrier):
    """Rank 0 of 3 waits for a rank that never signals: the error word names it and the
    barrier; the next launch exits at once; before the start barrier nothing is written."""
    n, T, D = 3, 3, 16
    R = Ranks(n, T * D * 2)
    R.pre_arrive(barriers=barrier - 1)
    R.pre_arrive(barriers=1, missing=missing)
    x0 = [R.x(r, T, D, torch.bfloat16).clone() for r in range(n)]
    w, res = rand((D,), torch.bfloat16, 2), torch.zeros(1, D, dtype=torch.bfloat16)
    for attempt in range(2):
        A.launch_fused(R.peers(0, "multimem"), "multimem", "bf16", x_off=0, n_vec=2,
                       row_start=0, n_rows=1, max_rows=1, has_residual=True,
                       res_ptr=res.data_ptr(), w_ptr=w.data_ptr(), out_ptr=0, eps=EPS,
                       push=True, ctas=1, timeout_ns=20_000_000)
        code = int(R.sig(0)[ERR_OFF // 4]) & 0xFFFFFFFF
        assert decode_error(code) == (missing, barrier, 0) and code & 0x80000000
        assert int(R.err_host[0]) & 0xFFFFFFFF == code
        assert R.sig(0)[EPOCH_OFF // 4] == 0
        if barrier == 1:
            assert all(torch.equal(R.x(r, T, D, torch.bfloat16), x0[r]) for r in range(n))
    R.close()


@sim
@pytest.mark.parametrize("fault", [None, "drop_last"])
def test_sim_first_use_check_catches_a_broken_multimem(fault):
    """The communicator's first-use check (transport_check.first_use_steps) over N simulated
    ranks, each step run on every rank before the next: a healthy multicast object passes on
    every rank; one whose switch drops a rank's partials is caught on every rank, and the op's
    result (p2p's) is still right."""
    n, T, D, dtype = 3, 7, 16, torch.bfloat16
    R, parts, res, w = _setup(n, T, D, dtype, seed=60)
    R.group.fault = fault
    for r in range(n):
        R.x(r, T, D, dtype).copy_(parts[r])
    res_rows = [res[slice(*row_range(T, r, n))].clone() for r in range(n)]

    def launcher(r):
        def launch(kind):
            s, e = row_range(T, r, n)
            A.launch_fused(R.peers(r, kind), kind, "bf16", x_off=0, n_vec=D * 2 // 16,
                           row_start=s, n_rows=e - s, max_rows=-(-T // n), has_residual=True,
                           res_ptr=res_rows[r].data_ptr(), w_ptr=w.data_ptr(), out_ptr=0,
                           eps=EPS, push=True, ctas=2, timeout_ns=10**9)
        return launch
    io = [[R.x(r, T, D, dtype), res_rows[r]] for r in range(n)]
    steps = [C.first_use_steps(launcher(r), io[r], io[r]) for r in range(n)]
    for _ in range(4):   # each step on every rank: snapshot, multimem, restore, p2p
        R.run_round(lambda r: next(steps[r]))
    problems = [C.mismatch(C.run(steps[r]), io[r], n, "fused op") for r in range(n)]
    if fault is None:
        assert problems == [None] * n
    else:
        assert all(p and p.startswith("fused op: output ") for p in problems), problems
    want_y, want_res = A.fused_ref(parts, res, w, EPS)
    torch.testing.assert_close(R.x(0, T, D, dtype), want_y, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(torch.cat(res_rows), want_res)  # p2p's residual: f32 sum kept
    R.close()
