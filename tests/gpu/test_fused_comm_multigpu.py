"""The p2p communicator on every visible GPU against torch references (skipped below 2 GPUs).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    WEAVELM_DISABLE_MULTICAST=1 python3 -m pytest -q -s tests/gpu/test_fused_comm_multigpu.py
or, as a script printing the whole report: `... python3 tests/gpu/test_fused_comm_multigpu.py`.

One `spawn` over all GPUs runs every check and returns a report, so one failing case does not
hide the others (the GPUs are scarce: one run must tell everything):
* sweep: tokens {1, 3, 7, 64, 1000, 4096, 16384} x hidden {4096, 5120, 8192}, bf16, fresh
  random partials per rank: the sharded fused op and the plain all-reduce (one- and two-shot)
  against (a) the fp32
  reference computed from every rank's partials (residual and all-reduce bit-exact; normalised
  output within bf16 tolerance) and (b) NCCL all-reduce + RMSNorm (looser: NCCL sums in bf16);
  outputs bitwise identical on every rank; NaN guard rows beyond the outputs stay NaN.
* drift: 1000 back-to-back launches and 1000 CUDA-graph replays of (copy-in, fused op): every
  iteration equals the first bitwise (mismatch counters kept on the GPU), epochs stay in step.
* missing rank: the last rank skips one call; the others raise within the timeout, naming it;
  after reset() on every rank the communicator works again.
Only the p2p transport runs: multicast is switched off on the lent GPU machines
(docs/architecture.md, "Why multicast is guarded").
T = tokens, D = hidden size, N = ranks.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1"), ("WEAVELM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_k, _v)  # inherited by the spawned ranks
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest  # noqa: E402
import torch  # noqa: E402

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(N_GPUS < 2, reason="needs two or more CUDA GPUs")]

TOKENS = [1, 3, 7, 64, 1000, 4096, 16384]
HIDDEN = [4096, 5120, 8192]
EPS = 1e-5
TOL_REF = 1.6e-2   # y vs the fp32 reference (rtol = atol): bf16 rounding of the output
TOL_NCCL = 1e-1    # y, residual vs NCCL all-reduce + RMSNorm: NCCL rounds the sum to bf16
ITERS = 1000


def _gen(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _close(a, b, tol) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


def _same_on_all_ranks(t) -> bool:
    """Bitwise equal on every rank (two int64 checksums of the bits, all-gathered)."""
    import torch.distributed as dist

    bits = t.contiguous().view(torch.int16).long().flatten()
    w = torch.arange(bits.numel(), device=bits.device) % 8191 + 1
    mine = torch.stack([bits.sum(), (bits * w).sum()])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(e, every[0]) for e in every)


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _sweep(comm, rank, n, report, section="sweep"):
    import torch.distributed as dist

    from weavelm.kernels import allreduce_norm as K
    from weavelm.kernels.rmsnorm import fused_add_rms_norm_ref
    from weavelm.parallel.communicator import row_range

    for D in HIDDEN:
        w = _gen((D,), 7 + D)
        for T in TOKENS:
            case = {"section": section, "T": T, "D": D}
            failed = False
            try:
                s, e = row_range(T, rank, n)
                parts = [_gen((T, D), 1000 * r + T + D) for r in range(n)]
                res_full = _gen((T, D), 99 + T + D)
                want_y, want_res = K.fused_ref(parts, res_full, w, EPS)
                nccl = parts[rank].clone()
                dist.all_reduce(nccl)
                nccl_y, nccl_res = fused_add_rms_norm_ref(nccl, res_full.clone(), w, EPS)
                checks = {}

                # (1) sharded: zero-copy input, residual rows + a NaN guard row
                x = comm.staging(T + 1, D, torch.bfloat16)
                x[T].fill_(float("nan"))
                x = x[:T]
                x.copy_(parts[rank])
                res = torch.empty(e - s + 1, D, dtype=torch.bfloat16, device="cuda")
                res[: e - s].copy_(res_full[s:e])
                res[e - s].fill_(float("nan"))
                y = comm.reduce_scatter_add_rms_norm_all_gather(x, res[: e - s], w, EPS)
                comm.check_errors()
                guard = comm.buf.view(T + 1, D, torch.bfloat16)[T]
                checks["sharded y~ref"] = _close(y, want_y, TOL_REF)
                checks["sharded res==ref"] = torch.equal(res[: e - s], want_res[s:e])
                checks["sharded y~nccl"] = _close(y, nccl_y, TOL_NCCL)
                checks["sharded res~nccl"] = _close(res[: e - s], nccl_res[s:e], TOL_NCCL)
                checks["sharded guards NaN"] = bool(guard.isnan().all() and res[e - s].isnan()
                                                    .all())
                checks["sharded same on all ranks"] = _same_on_all_ranks(y)
                case["err_y_ref"], case["err_y_nccl"] = _err(y, want_y), _err(y, nccl_y)

                # (2) plain all-reduce, one-shot and two-shot
                want_sum = K.allreduce_ref(parts)
                for label, limit in (("one-shot", 1 << 62), ("two-shot", 0)):
                    comm.oneshot_max_bytes = limit
                    x = comm.staging(T, D, torch.bfloat16)
                    x.copy_(parts[rank])
                    out = comm.all_reduce(x)
                    comm.check_errors()
                    checks[f"all_reduce {label}==ref"] = torch.equal(out, want_sum)
                    checks[f"all_reduce {label}~nccl"] = _close(out, nccl, TOL_NCCL)
                comm.oneshot_max_bytes = 512 * 1024
                case["failed"] = [k for k, v in checks.items() if not v]
                failed = bool(case["failed"])
            except Exception as ex:  # noqa: BLE001 - keep sweeping, report it
                case["exception"] = "".join(traceback.format_exception_only(type(ex), ex))
                failed = True
            report.append(case)
            if _any_rank(failed):
                comm.oneshot_max_bytes = 512 * 1024
                comm.reset()  # a timeout on any rank leaves the signal areas out of step


def _drift(comm, rank, n, report):
    """ITERS eager launches and ITERS graph replays of (copy-in, fused op, compare)."""
    from weavelm.kernels import allreduce_norm as K
    from weavelm.parallel.communicator import row_range

    T, D = 1000, 8192
    s, e = row_range(T, rank, n)
    parts = [_gen((T, D), 5000 + r) for r in range(n)]
    res0, w = _gen((e - s, D), 6000 + rank), _gen((D,), 6001)
    x = comm.staging(T, D, torch.bfloat16)
    res = res0.clone()

    def step():
        x.copy_(parts[rank])
        res.copy_(res0)
        return comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, EPS)

    first = step().clone()
    first_res = res.clone()
    comm.check_errors()
    full_res = torch.cat([torch.zeros(s, D, dtype=torch.bfloat16, device="cuda"), res0,
                          torch.zeros(T - e, D, dtype=torch.bfloat16, device="cuda")])
    want_y, _ = K.fused_ref(parts, full_res, w, EPS)
    case = {"section": "drift", "T": T, "D": D,
            "first~ref": _close(first[s:e], want_y[s:e], TOL_REF)}  # others' residuals differ
    mism = torch.zeros((), dtype=torch.int64, device="cuda")
    t0 = time.perf_counter()
    for _ in range(ITERS):
        y = step()
        mism += (y != first).sum() + (res != first_res).sum()
    torch.cuda.synchronize()
    case["eager_s"] = time.perf_counter() - t0
    comm.check_errors()
    case["eager mismatches"] = int(mism.item())

    g, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    gm = torch.zeros((), dtype=torch.int64, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(g, stream=side):
        y = step()
        gm += (y != first).sum() + (res != first_res).sum()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(ITERS):
        g.replay()
    torch.cuda.synchronize()
    comm.check_errors()
    case["graph mismatches"] = int(gm.item())
    y = step()  # eager again after the replays: the epochs are still in step
    case["eager after graph ok"] = bool(torch.equal(y, first))
    comm.check_errors()
    ep = comm.buf.signal_area()
    case["epochs same on all ranks"] = _same_on_all_ranks(ep[: 4096 // 4].to(torch.int16))
    case["failed"] = [k for k in ("first~ref", "eager after graph ok", "epochs same on all ranks")
                      if not case[k]] + [k for k in ("eager mismatches", "graph mismatches")
                                         if case[k]]
    report.append(case)


def _missing_rank(rank, n, report):
    """A fresh communicator with a short timeout; the last rank skips one call."""
    import torch.distributed as dist

    from weavelm.errors import WeavelmError
    from weavelm.parallel.communicator import row_range
    from weavelm.parallel.fused_communicator import P2PCommunicator
    from weavelm.parallel.state import get_state

    comm = P2PCommunicator(get_state(), timeout_s=0.5, ctas=4)
    T, D = 64, 4096
    s, e = row_range(T, rank, n)
    w, res = _gen((D,), 1), torch.zeros(e - s, D, dtype=torch.bfloat16, device="cuda")
    x = comm.staging(T, D, torch.bfloat16)
    x.copy_(_gen((T, D), 2 + rank))
    comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, EPS)  # warm: compiled everywhere
    comm.check_errors()
    dist.barrier()
    torch.cuda.synchronize()
    case = {"section": "missing rank", "T": T, "D": D, "rank": rank}
    missing = n - 1
    if rank != missing:
        t0 = time.perf_counter()
        comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, EPS)
        try:
            comm.check_errors()
            case["raised"] = None
        except WeavelmError as ex:
            case["raised"] = str(ex)
        case["seconds"] = time.perf_counter() - t0
        case["names rank"] = bool(case["raised"]) and f"waiting for rank {missing}" in \
            case["raised"]
        case["within timeout + 2 s"] = case["seconds"] < 0.5 + 2.0
        try:  # sticky: the next call raises before launching (host word) or right after
            comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, EPS)
            comm.check_errors()
            case["sticky"] = False
        except WeavelmError:
            case["sticky"] = True
        case["failed"] = [k for k in ("names rank", "within timeout + 2 s", "sticky")
                          if not case[k]]
    else:
        case["failed"] = []
    dist.barrier()
    comm.reset()  # every rank
    x.copy_(_gen((T, D), 2 + rank))
    res.zero_()
    comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, EPS)
    try:
        comm.check_errors()
        case["works after reset"] = True
    except WeavelmError as ex:
        case["works after reset"] = False
        case["after reset"] = str(ex)
        case["failed"].append("works after reset")
    report.append(case)


def _worker():
    import torch.distributed as dist

    from weavelm.parallel.fused_communicator import P2PCommunicator
    from weavelm.parallel.state import init_parallel

    state = init_parallel(device="cuda", timeout_s=300)
    rank, n = state.rank, state.world_size
    report = [{"section": "setup", "rank": rank, "world": n,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}]
    comm = P2PCommunicator(state, ctas=8)
    comm.reserve(max(TOKENS) + 1, max(HIDDEN), torch.bfloat16)
    def other_sweep():   # the other p2p kernel (scatter, unless WEAVELM_P2P_SCATTER=1)
        default = comm.scatter
        comm.scatter = not default
        try:
            _sweep(comm, rank, n, report, "sweep other kernel")
        finally:
            comm.scatter = default

    for name, fn in (("sweep", lambda: _sweep(comm, rank, n, report)),
                     ("sweep other kernel", other_sweep),
                     ("drift", lambda: _drift(comm, rank, n, report)),
                     ("missing rank", lambda: _missing_rank(rank, n, report))):
        try:
            fn()
        except Exception:  # noqa: BLE001
            report.append({"section": name, "exception": traceback.format_exc(),
                           "failed": ["exception"]})
    every = [None] * n
    dist.all_gather_object(every, report)
    return every


def run_all() -> list:
    """Every rank's report (a list per rank)."""
    from weavelm.parallel.launch import spawn

    return spawn(_worker, N_GPUS)


