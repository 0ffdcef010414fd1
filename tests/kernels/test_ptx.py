"""Every PTX primitive and every RMSNorm kernel compiles for sm_90a and `ptxas` assembles it.

No GPU needed: `numba.cuda.compile_ptx(..., cc=(9, 0, "a"))` (always pass cc: without it numba
queries a device) and the CUDA 13.0 `ptxas`. Negative cases prove ptxas really checks what we emit.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX is not compiled under the CUDA simulator", allow_module_level=True)

from numba import cuda, types  # noqa: E402

from weavelm.kernels import ptx as P  # noqa: E402
from weavelm.kernels import rmsnorm as R  # noqa: E402
from weavelm.kernels.launcher import Kernel  # noqa: E402

PTXAS = shutil.which("ptxas")
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason="ptxas not on PATH")


def assemble(ptx: str, arch: str, tmp_path) -> subprocess.CompletedProcess:
    """ptxas on `ptx` with -v: its stderr reports registers and spills (`no_spills`)."""
    src = tmp_path / f"k_{arch}.ptx"
    src.write_text(ptx)
    return subprocess.run([PTXAS, "-v", f"-arch={arch}", str(src), "-o",
                           str(tmp_path / "k.cubin")], capture_output=True, text=True,
                          timeout=120)


def no_spills(r: subprocess.CompletedProcess) -> bool:
    return "bytes spill" in r.stderr and " 0 bytes spill stores" in r.stderr


def primitives_kernel(a, b, n, x):
    """Uses every primitive once (nonsense data flow; it only has to compile)."""
    t0 = P.globaltimer_ns()
    w = P.load_v4_u32_nc(a)
    v = P.load_v4_u32(a + 16)
    lo, hi = P.unpack_bf16x2(w[0])
    f0, f1 = P.unpack_f16x2(w[1])
    P.store_v4_u32(b, P.pack_bf16x2(lo * x, hi), P.pack_f16x2(f0, f1), v[2],
                   P.f32_as_u32(P.u32_as_f32(w[3]) + x))
    u = P.load_v4_u32_volatile(b + 32)
    P.store_v4_u32_volatile(b + 64, u[0], u[1], u[2], u[3])
    P.store_u32(b + 96, P.load_u32(b + 100) + P.load_u32_volatile(b + 104))
    P.store_u32_volatile(b + 108, n)
    P.store_release_sys_u32(b + 112, 1)
    while P.load_acquire_sys_u32(b + 116) == 0:  # bounded spin, as barriers must be
        if P.globaltimer_ns() - t0 > 1000:
            break
    s = P.load_relaxed_sys_u32(b) + P.atomic_add_sys_u32(b, 1) + P.atomic_add_acq_rel_sys_u32(b, 2)
    s += P.atomic_cas_sys_u32(b, 0, 1) + P.atomic_cas_acq_rel_sys_u32(b, 1, 2)
    P.red_add_relaxed_sys_u32(b, s)
    P.fence_acq_rel_sys()
    r = P.multimem_ld_reduce_add_v4_bf16x2(a)
    f = P.multimem_ld_reduce_add_v4_f32(a + 16)
    P.multimem_st_v4_f32(b, r[0], r[1], f[2], f[3])
    P.multimem_red_add_u32(b, 1)
    e0, e1, e2, e3 = P.unpack_e4m3x4(w[2])
    P.store_u32(b + 120, P.pack_e4m3x4(e0 * x, e1, e2, e3))


def multimem_only_kernel(a):
    r = P.multimem_ld_reduce_add_v4_bf16x2(a)
    P.multimem_st_v4_f32(a, r[0], r[1], r[2], r[3])


PRIM_SIG = (types.uint64, types.uint64, types.int64, types.float32)
EXPECTED = [
    "ld.global.nc.v4.u32", "ld.global.v4.u32", "st.global.v4.u32", "ld.volatile.global.v4.u32",
    "st.volatile.global.v4.u32", "ld.global.u32", "st.global.u32", "st.release.sys.global.u32",
    "ld.acquire.sys.global.u32", "ld.relaxed.sys.global.u32", "atom.global.sys.add.u32",
    "atom.acq_rel.sys.global.add.u32", "atom.global.sys.cas.b32",
    "atom.acq_rel.sys.global.cas.b32", "red.relaxed.sys.global.add.u32", "fence.acq_rel.sys",
    "mov.u64 %rd", "%globaltimer", "cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32", "cvt.f32.f16",
    "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2",
    "multimem.ld_reduce.relaxed.sys.global.add.v4.f32", "multimem.st.relaxed.sys.global.v4.f32",
    "multimem.red.relaxed.sys.global.add.u32", "cvt.rn.satfinite.e4m3x2.f32",
    "cvt.rn.f16x2.e4m3x2",
]


@pytest.fixture(scope="module")
def primitives_ptx() -> str:
    ptx, _ = cuda.compile_ptx(primitives_kernel, PRIM_SIG, cc=(9, 0, "a"))
    return ptx


def test_primitives_emit_expected_instructions(primitives_ptx):
    assert ".target sm_90a" in primitives_ptx
    missing = [i for i in EXPECTED if i not in primitives_ptx]
    assert not missing, f"not in PTX: {missing}"
    assert "call" not in primitives_ptx  # no extern helpers: standalone PTX


def test_globaltimer_reads_are_not_merged(primitives_ptx):
    assert primitives_ptx.count("%globaltimer") >= 2  # side_effect=True keeps both reads


@needs_ptxas
def test_primitives_assemble_for_sm90a(primitives_ptx, tmp_path):
    r = assemble(primitives_ptx, "sm_90a", tmp_path)
    assert r.returncode == 0, r.stderr


@needs_ptxas
def test_ptxas_rejects_multimem_for_sm80(tmp_path):
    ptx, _ = cuda.compile_ptx(multimem_only_kernel, (types.uint64,), cc=(8, 0))
    r = assemble(ptx, "sm_80", tmp_path)
    assert r.returncode != 0 and "multimem" in r.stderr, r.stderr


@needs_ptxas
def test_ptxas_rejects_misspelled_type(tmp_path):
    bad = P._asm("bad_ld_reduce",
                 "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x3 "
                 "{$0, $1, $2, $3}, [$4];", ("u32",) * 4, ("u64",), memory=True)

    def k(a):
        r = bad(a)
        P.store_v4_u32(a, r[0], r[1], r[2], r[3])

    ptx, _ = cuda.compile_ptx(k, (types.uint64,), cc=(9, 0, "a"))
    assert ".bf16x3" in ptx
    r = assemble(ptx, "sm_90a", tmp_path)
    assert r.returncode != 0, "ptxas accepted .bf16x3"


def test_intrinsic_rejects_wrong_operand_types():
    def k(a, x):
        P.store_u32(a, x)  # float where a uint32 is expected

    with pytest.raises(Exception, match="(?i)store_u32|no match|typing"):
        cuda.compile_ptx(k, (types.uint64, types.float32), cc=(9, 0, "a"))


# Each (dtype, variant, shape class) the launcher may compile; vpt 8 once (compiles are ~3 s).
RMSNORM_VARIANTS = [(dt, res, 4) for dt in ("bf16", "f16", "f32") for res in (True, False)]
RMSNORM_VARIANTS.append(("bf16", True, 8))
CONVERSIONS = {"bf16": ["cvt.rn.bf16x2.f32"], "f16": ["cvt.rn.f16x2.f32", "cvt.f32.f16"],
               "f32": []}


@pytest.mark.parametrize("dt,has_residual,vpt", RMSNORM_VARIANTS)
def test_rmsnorm_kernel_ptx(dt, has_residual, vpt, tmp_path):
    k = Kernel("t", lambda: R._build_kernel(dt, has_residual, vpt), R.SIGNATURE,
               max_threads=R.MAX_BLOCK)
    ptx = k.ptx()
    for ins in ["ld.global.nc.v4.u32", "st.global.v4.u32", "shfl.sync.bfly.b32",
                ".maxntid 512", "prefetch.global.L2", *CONVERSIONS[dt]]:
        assert ins in ptx, ins
    assert ("ld.global.v4.u32" in ptx) == has_residual  # residual: coherent load
    assert ".local" not in ptx, "per-thread row buffer spilled to local memory"
    assert "call" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr
        assert no_spills(r), r.stderr              # (a weight held in registers spilled)


@pytest.mark.parametrize("dt,vpt", [("bf16", 4), ("f16", 8)])
def test_rmsnorm_rounded_kernel_ptx(dt, vpt, tmp_path):
    """The fused add + RMSNorm that rounds its output to FP8: e4m3 packs and 4-byte code
    stores where the plain one stores its 16-byte output rows, a second block reduction (the
    row maximum), the row in registers, no spills."""
    k = Kernel("t", lambda: R._build_kernel(dt, True, vpt, rounded=True), R.SIGNATURE,
               max_threads=R.MAX_BLOCK)
    ptx = k.ptx()
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "st.global.u32" in ptx
    assert ptx.count("bar.sync") >= 4 and ".local" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr
        assert no_spills(r), r.stderr


@pytest.mark.parametrize("dt,lanes,group,rows,pipeline,kv8", [
    ("bf16", 16, 4, 2, False, False), ("f32", 32, 2, 2, True, False),
    ("bf16", 16, 4, 4, True, False), ("bf16", 16, 4, 4, True, True)])
def test_paged_decode_kernel_ptx(dt, lanes, group, rows, pipeline, kv8, tmp_path):
    """The paged decode kernel compiles for real (the simulator runs it as Python, so a shape
    that is not a compile-time constant passes there and fails here) with its per-head state in
    registers, and assembles for sm_90a."""
    from weavelm.kernels import paged_attention as PA
    from weavelm.kernels import paged_attention_kernels as PK
    k = Kernel("t", lambda: PK._build_kernel(dt, lanes, group, rows, pipeline, kv8),
               PA.SIGNATURE,
               max_threads=32 * PK.WARPS, min_blocks=3)
    ptx = k.ptx()
    for ins in ["ld.global.nc.v4.u32", "shfl.sync.bfly.b32", "ex2.approx"]:
        assert ins in ptx, ins
    assert "ex2.approx.f32" in ptx and "lg2" not in ptx  # exponentials are one ex2 each
    assert ("ld.global.nc.v2.u32" in ptx and "cvt.rn.f16x2.e4m3x2" in ptx) == kv8
    assert ".local" not in ptx, "per-head softmax state spilled to local memory"
    assert ".minnctapersm 3" in ptx                  # the `resident` bound reaches ptxas
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("dt,D,group,kv8", [("bf16", 128, 4, False), ("bf16", 128, 8, False),
                                             ("f16", 64, 16, False), ("bf16", 128, 4, True),
                                             ("bf16", 64, 4, True)])
def test_paged_decode_mma_kernel_ptx(dt, D, group, kv8, tmp_path):
    """The tensor-core decode kernel compiles with its fragments, softmax state and output
    sums in registers (no local memory, no spills) at the CTAs an SM must hold (RESIDENT_MMA:
    <= 168 registers a thread at head dim 128), 2 x D / 16 + D / 8 mma's a step."""
    import re

    from weavelm.kernels import paged_attention_mma as PM
    ptx = Kernel("t", lambda: PM._build_mma_kernel(dt, D, group, kv8=kv8), PM.SIGNATURE,
                 max_threads=32 * PM.WARPS, min_blocks=PM.RESIDENT_MMA[D]).ptx()
    mdt = "f16" if kv8 else dt                      # an FP8 cache is converted to f16
    assert ptx.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{mdt}.{mdt}.f32") \
        == 2 * D // 16 + D // 8
    assert ("cvt.rn.f16x2.e4m3x2" in ptx) == kv8
    for ins in ["ld.global.nc.v4.u32", "shfl.sync.bfly.b32", "ex2.approx", "prmt.b32"]:
        assert ins in ptx, ins
    assert ".local" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr
        assert no_spills(r), r.stderr
        if D == 128:
            regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
            assert regs <= 168, regs


