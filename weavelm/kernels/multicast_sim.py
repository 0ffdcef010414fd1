"""An emulated CUDA multicast object for the CUDA simulator, and models of the multimem
instructions on it.

N = ranks (members of the multicast group), E = elements per 16-byte vector.

A real multicast object (cuMulticastCreate + cuMulticastBindMem) maps one virtual address range
onto the same offset of every member's buffer; the NVLink switch performs `multimem.*` on that
range. Here a multicast address is modelled as (group table, offset): `MulticastGroup` holds the
table of every member's buffer base address (host memory under the simulator) and hands out an
address window that no host pointer can fall in; the models decode an address into (group,
offset) and act on every member at base + offset. Nothing here touches a GPU or a driver.

The models follow the PTX ISA (8.1 and later, sm_90), "Data Movement and Conversion
Instructions: multimem.ld_reduce, multimem.st, multimem.red":
* `multimem.ld_reduce.add` loads the value at the address from every memory location the
  multicast address points to and returns their sum. With `.acc::f32` (our bf16x2 / f16x2
  forms) the sum is accumulated in f32 and returned in the instruction's type: the model sums
  in f32 in group-table order and rounds once to nearest even (ptxas lowers our instructions to
  `LDGMC.E.F32ADD.BF16x8.RN` / `.F16x8.RN` / `LDGMC.E.ADD.F32x4.RN`: f32 adds, round to
  nearest). The ISA does not fix the order in which the switch adds the members: real hardware
  may differ from the model in the last bit of an f32 sum. `.v4` of a 32-bit type is one
  16-byte vector: 8 bf16 / 8 f16 / 4 f32 lanes, reduced lane by lane.
* `multimem.st` stores the operand to every memory location the address points to.
* `multimem.red.add` adds the operand atomically to every memory location (u32: modulo 2^32).
An address that is not in a group's window, outside it, or not aligned to the access size has
undefined behaviour in the ISA; the models raise ValueError, so a kernel that indexes wrongly
fails loudly instead of reading host memory at random.

`fault` makes a group misbehave on purpose ("drop_last": ld_reduce leaves out the last member's
contribution), so the multimem communicator's first-use self-check can be shown to catch a
broken multicast transport.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

# Multicast windows start at 2^62 + 2^61: above every user-space address of x86-64 and aarch64
# (at most 2^48), below 2^63 (so an address survives int64 arithmetic in a kernel).
WINDOW_BASE = 0x6000_0000_0000_0000
WINDOW_SPAN = 1 << 40            # bytes of one group's window (buffer sizes stay far below)
FAULTS = (None, "drop_last")

_groups: dict[int, "MulticastGroup"] = {}
_next_index = [0]
_RED_LOCK = threading.Lock()     # makes multimem.red atomic across the simulator's threads


class MulticastGroup:
    """One emulated multicast object over the members' buffers.

    bases: every member's buffer base address, in rank order (the group table); size: bytes
    mapped from each base (accesses past it raise); `address`: the multicast address of byte 0
    (what `Peers.mc` holds).
    """

    def __init__(self, bases, size: int, fault: str | None = None):
        if fault not in FAULTS:
            raise ValueError(f"unknown multicast fault {fault!r}: one of {FAULTS}")
        if not 0 < size <= WINDOW_SPAN:
            raise ValueError(f"multicast size {size} outside 1..{WINDOW_SPAN}")
        self.bases, self.size, self.fault = [int(b) for b in bases], int(size), fault
        self.index = _next_index[0]
        _next_index[0] += 1
        self.address = WINDOW_BASE + self.index * WINDOW_SPAN
        _groups[self.index] = self

    def close(self) -> None:
        """Unmap: later accesses through this group's window raise."""
        _groups.pop(self.index, None)


def resolve(addr, nbytes: int) -> tuple[MulticastGroup, int]:
    """(group, byte offset) of the multicast address `addr` for an access of `nbytes`."""
    a = int(addr)
    index, off = divmod(a - WINDOW_BASE, WINDOW_SPAN)
    group = _groups.get(index) if a >= WINDOW_BASE else None
    if group is None:
        raise ValueError(f"multimem on {a:#x}: not a multicast address (undefined behaviour)")
    if off % nbytes or off + nbytes > group.size:
        raise ValueError(f"multimem access of {nbytes} bytes at offset {off} of a multicast "
                         f"object of {group.size} bytes: misaligned or out of range")
    return group, off


def _words(addr: int, n: int):
    return (ctypes.c_uint32 * n).from_address(addr)


# ----------------------------------------------------------------------------- lane codecs
# Independent of ptx.py's conversion models: numpy on whole vectors.

def _lanes(words: np.ndarray, elem: str) -> np.ndarray:
    """4 u32 words -> f32 lanes (8 for bf16x2 / f16x2, 4 for f32; lowest address first)."""
    if elem == "f32":
        return words.view(np.float32).copy()
    halves = words.view(np.uint16)
    if elem == "bf16x2":
        return (halves.astype(np.uint32) << 16).view(np.float32)
    return halves.view(np.float16).astype(np.float32)


def _pack(acc: np.ndarray, elem: str) -> np.ndarray:
    """f32 lanes -> 4 u32 words of the element type, rounded to nearest even."""
    if elem == "f32":
        return acc.astype(np.float32).view(np.uint32)
    if elem == "f16x2":
        return acc.astype(np.float16).view(np.uint32)
    u = acc.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded[nan] = 0x7FFF  # canonical NaN, as cvt.rn.bf16x2.f32
    return rounded.view(np.uint32)


# ----------------------------------------------------------------------------- models

def ld_reduce_add_v4(addr, elem: str):
    """multimem.ld_reduce.add{.acc::f32}.v4.<elem>: the 16-byte vector at `addr` summed over
    every member (f32 accumulation in group-table order, one rounding) as 4 u32 words."""
    group, off = resolve(addr, 16)
    members = group.bases[:-1] if group.fault == "drop_last" and len(group.bases) > 1 \
        else group.bases
    acc = None
    for base in members:
        lanes = _lanes(np.frombuffer(_words(base + off, 4), dtype=np.uint32), elem)
        acc = lanes if acc is None else (acc + lanes).astype(np.float32)
    w = _pack(acc, elem)
    return (np.uint32(w[0]), np.uint32(w[1]), np.uint32(w[2]), np.uint32(w[3]))


def ld_reduce_add_v4_bf16x2(addr):
    return ld_reduce_add_v4(addr, "bf16x2")


def ld_reduce_add_v4_f16x2(addr):
    return ld_reduce_add_v4(addr, "f16x2")


def ld_reduce_add_v4_f32(addr):
    return ld_reduce_add_v4(addr, "f32")


def st_v4(addr, a, b, c, d):
    """multimem.st.v4 (any 32-bit lane type: the bits are stored as they are)."""
    group, off = resolve(addr, 16)
    vals = [int(a) & 0xFFFFFFFF, int(b) & 0xFFFFFFFF, int(c) & 0xFFFFFFFF, int(d) & 0xFFFFFFFF]
    for base in group.bases:
        _words(base + off, 4)[:] = vals


def red_add_u32(addr, v):
    """multimem.red.add.u32: atomically add v to the word on every member (modulo 2^32)."""
    group, off = resolve(addr, 4)
    with _RED_LOCK:
        for base in group.bases:
            w = _words(base + off, 1)
            w[0] = (w[0] + int(v)) & 0xFFFFFFFF
