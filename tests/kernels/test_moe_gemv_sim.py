"""The small-batch MoE GEMV kernels (weavelm/kernels/moe_gemv.py), the same source the GPU
compiles, run in numba's CUDA simulator against float64 references: the whole block against
`moe_experts_reference` (the plain per-expert definition), the gate/up kernel against
silu(x w1^T) * (x w3^T) and the down kernel against the weighted sum, over 1..8 tokens, top-1,
top-2 and top-8, odd expert counts, bf16 / fp16 / fp32, shared experts, ids that route nowhere,
row slots narrower than a warp and several units per row slot.

T = tokens, E = experts, K = experts per token, D = hidden size, I = expert intermediate size.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from simulator_run import IN_SIM, REPO, run_sim_tests

from weavelm.kernels.moe import moe_experts, moe_experts_reference, route

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")
# relative to the largest |reference| output: the output's rounding (bf16 2^-8, fp16 2^-11)
TOL = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3, torch.float32: 1e-5}
FAST = dict(warps=2, max_ctas=2)         # small CTAs: the simulator runs a thread per lane


def operands(T, E, K, D, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = route(torch.randn(T, E, generator=g) * 2, K, K > 1)
    return x, w13, w2, weights, ids


def rel_err(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.skipif(IN_SIM, reason="this is the launcher of the simulator run")
def test_in_simulator():
    run_sim_tests(__file__, timeout=300)


@pytest.mark.skipif(IN_SIM, reason="checked once, outside the simulator run")
def test_cpu_auto_takes_the_grouped_path_and_gemv_says_why_not():
    code = ("import sys, torch; from weavelm.kernels.moe import moe_experts, route;"
            "x = torch.randn(2, 16); w13 = torch.randn(4, 16, 16); w2 = torch.randn(4, 16, 8);"
            "w, i = route(torch.randn(2, 4), 2, True); moe_experts(x, w13, w2, w, i);"
            "assert 'numba' not in sys.modules, 'CPU path imported numba'\n"
            "try:\n    moe_experts(x, w13, w2, w, i, impl='gemv')\n"
            "except ValueError as e:\n    assert 'not a CUDA device' in str(e), e\n"
            "else:\n    raise AssertionError('gemv ran on CPU')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_bad_impl_is_refused():
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        moe_experts(x, torch.randn(2, 16, 8), torch.randn(2, 8, 8), torch.ones(1, 1),
                    torch.zeros(1, 1, dtype=torch.long), impl="gemm")


def test_launch_classes():
    from weavelm.kernels import moe_gemv as M
    assert [M._tmax(t) for t in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [M._lanes(n) for n in (1, 3, 5, 12, 31, 32, 1792)] == [4, 4, 4, 8, 16, 32, 32]
    assert all(k in M.GATE_UP and k in M.DOWN for k in (1, 2, 4, 8))
    assert all(r % 2 == 0 for r, _ in M.DOWN.values())          # 16-bit outputs in pairs


# ----------------------------------------------------------------------------- simulator only

@sim
@pytest.mark.parametrize("T,E,K,D,inter,dtype", [
    (1, 5, 2, 64, 16, torch.bfloat16),   # decode: top-2 of an odd expert count
    (1, 3, 1, 32, 8, torch.float32),     # top-1
    (2, 7, 2, 32, 24, torch.float16),
    (3, 5, 2, 40, 16, torch.bfloat16),   # 5 vectors per row: 4 lanes a row, a tail
    (5, 9, 8, 16, 8, torch.float32),     # top-8: experts shared by every token
    (8, 9, 8, 16, 8, torch.bfloat16),    # 64 routed pairs, the largest launch
    (8, 3, 2, 32, 8, torch.float16),     # 8 tokens on 3 experts
    (6, 11, 1, 24, 16, torch.float32),
])
def test_sim_moe_gemv_matches_float64_reference(T, E, K, D, inter, dtype):
    x, w13, w2, weights, ids = operands(T, E, K, D, inter, dtype, seed=T * 31 + E + K)
    want = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    out = torch.full((T, D), float("nan"), dtype=dtype)          # every element written
    from weavelm.kernels import moe_gemv as M
    got = M.moe_gemv(x, w13, w2, weights, ids, out=out, params=FAST)
    assert got is out
    assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)


@sim
@pytest.mark.parametrize("T,K,dtype", [(1, 2, torch.bfloat16), (4, 2, torch.float16),
                                       (7, 6, torch.float32)])
def test_sim_gate_up_kernel_alone(T, K, dtype):
    """h = silu(x w1^T) * (x w3^T) of the very values the kernel reads: fp32 accumulation."""
    from weavelm.kernels import moe_gemv as M
    x, w13, _, _, ids = operands(T, 9, K, 24, 16, dtype, seed=K + 7 * T)
    h = torch.full((T, K, 16), float("nan"))
    M.moe_gate_up_cuda(x, w13, ids, h=h, params=FAST)
    want = M.moe_gate_up_ref(x.double(), w13.double(), ids)
    assert rel_err(h, want) <= 2e-6


@sim
@pytest.mark.parametrize("T,K,dtype", [(1, 2, torch.bfloat16), (3, 8, torch.float32),
                                       (8, 1, torch.float16)])
def test_sim_down_kernel_alone(T, K, dtype):
    """out = sum_k weights * h w2_e^T for a given fp32 h, rounded once to the dtype."""
    from weavelm.kernels import moe_gemv as M
    _, _, w2, weights, ids = operands(T, 9, K, 32, 16, dtype, seed=3 * T + K)
    h = torch.randn(T, K, 16, generator=torch.Generator().manual_seed(T))
    got = M.moe_down_cuda(h, w2, weights, ids, params=FAST)
    want = M.moe_down_ref(h.double(), w2.double(), weights.double(), ids, torch.float64)
    assert rel_err(got, want) <= TOL[dtype]


@sim
def test_sim_shared_experts_are_read_once_and_bad_ids_route_nowhere():
    """Four tokens on the same two experts (one table row each), an int32 id tensor, and
    ids outside [0, E) that contribute nothing (their h is not written)."""
    from weavelm.kernels import moe_gemv as M
    x, w13, w2, weights, _ = operands(4, 5, 2, 32, 16, torch.float32, seed=11)
    ids = torch.tensor([[3, 1], [1, 3], [3, 1], [1, 3]], dtype=torch.int32)
    want = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(),
                                 ids.long())
    got = M.moe_gemv(x, w13, w2, weights, ids, params=FAST)
    assert rel_err(got, want) <= TOL[torch.float32]
    bad = torch.tensor([[3, 5], [-1, 3], [3, 1], [1, 3]])             # 5 and -1: no expert
    keep = (bad >= 0) & (bad < 5)
    want = moe_experts_reference(x.double(), w13.double(), w2.double(),
                                 (weights * keep).double(), bad.clamp(0, 4))
    h = torch.full((4, 2, 16), 7.0)
    M.moe_gate_up_cuda(x, w13, bad, h=h, params=FAST)
    assert (h[~keep] == 7.0).all()                                     # untouched
    got = M.moe_down_cuda(h, w2, weights, bad, params=FAST)          # bad slots unread
    assert rel_err(got, want) <= TOL[torch.float32]


@sim
@pytest.mark.parametrize("params", [dict(warps=1, max_ctas=1, lanes=4),           # 8 slots a warp
                                    dict(warps=1, max_ctas=3, lanes=4, pairs=1, rows=4,
                                         unroll=3),
                                    dict(warps=1, max_ctas=1, lanes=8, pairs=4, rows=8)])
def test_sim_launch_shapes(params):
    """Row slots narrower than a warp, several units per slot (one CTA), other P / R / U:
    the same result."""
    from weavelm.kernels import moe_gemv as M
    x, w13, w2, weights, ids = operands(3, 6, 2, 32, 16, torch.bfloat16, seed=5)
    want = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    got = M.moe_gemv(x, w13, w2, weights, ids, params=params)
    assert rel_err(got, want) <= TOL[torch.bfloat16]


@sim
def test_sim_moe_experts_gemv_impl_and_launcher_checks():
    from weavelm.kernels import moe_gemv as M
    x, w13, w2, weights, ids = operands(2, 4, 2, 16, 8, torch.bfloat16, seed=1)
    want = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert rel_err(moe_experts(x, w13, w2, weights, ids, impl="gemv"), want) <= 8e-3
    for bad, words in [
            (dict(x=torch.randn(9, 16).bfloat16(), weights=torch.ones(9, 2),
                  ids=torch.zeros(9, 2, dtype=torch.long)), "1..8 tokens"),
            (dict(w2=w2.float()), "dtype"),
            (dict(w13=torch.randn(4, 12, 16).bfloat16(), w2=torch.randn(4, 16, 6).bfloat16()),
             "multiples of 8"),
            (dict(x=torch.randn(2, 17).bfloat16()[:, 1:]), "contiguous"),
            (dict(ids=ids.float()), "int64 or int32")]:
        args = {**dict(x=x, w13=w13, w2=w2, weights=weights, ids=ids), **bad}
        with pytest.raises(ValueError, match=words):
            M.moe_gemv(args["x"], args["w13"], args["w2"], args["weights"], args["ids"])
        with pytest.raises(ValueError, match=words):
            moe_experts(args["x"], args["w13"], args["w2"], args["weights"], args["ids"],
                        impl="gemv")