@pytest.mark.parametrize("dt,vpt,gated", [("bf16", 4, False), ("f32", 8, False),
                                          ("bf16", 8, True), ("f16", 4, True)])
def test_fp8_quant_kernel_ptx(dt, vpt, gated, tmp_path):
    """The FP8 row-quantization kernel (and its gated form, silu(gate) * up) compiles with its
    row in registers and assembles."""
    from weavelm.kernels import fp8_quant as Q
    ptx = Kernel("t", lambda: Q._build_kernel(dt, vpt, gated), Q.SIGNATURE,
                 max_threads=512).ptx()
    for ins in ["ld.global.nc.v4.u32", "cvt.rn.satfinite.e4m3x2.f32", "shfl.sync.bfly.b32"]:
        assert ins in ptx, ins
    assert ("ex2.approx" in ptx) == gated
    assert ".local" not in ptx and "call" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("dt,tmax,kw,form", [("bf16", 1, 1, 0), ("bf16", 4, 8, 0), ("f16", 2, 2, 0),
                                             ("bf16", 1, 2, 1), ("f16", 1, 4, 1),
                                             ("bf16", 1, 1, 2), ("f16", 1, 2, 2)])
def test_fp8_gemv_kernel_ptx(dt, tmax, kw, form, tmp_path):
    """The FP8 GEMV (plain, rounding its input, and gated: silu(gate) * up in its epilogue)
    compiles with its sums and vectors in registers and assembles without spills."""
    from weavelm.kernels import fp8_gemv as G
    ptx = Kernel("t", lambda: G._build_kernel(dt, tmax, kw, form), G.SIGNATURE,
                 max_threads=32 * G.WARPS).ptx()
    for ins in ["ld.global.nc.L1::no_allocate.v4.u32", "cvt.rn.f16x2.e4m3x2",
                "shfl.sync.bfly.b32"]:
        assert ins in ptx, ins
    assert ("ex2.approx" in ptx) == (form == G.GATED)          # the epilogue's exp
    assert ".local" not in ptx and "call" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr
        assert no_spills(r), r.stderr


