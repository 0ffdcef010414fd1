"""Plain-Python models of the PTX primitives (`ptx.py`), what the CUDA simulator runs in their
place: memory primitives read and write host memory at the address (the simulator's "device"
memory is host memory), conversions are bit-exact with numpy or torch.
"""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

# Host memory at a raw address; a lock makes the atomics atomic across the simulator's threads.

_SIM_ATOMIC = threading.Lock()


def _u32s(addr, n):
    return (ctypes.c_uint32 * n).from_address(int(addr))


def _sim_ld_v4(addr):
    w = _u32s(addr, 4)
    return (np.uint32(w[0]), np.uint32(w[1]), np.uint32(w[2]), np.uint32(w[3]))


def _sim_ld_v2(addr):
    w = _u32s(addr, 2)
    return (np.uint32(w[0]), np.uint32(w[1]))


def _sim_st_v4(addr, a, b, c, d):
    _u32s(addr, 4)[:] = [int(a) & 0xFFFFFFFF, int(b) & 0xFFFFFFFF,
                         int(c) & 0xFFFFFFFF, int(d) & 0xFFFFFFFF]


def _sim_ld_u32(addr):
    return np.uint32(_u32s(addr, 1)[0])


def _sim_st_u32(addr, v):
    _u32s(addr, 1)[0] = int(v) & 0xFFFFFFFF


def _sim_ld_u64(addr):
    return np.uint64((ctypes.c_uint64 * 1).from_address(int(addr))[0])


def _sim_atom_add(addr, v):
    with _SIM_ATOMIC:
        old = _u32s(addr, 1)[0]
        _u32s(addr, 1)[0] = (old + int(v)) & 0xFFFFFFFF
    return np.uint32(old)


def _sim_atom_cas(addr, cmp, new):
    with _SIM_ATOMIC:
        old = _u32s(addr, 1)[0]
        if old == int(cmp) & 0xFFFFFFFF:
            _u32s(addr, 1)[0] = int(new) & 0xFFFFFFFF
    return np.uint32(old)


def _sim_red_add(addr, v):
    _sim_atom_add(addr, v)


def _sim_fence():
    pass  # the simulator's threads share one coherent memory


def _sim_globaltimer():
    return np.uint64(time.monotonic_ns())


def _f32_bits(x) -> int:
    return int(np.float32(x).view(np.uint32))


def _sim_f32_as_u32(x):
    return np.uint32(_f32_bits(x))


def _bits_f32(u) -> np.float32:
    return np.uint32(int(u) & 0xFFFFFFFF).view(np.float32)


def _sim_pack_bf16x2(lo, hi):
    def rne(x):  # float32 -> bf16 bits, round to nearest even; NaN -> canonical 0x7FFF
        u = _f32_bits(x)
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return 0x7FFF
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return np.uint32(rne(lo) | (rne(hi) << 16))


def _sim_unpack_bf16x2(w):
    w = int(w)
    return _bits_f32((w & 0xFFFF) << 16), _bits_f32(w & 0xFFFF0000)


def _sim_pack_f16x2(lo, hi):
    h = np.array([lo, hi], dtype=np.float32).astype(np.float16).view(np.uint16)  # RNE
    return np.uint32(int(h[0]) | (int(h[1]) << 16))


def _sim_unpack_f16x2(w):
    w = int(w)
    h = np.array([w & 0xFFFF, w >> 16], dtype=np.uint16).view(np.float16).astype(np.float32)
    return h[0], h[1]


def _sim_pack_e4m3x4(a, b, c, d):
    import torch
    t = torch.tensor([float(a), float(b), float(c), float(d)], dtype=torch.float32)
    u = t.clamp(-448.0, 448.0).where(~t.isnan(), t).to(torch.float8_e4m3fn).view(torch.uint8)
    return np.uint32(sum(int(u[i]) << (8 * i) for i in range(4)))


def _sim_unpack_e4m3x4(w):
    import torch
    w = int(w)
    u = torch.tensor([(w >> (8 * i)) & 0xFF for i in range(4)], dtype=torch.uint8)
    f = u.view(torch.float8_e4m3fn).float().tolist()
    return np.float32(f[0]), np.float32(f[1]), np.float32(f[2]), np.float32(f[3])


_E4M3 = None  # the 256 e4m3 values, float32, by code


def _e4m3_table():
    global _E4M3
    if _E4M3 is None:
        import torch
        _E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    return _E4M3


def _sim_e4m3x4_to_f16x2(w):
    v = _e4m3_table()[np.array([int(w)], dtype=np.uint32).view(np.uint8)]   # 4 values, exact
    h = v.astype(np.float16).view(np.uint16).astype(np.uint32)              # in f16
    return np.uint32(h[0] | (h[1] << 16)), np.uint32(h[2] | (h[3] << 16))


def _sim_low_halves(a, b):
    return np.uint32((int(a) & 0xFFFF) | ((int(b) & 0xFFFF) << 16))


def _sim_high_halves(a, b):
    return np.uint32((int(a) >> 16) | (int(b) & 0xFFFF0000))


def _sim_warp_mma(frag, cd, w0, bf16=False):
    """One warp's `mma.sync.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32`, modelled from the
    PTX ISA's fragment layout: frag holds each lane's a0-a3, b0, b1 (6 words a thread, from
    thread w0), cd its c0-c3 (4 floats a thread), replaced by d. Lane 4g + q holds A rows g
    (a0, a2) and g + 8 (a1, a3) at k = 2q, 2q + 1 (a0, a1) and 8 + 2q, 9 + 2q (a2, a3), B column
    g at the same k in b0, b1, and D rows g, g + 8 at columns 2q, 2q + 1."""
    words = np.asarray(frag[w0 * 6:(w0 + 32) * 6], dtype=np.uint32).reshape(8, 4, 6)  # [g, q]
    if bf16:                                                 # bf16: the top half of an f32
        halves = words.view(np.uint16).astype(np.uint32) << 16
        vals = halves.view(np.float32).reshape(8, 4, 6, 2)
    else:
        vals = words.view(np.float16).reshape(8, 4, 6, 2).astype(np.float32)  # [g, q, reg, half]
    a = np.empty((16, 16), np.float32)
    b = np.empty((16, 8), np.float32)
    for q in range(4):
        a[0:8, 2 * q:2 * q + 2] = vals[:, q, 0]
        a[8:16, 2 * q:2 * q + 2] = vals[:, q, 1]
        a[0:8, 8 + 2 * q:10 + 2 * q] = vals[:, q, 2]
        a[8:16, 8 + 2 * q:10 + 2 * q] = vals[:, q, 3]
        b[2 * q:2 * q + 2, :] = vals[:, q, 4].T
        b[8 + 2 * q:10 + 2 * q, :] = vals[:, q, 5].T
    c = np.asarray(cd[w0 * 4:(w0 + 32) * 4], dtype=np.float32).reshape(8, 4, 4)
    d = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    out = np.empty((8, 4, 4), np.float32)
    for q in range(4):
        out[:, q, 0] = c[:, q, 0] + d[0:8, 2 * q]
        out[:, q, 1] = c[:, q, 1] + d[0:8, 2 * q + 1]
        out[:, q, 2] = c[:, q, 2] + d[8:16, 2 * q]
        out[:, q, 3] = c[:, q, 3] + d[8:16, 2 * q + 1]
    cd[w0 * 4:(w0 + 32) * 4] = out.reshape(-1)
