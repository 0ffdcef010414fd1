"""The p2p all-reduce kernels (fused + plain), the same source the GPU compiles, in the simulator.

N ranks are simulated in one process (`sim_ranks.Ranks`: CPU tensors as symmetric buffers, their
host addresses as peer pointers; ranks run one after another, the barriers' signals of the ranks
not yet run are lent). Cross-GPU ordering itself is tested on GPUs only
(tests/gpu/test_fused_comm_multigpu.py). The multimem transport:
test_allreduce_norm_multimem_sim.py.

Like test_rmsnorm_sim.py, `test_in_simulator` re-runs this file with NUMBA_ENABLE_CUDASIM=1.
T = tokens, D = hidden size, N = ranks.
"""
from __future__ import annotations

import pytest
import torch
from sim_ranks import Ranks
from sim_ranks import rand as _rand
from simulator_run import IN_SIM, run_sim_tests

from weavelm.kernels import allreduce_norm as A
from weavelm.kernels.allreduce_norm_layout import EPOCH_OFF, ERR_OFF, MAX_CTAS, decode_error
from weavelm.parallel.communicator import row_range

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")
EPS = 1e-6
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# y: the reference's rsqrt and sum-of-squares order differ from the kernel's at the ulp level
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}  # rtol = atol


@pytest.mark.skipif(IN_SIM, reason="this is the launcher of the simulator run")
def test_in_simulator():
    run_sim_tests(__file__, timeout=600)