@pytest.mark.parametrize("dt,tiles", [("bf16", 1), ("f16", 2), ("bf16", 3), ("bf16", 4)])
def test_fp8_mma_kernel_ptx(dt, tiles, tmp_path):
    """The FP8 tensor-core kernel issues its f16 mma's fully unrolled (four a step, a tile of
    16 tokens and a tile of 8 rows), its operands converted from e4m3, with its sums and
    weights in registers, and assembles without spills."""
    from weavelm.kernels import fp8_mma as F
    u = F.unroll(tiles)
    ptx = Kernel("t", lambda: F._build_kernel(dt, tiles, u), F.SIGNATURE,
                 max_threads=32 * F.WARPS).ptx()
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == \
        4 * tiles * F.ROW_TILES * u
    for ins in ("ld.global.nc.L1::no_allocate.v4.u32", "cvt.rn.f16x2.e4m3x2", "atom.acq_rel.sys"):
        assert ins in ptx, ins
    assert ".local" not in ptx and "call" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr
        assert no_spills(r), r.stderr


@pytest.mark.parametrize("dt", ["bf16", "f16"])
def test_fp8_round_spread_kernel_ptx(dt, tmp_path):
    from weavelm.kernels import fp8_quant as Q
    ptx = Kernel("t", lambda: Q._build_spread(dt), Q.SPREAD_SIGNATURE,
                 max_threads=Q.SPREAD_BLOCK).ptx()
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "shfl.sync.bfly.b32" in ptx
    assert ".local" not in ptx and "call" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kv8", [False, True])