@pytest.fixture(scope="module")
def reports():
    return run_all()


def _bad(reports, section):
    out = []
    for rank, rep in enumerate(reports):
        for c in rep:
            if c.get("section") == section and (c.get("failed") or c.get("exception")):
                out.append((rank, c))
    return out


def test_sweep_matches_references(reports):
    bad = _bad(reports, "sweep")
    assert not bad, "\n".join(f"rank {r}: {c}" for r, c in bad[:20])
    assert sum(c["section"] == "sweep" for c in reports[0]) == len(TOKENS) * len(HIDDEN)


def test_other_p2p_kernel_sweep_matches_references(reports):
    """The pull and the scatter kernel both pass the same sweep."""
    bad = _bad(reports, "sweep other kernel")
    assert not bad, "\n".join(f"rank {r}: {c}" for r, c in bad[:20])
    assert sum(c["section"] == "sweep other kernel" for c in reports[0]) == \
        len(TOKENS) * len(HIDDEN)


def test_no_drift_over_launches_and_graph_replays(reports):
    bad = _bad(reports, "drift")
    assert not bad, "\n".join(f"rank {r}: {c}" for r, c in bad)
    assert any(c["section"] == "drift" for c in reports[0])


def test_missing_rank_raises_naming_it(reports):
    bad = _bad(reports, "missing rank")
    assert not bad, "\n".join(f"rank {r}: {c}" for r, c in bad)
    assert any(c["section"] == "missing rank" and c.get("names rank") for c in reports[0])


if __name__ == "__main__":
    import json

    if N_GPUS < 2:
        sys.exit("needs two or more CUDA GPUs")
    reps = run_all()
    for r, rep in enumerate(reps):
        for c in rep:
            print(f"rank {r}: {json.dumps(c, default=str)}")
    failures = sum(len(_bad(reps, s)) for s in ("sweep", "drift", "missing rank"))
    print(f"\n{failures} failing entries")
    sys.exit(1 if failures else 0)
