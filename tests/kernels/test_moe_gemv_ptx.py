"""The small-batch MoE GEMV kernels compile for sm_90a and `ptxas` assembles them without
spills: the weights stream in 16-byte `ld.global.nc.L1::no_allocate.v4` loads, all loads of a
step (2P x U rows x columns for gate/up, R x U for down) issued before the first FMA, per-thread
state in registers (no `.local`), warp sums by shuffles. No GPU needed (cc is always passed).
The simulator runs the same source (test_moe_gemv_sim.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX is not compiled under the CUDA simulator", allow_module_level=True)

from weavelm.kernels import moe_gemv as M  # noqa: E402
from weavelm.kernels import moe_gemv_kernels as MK  # noqa: E402
from weavelm.kernels.launcher import Kernel  # noqa: E402

PTXAS = shutil.which("ptxas")
STREAM = r"ld\.global\.nc\.L1::no_allocate\.v4\.u32"
CVT = {"bf16": None, "f16": "cvt.f32.f16", "f32": None}
# (kind, dtype, TMAX, L, P or R, U): the T = 1 plans of the decode benchmark, a larger TMAX
# class of each kernel, narrow row slots, fp16 / fp32.
VARIANTS = [("gate_up", "bf16", 1, 32, *M.GATE_UP[1]), ("down", "bf16", 1, 32, *M.DOWN[1]),
            ("gate_up", "bf16", 1, 32, 2, 2),
            ("gate_up", "f16", 4, 8, *M.GATE_UP[4]), ("down", "f32", 8, 16, *M.DOWN[8])]


def kernel_ptx(kind, dt, tmax, lanes, a, u) -> str:
    build = MK._build_gate_up if kind == "gate_up" else MK._build_down
    k = Kernel("t", lambda: build(dt, tmax, lanes, a, u),
               M.SIG_GATE_UP if kind == "gate_up" else M.SIG_DOWN, max_threads=32 * M.WARPS)
    return k.ptx()


def ptxas(ptx: str, tmp_path) -> str:
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.parametrize("kind,dt,tmax,lanes,a,u", VARIANTS)
def test_moe_gemv_kernel_ptx(kind, dt, tmax, lanes, a, u, tmp_path):
    ptx = kernel_ptx(kind, dt, tmax, lanes, a, u)
    assert ".target sm_90a" in ptx and f".maxntid {32 * M.WARPS}" in ptx
    per_step = (2 * a if kind == "gate_up" else a) * u          # weight loads per step
    assert len(re.findall(STREAM, ptx)) == per_step
    assert "shfl.sync.bfly.b32" in ptx
    if CVT[dt]:
        assert CVT[dt] in ptx
    if kind == "down" and dt != "f32":
        assert ("cvt.rn.bf16x2.f32" if dt == "bf16" else "cvt.rn.f16x2.f32") in ptx
    assert ".local" not in ptx, "per-thread state spilled to local memory"
    assert "call" not in ptx
    # every weight load of a step is issued before the step's first FMA
    first_load = re.search(STREAM, ptx).start()
    first_fma = re.search(r"fma\.rn\.f32", ptx[first_load:]).start() + first_load
    assert len(re.findall(STREAM, ptx[first_load:first_fma])) == per_step
    if PTXAS:
        info = ptxas(ptx, tmp_path)
        assert " 0 bytes spill stores" in info, info
        regs = int(re.search(r"Used (\d+) registers", info).group(1))
        if tmax == 1:   # the decode plan: at least 4 CTAs of 4 warps per SM (16 warps)
            assert regs <= 128, info
