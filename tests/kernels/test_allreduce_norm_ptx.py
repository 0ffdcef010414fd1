"""Both transports of the all-reduce kernels compile for sm_90a and `ptxas` assembles them.

The multimem kernels are never run on the shared machines (docs/architecture.md, "Why multicast
is guarded"): this is their only check. It also proves the "one body, two transports" claim on
the PTX: the two kernels of a pair differ in the transport instructions and agree on everything
else we can count (norm math, block reduction, barriers, timeouts). No GPU needed (cc is always
passed).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX is not compiled under the CUDA simulator", allow_module_level=True)

from weavelm.kernels import allreduce_norm as A  # noqa: E402
from weavelm.kernels.allreduce_norm_fused import make_fused_kernel, rows_per_iter  # noqa: E402
from weavelm.kernels.allreduce_norm_plain import make_allreduce_kernel, vecs_per_iter  # noqa: E402
from weavelm.kernels.launcher import Kernel  # noqa: E402

from machine_code import nvdisasm  # noqa: E402  (tests/)

PTXAS = shutil.which("ptxas")
_cache: dict = {}


def fused_ptx(kind, dt="bf16", world=4, vpt=2, push=True, res=True, rows=None,
              scatter=False) -> str:
    """PTX of a fused variant; rows=None: the plan's rows_per_iter."""
    key = ("f", kind, dt, world, vpt, push, res, rows, scatter)
    if key not in _cache:
        k = Kernel("t", lambda: make_fused_kernel(kind, dt, world, vpt, push, res, rows,
                                                  scatter),
                   A.FUSED_SIGNATURE, max_threads=A.MAX_BLOCK)
        _cache[key] = k.ptx()
    return _cache[key]


def allreduce_ptx(kind, dt="bf16", world=8, push=True, unroll=None) -> str:
    key = ("a", kind, dt, world, push, unroll)
    if key not in _cache:
        k = Kernel("t", lambda: make_allreduce_kernel(kind, dt, world, push, unroll),
                   A.ALLREDUCE_SIGNATURE, max_threads=A.MAX_BLOCK)
        _cache[key] = k.ptx()
    return _cache[key]


def assemble(ptx: str, tmp_path, no_spill: bool = True) -> None:
    if PTXAS is None:
        pytest.skip("ptxas not on PATH")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if no_spill:  # registers suffice at 512 threads (<= 128 per thread)
        assert " 0 bytes spill stores" in r.stderr, r.stderr


def count(ptx: str, pattern: str) -> int:
    return len(re.findall(pattern, ptx))


BARRIER = [r"ld\.acquire\.sys\.global\.u32", r"%globaltimer", r"atom\.global\.sys\.cas\.b32",
           r"fence\.acq_rel\.sys", r"bar\.sync"]
SHARED_MATH = [r"sqrt\.\w+\.f32", r"rcp\.\w+\.f32", r"div\.\w+\.f32", r"fma\.rn\.f32",
               r"mul\.f32", r"mul\.rn\.f32", r"shfl\.sync\.bfly\.b32", r"cvt\.rn\.bf16x2\.f32",
               r"ld\.global\.nc\.v4\.u32", r"ld\.global\.v4\.u32"]


@pytest.mark.parametrize("kind", A.TRANSPORTS)
def test_fused_kernel_assembles(kind, tmp_path):
    ptx = fused_ptx(kind)
    assert ".target sm_90a" in ptx
    assert ".local" not in ptx, "peer pointers / row buffer spilled to local memory"
    assert "call" not in ptx
    for pat in BARRIER:
        assert count(ptx, pat) >= 1, pat
    assert count(ptx, r"ld\.acquire\.sys") == 2  # one wait per barrier (start, end)
    if kind == "multimem":
        assert "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2" in ptx
        assert "multimem.st.relaxed.sys.global.v4.f32" in ptx
        assert "multimem.red.relaxed.sys.global.add.u32" in ptx
        assert "ld.volatile.global.v4" not in ptx  # no peer loads
    else:
        assert "multimem" not in ptx
        R = rows_per_iter(kind, "bf16", 4, 2)
        assert count(ptx, r"ld\.volatile\.global\.v4\.u32") == R * 2 * 4  # R x vpt x N
        assert count(ptx, r"st\.global\.v4\.u32") >= 2 * 4  # pushes to every rank
        # 2 barriers x N relaxed signals, each barrier fencing once before them (not per rank)
        assert count(ptx, r"red\.relaxed\.sys\.global\.add\.u32") == 2 * 4
        assert "red.release" not in ptx
        assert count(ptx, r"fence\.acq_rel\.sys") == 2
    assemble(ptx, tmp_path)