def test_rope_cache_kernel_ptx(kv8, tmp_path):
    """The rope + cache kernel compiles, with FP8 cache writes where asked, and assembles."""
    from weavelm.kernels import rope_cache as RC
    ptx = Kernel("t", lambda: RC._build_kernel("bf16", kv8), RC.SIGNATURE,
                 max_threads=RC.MAX_THREADS).ptx()
    assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == kv8
    assert "call" not in ptx
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr


def _pdl_builds():
    from weavelm.kernels import activation as A
    from weavelm.kernels import fp8_gemv as G
    from weavelm.kernels import fp8_mma as F
    from weavelm.kernels import fp8_quant as Q
    from weavelm.kernels import fp8_wgmma as W
    from weavelm.kernels import paged_attention as PA
    from weavelm.kernels import paged_attention_kernels as PK
    from weavelm.kernels import paged_attention_mma as PM
    from weavelm.kernels import paged_attention_worklist as WL
    from weavelm.kernels import rope_cache as RC
    return {
        "rmsnorm": (lambda p: R._build_kernel("bf16", True, 4, p), R.SIGNATURE, 512),
        "fp8_gemv": (lambda p: G._build_kernel("bf16", 1, 2, G.GATED, p), G.SIGNATURE, 256),
        "fp8_mma": (lambda p: F._build_kernel("bf16", 2, F.unroll(2), p), F.SIGNATURE,
                    32 * F.WARPS),
        "fp8_wgmma": (lambda p: W._build_kernel("bf16", 4, p), W.SIGNATURE, W.THREADS),
        "fp8_quant": (lambda p: Q._build_kernel("bf16", 4, True, p), Q.SIGNATURE, 512),
        "round_spread": (lambda p: Q._build_spread("bf16", p), Q.SPREAD_SIGNATURE, 128),
        "rope_cache": (lambda p: RC._build_kernel("bf16", False, p), RC.SIGNATURE,
                       RC.MAX_THREADS),
        "silu_mul": (lambda p: A._build_kernel("bf16", p), A.SIGNATURE, A.THREADS),
        "paged_decode": (lambda p: PK._build_kernel("bf16", 16, 4, 4, True, False, p),
                         PA.SIGNATURE, 32 * PK.WARPS),
        "paged_combine": (lambda p: PK._build_combine("bf16", 16, p), PA.COMBINE_SIGNATURE, 32),
        "paged_decode_mma": (lambda p: PM._build_mma_kernel("bf16", 128, 4, p), PM.SIGNATURE,
                             32 * PM.WARPS),
        "paged_decode_mma_early": (lambda p: PM._build_mma_kernel("bf16", 128, 4, p, early=True),
                                   PM.SIGNATURE, 32 * PM.WARPS),
        "paged_mma_combine": (lambda p: WL._build_mma_combine("bf16", 128, 4, p),
                              WL.COMBINE_SIGNATURE, 32),
    }


