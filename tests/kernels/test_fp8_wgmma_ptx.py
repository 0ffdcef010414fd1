"""The FP8 warpgroup kernel compiles for sm_90a and `ptxas` assembles it: four native e4m3
`wgmma.mma_async` a step at the build's width (A from registers: ptxas lowers them to QGMMA
with register sources), the tokens staged with `cp.async` (in groups, one a step) and
handed to the tensor cores through `fence.proxy.async`, weights streamed in 16-byte no-L1
loads, per-thread state in registers (no `.local` in the PTX). No GPU needed (cc is always passed). The simulator runs
the same source against a model of wgmma (test_fp8_wgmma_sim.py).

Registers: at most 128 a thread (two CTAs of 256 threads an SM). Widths up to 40 tokens fit
without spills; from 48 ptxas spills 100-260 bytes, all outside the loop over the steps
(accumulators held across the split-K epilogue; checked in the SASS with nvdisasm when the
kernel was written), so the test asks no spills only up to 40."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX is not compiled under the CUDA simulator", allow_module_level=True)

from weavelm.kernels import fp8_wgmma as F  # noqa: E402
from weavelm.kernels.launcher import Kernel  # noqa: E402

PTXAS = shutil.which("ptxas")


def kernel_ptx(dt: str, n8: int, pdl: bool = False, ahead: int = 1) -> str:
    return Kernel("t", lambda: F._build_kernel(dt, n8, pdl, ahead), F.SIGNATURE,
                  max_threads=F.THREADS, min_blocks=F.CTAS_PER_SM).ptx()


@pytest.mark.parametrize("dt,n8,ahead", [("bf16", 1, 1), ("f16", 3, 1), ("bf16", 5, 1),
                                         ("bf16", 8, 1), ("bf16", 4, 2)])
def test_fp8_wgmma_kernel_ptx(dt, n8, ahead, tmp_path):
    """Four products a step, the loop unrolled over the ring of ahead + 1 steps."""
    ptx = kernel_ptx(dt, n8, ahead=ahead)
    n = 8 * n8
    assert ptx.count(f"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3") == 4 * (ahead + 1)
    # each call's first product starts fresh (scale-d false): sums promoted every 128 of K
    assert len(re.findall(r"e4m3\.e4m3 \{[^}]*\}, \{[^}]*\}, %rd\d+, z, 1, 1;", ptx)) == ahead + 1
    for ins in ("wgmma.fence.sync.aligned", "wgmma.commit_group.sync.aligned",
                "wgmma.wait_group.sync.aligned 0", "cp.async.ca.shared.global",
                "cp.async.commit_group", f"cp.async.wait_group {ahead - 1}",
                "fence.proxy.async.shared::cta", "cvta.to.shared.u64",
                "ld.global.nc.L1::no_allocate.v4.u32", "atom.acq_rel.sys", "shfl.sync.bfly"):
        assert ins in ptx, ins
    assert ".local" not in ptx
    if PTXAS:
        src = tmp_path / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([PTXAS, "-v", "-arch=sm_90a", str(src), "-o", str(tmp_path / "k.cubin")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        regs = int(r.stderr.split("Used ")[1].split(" registers")[0])
        assert regs <= 128, regs
        if n <= 40:
            assert " 0 bytes spill stores" in r.stderr, r.stderr
        # wgmma is an sm_90a feature: plain sm_90 refuses it (ptxas really checks)
        bad = tmp_path / "k90.ptx"
        bad.write_text(ptx.replace(".target sm_90a", ".target sm_90"))
        r90 = subprocess.run([PTXAS, "-arch=sm_90", str(bad), "-o", str(tmp_path / "k90.cubin")],
                             capture_output=True, text=True, timeout=120)
        assert r90.returncode != 0