@pytest.mark.parametrize("world,vpt", [(4, 2), (8, 1), (2, 2)])
def test_fused_p2p_scatter_variant(world, vpt, tmp_path):
    """The stores-only p2p variant: no remote loads (all N loads per vector go to the local
    inbox or own row, still issued before first use), the plan's R, no spills."""
    ptx = fused_ptx("p2p", world=world, vpt=vpt, scatter=True)
    R = rows_per_iter("p2p", "bf16", world, vpt)
    assert count(ptx, r"ld\.volatile\.global\.v4\.u32") == R * vpt * world
    assert _main_loop_loads_before_first_add(ptx, r"ld\.volatile\.global\.v4\.u32") == \
        R * vpt * world
    assert count(ptx, r"ld\.acquire\.sys") == 2 and "multimem" not in ptx
    assert ".local" not in ptx
    assemble(ptx, tmp_path)
    with pytest.raises(ValueError):
        make_fused_kernel("multimem", "bf16", 4, 2, True, True, None, True)


def test_fused_transports_share_everything_else():
    """Same norm math, block reduction, conversions, barrier and timeout code in both kernels;
    the p2p kernel only adds the fp32 adds of its in-thread reduction over ranks."""
    for rows in (1, 2):  # the same R in both (the plans pick R per transport)
        p2p, mm = fused_ptx("p2p", rows=rows), fused_ptx("multimem", rows=rows)
        for pat in SHARED_MATH + BARRIER:
            assert count(p2p, pat) == count(mm, pat), (rows, pat)
        # (N - 1) adds per element of R x vpt=2 vectors of 8: what the switch does for multimem
        assert count(p2p, r"add\.f32") - count(mm, r"add\.f32") == rows * 2 * 8 * (4 - 1)


def _main_loop_loads_before_first_add(ptx: str, load: str) -> int:
    """Loads `load` issued in the fused kernel's main loop before the first f32 add (the first
    use of a loaded value: the rank reduction or, multimem, the residual add)."""
    body = ptx[ptx.index("bar.sync"):]                 # after the start barrier's first sync
    body = body[body.index("ld.acquire.sys"):]         # inside the start barrier's wait ...
    body = body[body.index("bar.sync"):]               # ... and past its closing sync
    first_add = re.search(r"\badd\.(rn\.)?f32", body).start()
    return count(body[:first_add], load)


@pytest.mark.parametrize("world,vpt", [(4, 1), (4, 2), (2, 2), (8, 1)])
def test_fused_p2p_issues_all_loads_of_an_iteration_first(world, vpt, tmp_path):
    """All R x vpt x N peer loads of an iteration precede the first use of any (the loads are in
    flight together), and the plan's R assembles without spills."""
    R = rows_per_iter("p2p", "bf16", world, vpt)
    ptx = fused_ptx("p2p", world=world, vpt=vpt)
    assert _main_loop_loads_before_first_add(ptx, r"ld\.volatile\.global\.v4\.u32") == \
        R * vpt * world
    assemble(ptx, tmp_path)


def test_fused_rows_per_iter_plans():
    assert rows_per_iter("p2p", "bf16", 4, 1) == 4   # hidden 4096, 4 ranks: 16 loads in flight
    assert rows_per_iter("p2p", "bf16", 4, 2) == 1   # hidden 5120-8192: 8 (+ residual)
    assert rows_per_iter("p2p", "bf16", 2, 1) == 4
    assert rows_per_iter("multimem", "bf16", 4, 2) == 2
    assert vecs_per_iter("p2p", 4) == 4 and vecs_per_iter("p2p", 8) == 2


@pytest.mark.parametrize("dt,ins", [("f16", "multimem.ld_reduce.relaxed.sys.global.add.acc::f32"
                                            ".v4.f16x2"),
                                    ("f32", "multimem.ld_reduce.relaxed.sys.global.add.v4.f32")])
def test_fused_multimem_other_dtypes_assemble(dt, ins, tmp_path):
    ptx = fused_ptx("multimem", dt=dt, world=2, vpt=1)
    assert ins in ptx
    assemble(ptx, tmp_path)


def test_fused_p2p_8_ranks_keeps_registers(tmp_path):
    """8 ranks, 4 vectors per thread (hidden 16384 bf16), residual: no spills."""
    ptx = fused_ptx("p2p", world=8, vpt=4)
    assert ".local" not in ptx
    assemble(ptx, tmp_path)