# Kernels that read the lengths before the wait: the combine of the lane kernel (its main
# kernel never writes them) and the tensor-core kernel's early plan (`lens_staged`).
EARLY_READS = ("paged_combine", "paged_decode_mma_early")


@pytest.mark.parametrize("name", list(_pdl_builds()))
def test_kernels_built_for_programmatic_dependent_launch(name, tmp_path):
    """Built for PDL, a decode-path kernel waits for the kernel before it and then lets the
    next one start (in that order, before its first write, and before its first read but for
    the kernels that read the step's lengths early: EARLY_READS); built plainly it does
    neither."""
    build, sig, threads = _pdl_builds()[name]
    plain = Kernel(f"t_{name}", lambda: build(False), sig, max_threads=threads).ptx()
    ptx = Kernel(f"t_{name}_pdl", lambda: build(True), sig, max_threads=threads).ptx()
    assert "griddepcontrol" not in plain
    wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    assert 0 < wait < launch, (wait, launch)
    before = ptx[:wait]                          # no memory access of the kernel's own before it
    for op in ("st.global", "atom.", "red.") + (() if name in EARLY_READS else ("ld.global",)):
        assert not re.search(r"(?<![\w.])" + re.escape(op), before), op   # (not "shared.")
    if name in EARLY_READS:
        assert "ld.global" in before
    if name in ("fp8_gemv", "fp8_mma", "fp8_wgmma"):  # first weights asked of L2 before it
        assert "prefetch.global.L2" in before and "prefetch" not in plain
    if PTXAS:
        r = assemble(ptx, "sm_90a", tmp_path)
        assert r.returncode == 0, r.stderr


def test_pdl_only_when_asked_for_on_hopper(monkeypatch):
    """Programmatic dependent launch is on by default on compute capability 9.0+ with a driver
    whose graphs keep it, off with WEAVELM_PDL=0; when on, the launch configuration asks
    for it."""
    import torch

    from weavelm.kernels import launcher as L
    cfg = pytest.importorskip("cuda.core").LaunchConfig
    if "programmatic_stream_serialization" not in (cfg.__doc__ or ""):
        pytest.skip("this cuda.core has no programmatic dependent launch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(L, "driver_version", lambda: 13000)
    monkeypatch.setenv("WEAVELM_PDL", "0")
    monkeypatch.setattr(L, "_pdl", {})
    assert not L.pdl_enabled(0)
    monkeypatch.delenv("WEAVELM_PDL", raising=False)
    monkeypatch.setattr(L, "_pdl", {})
    assert L.pdl_enabled(0)
    assert L._config(4, 64, True).programmatic_stream_serialization
    assert not L._config(4, 64).programmatic_stream_serialization
    monkeypatch.setattr(L, "driver_version", lambda: 12020)      # graphs would refuse it
    monkeypatch.setattr(L, "_pdl", {})
    assert not L.pdl_enabled(0)
    monkeypatch.setattr(L, "driver_version", lambda: 12080)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(L, "_pdl", {})
    assert not L.pdl_enabled(0)
