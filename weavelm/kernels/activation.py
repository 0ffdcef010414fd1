"""SiLU-and-multiply, the gated MLP's activation: out = silu(gate) * up for x = [gate | up].

T = tokens, I = intermediate size (this rank's share), E = elements per 16-byte vector.

    out = silu_and_mul(x)          # x [T, 2I] -> [T, I]

fp32 math, rounded once. One kernel instead of torch's two (silu, then the product), each of
which is a few microseconds of a decode step's per-layer budget.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from weavelm.kernels.common import DTYPES, ELEMS, remember

THREADS = 256


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.dtype in DTYPES and x.is_contiguous() and x.dim() == 2 \
            and x.shape[1] % (2 * ELEMS[DTYPES[x.dtype]]) == 0:
        return silu_and_mul_cuda(x)
    return silu_and_mul_ref(x)


SIGNATURE = "void(uint64, uint64, int64, int64)"
_plans: dict = {}


def silu_and_mul_cuda(x: torch.Tensor) -> torch.Tensor:
    T, two_i = x.shape
    out = torch.empty(T, two_i // 2, dtype=x.dtype, device=x.device)
    vecs = out.numel() // ELEMS[DTYPES[x.dtype]]
    if vecs:
        dev = max(x.get_device(), 0)
        key = (DTYPES[x.dtype], dev)
        k = _plans.get(key)
        if k is None:
            from weavelm.kernels import launcher
            pdl = launcher.pdl_enabled(dev)
            k = remember(_plans, key, launcher.kernel(
                ("silu_mul", key[0]), lambda: _build_kernel(key[0], pdl), SIGNATURE,
                max_threads=THREADS, pdl=pdl))
        grid = min(-(-vecs // THREADS), 4096)
        k.launch(grid, THREADS, dev, x.data_ptr(), out.data_ptr(), vecs,
                 two_i // 2 // ELEMS[DTYPES[x.dtype]])
    return out


cuda = None  # numba.cuda, bound by _build_kernel: a module global, so the simulator can swap it


def _build_kernel(dt: str, pdl: bool = False):
    """Grid-stride over the output's 16-byte vectors; vector v of row r reads vector v of the
    row's gate half and of its up half."""
    global cuda
    import math

    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, pdl_entry

    cuda = numba_cuda()
    enter = pdl_entry(pdl)
    unpack, pack, E = codec(dt)
    load_nc, store = ptx.load_v4_u32_nc, ptx.store_v4_u32

    def silu_mul_kernel(x_ptr, out_ptr, n_vecs, row_vecs):
        enter()
        g = cuda.local.array(8, float32)
        u = cuda.local.array(8, float32)
        v = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while v < n_vecs:
            row = v // row_vecs
            col = v % row_vecs
            src = x_ptr + (row * 2 * row_vecs + col) * 16
            unpack(load_nc(src), g)
            unpack(load_nc(src + row_vecs * 16), u)
            for e in range(E):
                g[e] = g[e] / (float32(1.0) + math.exp(-g[e])) * u[e]
            w = pack(g)
            store(out_ptr + v * 16, w[0], w[1], w[2], w[3])
            v += cuda.gridDim.x * cuda.blockDim.x

    silu_mul_kernel.__name__ = f"silu_mul_{dt}"
    return silu_mul_kernel