def test_fused_p2p_widest_variant_assembles(tmp_path):
    """8 ranks, 8 vectors per thread (hidden 32768 bf16): assembles (ptxas spills a few bytes)."""
    assemble(fused_ptx("p2p", world=8, vpt=8, push=False, res=False), tmp_path, no_spill=False)


@pytest.mark.parametrize("kind", A.TRANSPORTS)
@pytest.mark.parametrize("push", [True, False])
def test_allreduce_kernel_assembles(kind, push, tmp_path):
    ptx = allreduce_ptx(kind, push=push)
    assert ".local" not in ptx and "call" not in ptx
    for pat in BARRIER:
        assert count(ptx, pat) >= 1, pat
    if kind == "multimem":
        assert "multimem.ld_reduce" in ptx and "multimem.red.relaxed" in ptx
        assert ("multimem.st" in ptx) == push
    else:
        assert "multimem" not in ptx
        U = vecs_per_iter(kind, 8)
        assert count(ptx, r"ld\.volatile\.global\.v4\.u32") == 8 * U
        assert count(ptx, r"st\.global\.v4\.u32") == (8 if push else 1) * U
    assemble(ptx, tmp_path)


def test_allreduce_transports_share_everything_else():
    U = vecs_per_iter("p2p", 8)  # the same unroll in both (the plans pick one per transport)
    p2p, mm = allreduce_ptx("p2p", unroll=U), allreduce_ptx("multimem", unroll=U)
    for pat in BARRIER + [r"cvt\.rn\.bf16x2\.f32"]:
        assert count(p2p, pat) == count(mm, pat), pat


# ----------------------------------------------------------------------------- machine code

# What ptxas 13.0 makes of each multimem instruction for sm_90a, one SASS instruction per PTX
# one. ld_reduce is its own opcode (LDGMC: f32 adds, round to nearest); st and red are strong
# global stores / reductions, multicast only through the address (the MMU maps it onto the
# multicast object): they are counted, since the multimem kernels have no other such accesses.
MULTIMEM_SASS = {
    "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2":
        r"LDGMC\.E\.F32ADD\.BF16x8\.RN\.STRONG\.SYS",
    "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2":
        r"LDGMC\.E\.F32ADD\.F16x8\.RN\.STRONG\.SYS",
    "multimem.ld_reduce.relaxed.sys.global.add.v4.f32": r"LDGMC\.E\.ADD\.F32x4\.RN\.STRONG\.SYS",
    "multimem.st.relaxed.sys.global.v4.f32": r"STG\.E\.128\.STRONG\.SYS",
    "multimem.red.relaxed.sys.global.add.u32": r"REDG\.E\.ADD\.STRONG\.SYS",
}


def sass(ptx: str, tmp_path) -> str:
    tool = nvdisasm()
    if PTXAS is None or tool is None:
        pytest.skip("machine-code check needs ptxas and nvdisasm (pip install "
                    "'weavelm[test]' brings nvdisasm); neither cuobjdump -sass nor nvdisasm "
                    "works without nvdisasm")
    assemble(ptx, tmp_path, no_spill=False)
    r = subprocess.run([tool, str(tmp_path / "k.cubin")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("which", ["fused_bf16", "fused_f16", "fused_f32", "allreduce_push",
                                   "allreduce_oneshot"])
def test_multimem_kernels_machine_code(which, tmp_path):
    """The cubin has exactly the multimem instructions the PTX asked for, as the SASS above
    (no load-reduce lowered to plain loads, none of another type or rounding)."""
    ptx = {"fused_bf16": lambda: fused_ptx("multimem"),
           "fused_f16": lambda: fused_ptx("multimem", dt="f16", world=2, vpt=1),
           "fused_f32": lambda: fused_ptx("multimem", dt="f32", world=2, vpt=1),
           "allreduce_push": lambda: allreduce_ptx("multimem", push=True),
           "allreduce_oneshot": lambda: allreduce_ptx("multimem", push=False)}[which]()
    code = sass(ptx, tmp_path)
    asked = 0
    for ins, op in MULTIMEM_SASS.items():
        n = ptx.count(ins + " ")
        asked += n
        assert count(code, rf"\b{op}\b") == n, (ins, op, n)
    assert asked >= 2 and count(code, r"\bLDGMC\b") == count(ptx, r"multimem\.ld_reduce")


def test_p2p_kernel_machine_code_has_no_multimem(tmp_path):
    code = sass(fused_ptx("p2p"), tmp_path)
    assert count(code, r"\bLDGMC\b") == 0 and count(code, r"\bLDG\.E\.128\.STRONG\.SYS\b") > 0