def _check_sharded_outputs(R, T, D, dtype, want_y, want_res, res_rows):
    """After a sharded round: every rank's buffer holds the same normalised [T, D], close to the
    reference; each rank's residual rows equal the reference's; no rank timed out."""
    y0 = R.x(0, T, D, dtype)
    torch.testing.assert_close(y0, want_y, rtol=TOL[dtype], atol=TOL[dtype])
    for r in range(R.n):
        assert torch.equal(R.x(r, T, D, dtype), y0), f"rank {r} buffer differs from rank 0's"
        s, e = row_range(T, r, R.n)
        assert torch.equal(res_rows[r], want_res[s:e]), f"rank {r} residual"
        assert R.sig(r)[ERR_OFF // 4] == 0


@sim
@pytest.mark.parametrize("dt", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("n,T,D", [(1, 3, 16), (2, 5, 24), (3, 7, 16), (4, 3, 8), (2, 2, 1040),
                                   (2, 23, 16), (3, 41, 24)])
def test_sim_fused_push_matches_reference(dt, n, T, D):
    """Sharded fused kernel: every rank's buffer ends with the full normalised [T, D], each rank
    updated only its own residual rows; T not divisible by N and ranks with no rows included.
    Small rows run R > 1 rows per CTA iteration (rows_per_iter: 4 for 2 and 3 ranks, 2 for 4 at
    vpt 1); T = 23 and 41 give CTAs several iterations with a partial last one (rows per CTA
    not a multiple of R)."""
    dtype = DTYPES[dt]
    R = Ranks(n, T * D * dtype.itemsize)
    parts = [_rand((T, D), dtype, r) for r in range(n)]
    for r in range(n):
        R.x(r, T, D, dtype).copy_(parts[r])
    res, w = _rand((T, D), dtype, 100), _rand((D,), dtype, 101)
    want_y, want_res = A.fused_ref(parts, res, w, EPS)
    res_rows = [res[slice(*row_range(T, r, n))].clone() for r in range(n)]  # sequence-sharded
    max_rows = -(-T // n)

    def launch(r):
        s, e = row_range(T, r, n)
        A.launch_fused(R.peers(r), "p2p", dt, x_off=0, n_vec=D * dtype.itemsize // 16,
                       row_start=s, n_rows=e - s, max_rows=max_rows,
                       has_residual=True, res_ptr=res_rows[r].data_ptr(), w_ptr=w.data_ptr(),
                       out_ptr=0, eps=EPS, push=True, ctas=2, timeout_ns=10**9)
    R.run_round(launch)
    _check_sharded_outputs(R, T, D, dtype, want_y, want_res, res_rows)
    for r in range(n):
        assert R.slots(r)[:min(2, max_rows), :n].eq(2).all()  # every rank signalled twice
    # every CTA advanced its epoch by the 2 barriers; CTAs beyond the grid did not
    grid = min(2, max_rows)
    for r in range(n):
        ep = R.sig(r)[EPOCH_OFF // 4: EPOCH_OFF // 4 + MAX_CTAS]
        assert ep[:grid].tolist() == [2] * grid and not ep[grid:].any()


@sim
@pytest.mark.parametrize("n,T,D", [(2, 5, 24), (3, 7, 16), (4, 3, 8), (3, 41, 24), (4, 9, 2048),
                                   (2, 3, 4104)])
def test_sim_fused_scatter_matches_reference(n, T, D):
    """The stores-only p2p variant: each rank first stores its partials of every peer's rows into
    that peer's inbox, then reduces its own rows from local memory. Ranks run one after another
    here, so before rank j runs, the inbox slots of the ranks after it are filled as their phase
    0 would have (the slots of the ranks before it hold what they really stored)."""
    dtype = torch.bfloat16
    row_bytes = D * 2
    max_rows = -(-T // n)
    inbox_off = T * row_bytes
    R = Ranks(n, inbox_off + n * max_rows * row_bytes)
    parts = [_rand((T, D), dtype, r + 50) for r in range(n)]
    for r in range(n):
        R.x(r, T, D, dtype).copy_(parts[r])
        R.bufs[r][inbox_off:R.data].fill_(0xFF)           # poison: NaN rows if never written
    res, w = _rand((T, D), dtype, 150), _rand((D,), dtype, 151)
    want_y, want_res = A.fused_ref(parts, res, w, EPS)
    res_rows = [res[slice(*row_range(T, r, n))].clone() for r in range(n)]

    def inbox(j, src):
        s, e = row_range(T, j, n)
        start = inbox_off + src * max_rows * row_bytes
        return R.bufs[j][start: start + (e - s) * row_bytes].view(dtype).view(e - s, D)

    def launch(j):
        s, e = row_range(T, j, n)
        for src in range(j + 1, n):
            inbox(j, src).copy_(parts[src][s:e])
        A.launch_fused(R.peers(j), "p2p", "bf16", x_off=0, n_vec=D * 2 // 16, row_start=s,
                       n_rows=e - s, max_rows=max_rows, has_residual=True,
                       res_ptr=res_rows[j].data_ptr(), w_ptr=w.data_ptr(), out_ptr=0, eps=EPS,
                       push=True, ctas=2, timeout_ns=10**9, inbox_off=inbox_off, n_total=T)
    R.run_round(launch)
    for j in range(n):
        s, e = row_range(T, j, n)
        for src in range(j):                               # really stored by rank src
            assert torch.equal(inbox(j, src), parts[src][s:e]), f"inbox of {j}, slot {src}"
    _check_sharded_outputs(R, T, D, dtype, want_y, want_res, res_rows)


@sim
@pytest.mark.parametrize("has_residual", [True, False])
def test_sim_fused_oneshot_matches_reference(has_residual):
    n, T, D, dtype = 3, 4, 32, torch.bfloat16
    R = Ranks(n, T * D * 2)
    parts = [_rand((T, D), dtype, r + 10) for r in range(n)]
    for r in range(n):
        R.x(r, T, D, dtype).copy_(parts[r])
    res0, w = _rand((T, D), dtype, 20), _rand((D,), dtype, 21)
    want_y, want_res = A.fused_ref(parts, res0 if has_residual else None, w, EPS)
    outs = []

    def launch(r):
        res, out = res0.clone(), torch.full((T, D), float("nan"), dtype=dtype)
        A.launch_fused(R.peers(r), "p2p", "bf16", x_off=0, n_vec=D * 2 // 16, row_start=0,
                       n_rows=T, max_rows=T, has_residual=has_residual, res_ptr=res.data_ptr(),
                       w_ptr=w.data_ptr(), out_ptr=out.data_ptr(), eps=EPS, push=False, ctas=3,
                       timeout_ns=10**9)
        outs.append((out, res))
    R.run_round(launch)
    for r, (out, res) in enumerate(outs):
        torch.testing.assert_close(out, want_y, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(out, outs[0][0])  # same sum order on every rank: identical results
        if has_residual:
            assert torch.equal(res, want_res)
        assert torch.equal(R.x(r, T, D, dtype), parts[r])  # one-shot leaves the buffers alone


@sim
@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("dt", ["bf16", "f32"])
def test_sim_allreduce_matches_reference(push, dt):
    n, T, D = 3, 5, 40
    dtype = DTYPES[dt]
    n_vec = D * dtype.itemsize // 16
    R = Ranks(n, T * D * dtype.itemsize + 256)
    off = 128  # x need not start at the buffer's beginning
    parts = [_rand((T, D), dtype, r + 30) for r in range(n)]
    for r in range(n):
        R.bufs[r][off: off + T * D * dtype.itemsize].view(dtype).view(T, D).copy_(parts[r])
    want = A.allreduce_ref(parts)
    total = T * n_vec
    max_vecs = -(-total // n) if push else total
    outs = []

    def launch(r):
        out = torch.full((T, D), float("nan"), dtype=dtype)
        s, e = row_range(total, r, n) if push else (0, total)
        A.launch_allreduce(R.peers(r), "p2p", dt, x_off=off, v_start=s, n_vecs=e - s,
                           max_vecs=max_vecs, out_ptr=out.data_ptr(),
                           push=push, ctas=2, timeout_ns=10**9)
        outs.append(out)
    R.run_round(launch)
    for r in range(n):
        got = R.bufs[r][off: off + T * D * dtype.itemsize].view(dtype).view(T, D) if push \
            else outs[r]
        assert torch.equal(got, want), f"rank {r}"


@sim
def test_sim_repeated_launches_keep_epochs_in_step():
    """Three rounds of launches: every CTA's epoch and every slot advance by exactly 2 per round
    (the counters never need a host-side epoch, so CUDA-graph replays stay in step)."""
    n, T, D = 2, 3, 16
    R = Ranks(n, T * D * 2)
    w = _rand((D,), torch.bfloat16, 1)

    def launch(r):
        s, e = row_range(T, r, n)
        res = torch.zeros(e - s, D, dtype=torch.bfloat16)
        A.launch_fused(R.peers(r), "p2p", "bf16", x_off=0, n_vec=2, row_start=s,
                       n_rows=e - s, max_rows=2, has_residual=True, res_ptr=res.data_ptr(),
                       w_ptr=w.data_ptr(), out_ptr=0, eps=EPS, push=True, ctas=2,
                       timeout_ns=10**9)
    for it in range(3):
        R.run_round(launch)
        for r in range(n):
            assert R.sig(r)[EPOCH_OFF // 4: EPOCH_OFF // 4 + 2].tolist() == [2 * (it + 1)] * 2
            assert R.sig(r)[ERR_OFF // 4] == 0
            assert R.slots(r)[:2, :n].eq(2 * (it + 1)).all()


@sim
@pytest.mark.parametrize("missing,barrier", [(1, 1), (2, 2)])
def test_sim_missing_rank_times_out_with_its_name(missing, barrier):
    """Rank 0 waits for a rank that never signals barrier `barrier`: within the timeout the
    kernel records (that rank, that barrier) in the sticky error word and the host word, and
    returns; the next launch exits at once without touching any buffer."""
    n, T, D = 3, 3, 16
    R = Ranks(n, T * D * 2)
    R.pre_arrive(barriers=barrier - 1)          # everyone passed the barriers before this one
    R.pre_arrive(barriers=1, missing=missing)   # ... and all but `missing` signalled this one
    x0 = [R.x(r, T, D, torch.bfloat16).clone() for r in range(n)]
    w, res = _rand((D,), torch.bfloat16, 2), torch.zeros(1, D, dtype=torch.bfloat16)
    for attempt in range(2):
        A.launch_fused(R.peers(0), "p2p", "bf16", x_off=0, n_vec=2, row_start=0, n_rows=1,
                       max_rows=1, has_residual=True, res_ptr=res.data_ptr(), w_ptr=w.data_ptr(),
                       out_ptr=0, eps=EPS, push=True, ctas=1, timeout_ns=20_000_000)
        code = int(R.sig(0)[ERR_OFF // 4]) & 0xFFFFFFFF
        assert code & 0x80000000
        assert decode_error(code) == (missing, barrier, 0)
        assert int(R.err_host[0]) & 0xFFFFFFFF == code
        assert R.sig(0)[EPOCH_OFF // 4] == 0  # epoch not advanced after a timeout
        if barrier == 1:  # nothing was read or written
            assert all(torch.equal(R.x(r, T, D, torch.bfloat16), x0[r]) for r in range(n))
