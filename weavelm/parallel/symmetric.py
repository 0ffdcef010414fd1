"""Symmetric buffers: the one adapter over PyTorch SymmetricMemory.

T = tokens, D = hidden size, N = ranks.

A symmetric buffer is one allocation per rank, the same size on every rank, that every peer can
read and write through its own mapping. weavelm's communication kernels take from it only plain
numbers (`Peers`): the device table of the N buffer base addresses, this rank's base, the offset
of the signal area, and - only with the multimem transport - the multicast base address.

Layout of each rank's buffer: [data region | signal area (allreduce_norm_layout.SIG_BYTES)].
`view(T, D, dtype)` is this rank's data region as a [T, D] tensor, so a GEMM can write its
output straight into it (`torch.matmul(a, b, out=buf.view(T, D, dtype))`).

PyTorch API used, present in torch 2.9 through 2.13 (`torch.distributed._symmetric_memory`):
`empty(size, dtype=, device=)`, `rendezvous(tensor, group_name)` -> handle with `rank`,
`world_size`, `buffer_ptrs`, `buffer_size`, `multicast_ptr`, `signal_pad_ptrs`.
Only this module imports it.

Multicast safety (docs/architecture.md, "Why multicast is guarded"): unless the caller asks for
multicast *and* `multicast_allowed` says yes, `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` (and
`NVSHMEM_DISABLE_NVLS=1`) is set before the first allocation, so torch itself cannot create a
multicast object, and `multicast_ptr` is never read. A buffer that asks for multicast when it is not allowed is refused (WeavelmError).
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from weavelm.errors import WeavelmError
from weavelm.kernels.allreduce_norm import Peers
from weavelm.kernels.allreduce_norm_layout import SIG_BYTES
from weavelm.parallel.multicast_guard import multicast_allowed

log = logging.getLogger("weavelm")

_ALIGN = 256  # data region rounded up so the signal area stays cache-line aligned


def _symm_module():
    """torch.distributed._symmetric_memory (a separate function so tests can replace it)."""
    import torch.distributed._symmetric_memory as symm
    return symm


def forbid_multicast_in_torch(reason: str) -> None:
    """Make torch's SymmetricMemory (and NVSHMEM) unable to create multicast objects."""
    if os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") != "1":
        log.info("weavelm: setting TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (%s)", reason)
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


class SymmetricBuffer:
    """This rank's symmetric buffer and the addresses of every rank's copy of it.

    Attributes: `tensor` (this rank's bytes, uint8 [nbytes]), `data_bytes`, `sig_off`,
    `buffer_ptrs` (list of N base addresses, this buffer's byte 0 on every rank), `ptr_table`
    (the same as a CUDA int64 [N] tensor), `signal_pad_ptrs` (torch's own pads; unused by our
    kernels), `multicast_ptr` (0 unless multicast was asked for and allowed), `rank`,
    `world_size`, `device`.
    """

    def __init__(self, tensor, data_bytes, buffer_ptrs, signal_pad_ptrs, multicast_ptr, rank,
                 world_size, handle=None, alloc_off=0):
        self.tensor, self.data_bytes, self.sig_off = tensor, data_bytes, data_bytes
        self.alloc_off = alloc_off  # byte 0 of this buffer inside torch's allocation
        self.buffer_ptrs, self.signal_pad_ptrs = list(buffer_ptrs), list(signal_pad_ptrs)
        self.multicast_ptr, self.rank, self.world_size = multicast_ptr, rank, world_size
        self.device = tensor.device
        self.handle = handle  # keeps torch's mappings alive as long as this buffer
        self.ptr_table = torch.tensor(self.buffer_ptrs, dtype=torch.int64, device=self.device)
        self.base = tensor.data_ptr()
        # host-mapped error word the kernels copy their first timeout into (read without a sync)
        pin = tensor.device.type == "cuda"
        self.err_host = torch.zeros(4, dtype=torch.int32, pin_memory=pin)
        self.err_host_ptr = _device_address(self.err_host) if pin else self.err_host.data_ptr()

    # -- views --------------------------------------------------------------------------
    def view(self, n_rows: int, hidden: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """This rank's data region from byte `offset` as a [n_rows, hidden] tensor (a view)."""
        nbytes = n_rows * hidden * dtype.itemsize
        if offset % 16 or offset < 0 or offset + nbytes > self.data_bytes:
            raise WeavelmError(f"symmetric buffer: [{n_rows}, {hidden}] {dtype} at byte {offset} "
                               f"does not fit its {self.data_bytes} data bytes (16-byte aligned); "
                               "reserve a larger buffer")
        return self.tensor[offset: offset + nbytes].view(dtype).view(n_rows, hidden)

    def peer_view(self, peer: int, n_rows: int, hidden: int, dtype: torch.dtype,
                  offset: int = 0) -> torch.Tensor:
        """Rank `peer`'s data region from byte `offset` as a [n_rows, hidden] tensor on this
        device (writes go over NVLink; a `copy_` into it runs on the copy engines)."""
        self.view(n_rows, hidden, dtype, offset)          # same bounds on every rank
        if peer == self.rank:
            return self.view(n_rows, hidden, dtype, offset)
        start = self.alloc_off + offset
        if self.handle is None or start % dtype.itemsize:
            raise WeavelmError(f"symmetric buffer: no view of rank {peer}'s buffer at byte "
                               f"{offset}")
        return self.handle.get_buffer(peer, (n_rows, hidden), dtype, start // dtype.itemsize)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Byte offset of contiguous `t` inside the data region, or None if it is not there."""
        if t.device != self.device or not t.is_contiguous():
            return None
        off = t.data_ptr() - self.base
        if 0 <= off and off + t.numel() * t.element_size() <= self.data_bytes and off % 16 == 0:
            return off
        return None

    def signal_area(self) -> torch.Tensor:
        """This rank's signal area as int32 words (slots, epochs, error word)."""
        return self.tensor[self.sig_off: self.sig_off + SIG_BYTES].view(torch.int32)

    def zero_signals(self) -> None:
        """Zero this rank's signal area and host error word. Collective in effect: every rank
        must do it, then synchronize and barrier, before any kernel runs again."""
        self.signal_area().zero_()
        self.err_host.zero_()

    def peers(self) -> Peers:
        return Peers(tab=self.ptr_table.data_ptr(), my_base=self.base, mc=self.multicast_ptr,
                     rank=self.rank, world=self.world_size, sig_off=self.sig_off,
                     err_host=self.err_host_ptr,
                     device=self.device.index if self.device.type == "cuda" else 0)


def _device_address(pinned: torch.Tensor) -> int:
    """The device address of pinned host memory (0 if it is not mapped: kernels then skip the
    host copy of their error word and the host reads the device word after a sync)."""
    try:
        from cuda.bindings import runtime as rt
        err, dptr = rt.cudaHostGetDevicePointer(pinned.data_ptr(), 0)
        if err == rt.cudaError_t.cudaSuccess:
            return int(dptr)
    except Exception as e:  # noqa: BLE001 - optional convenience, never fatal
        log.debug("no device address for the host error word: %s", e)
    return 0


def allocate(data_bytes: int, device: torch.device, group=None, world_size: int = 1,
             rank: int = 0, *, multicast: bool = False) -> SymmetricBuffer:
    """Allocate and rendezvous a symmetric buffer of `data_bytes` + the signal area (collective:
    every rank of `group` calls it with the same size). Refuses to run on anything but CUDA.

    multicast=True also maps the multicast address (only if `multicast_allowed`)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise WeavelmError("symmetric buffers need CUDA GPUs (device is "
                           f"{device}); on CPU use the 'torch' communicator backend")
    index = device.index if device.index is not None else torch.cuda.current_device()
    allowed, reason = multicast_allowed(index)
    if multicast and not allowed:
        raise WeavelmError(f"multicast was asked for but is not allowed: {reason}")
    if not multicast:
        forbid_multicast_in_torch("no multicast asked for" if allowed else reason)
    data_bytes = -(-int(data_bytes) // _ALIGN) * _ALIGN
    nbytes = data_bytes + SIG_BYTES
    device = torch.device("cuda", index)

    if world_size == 1:  # nothing to map: a plain allocation is "symmetric" with itself
        t = torch.empty(nbytes, dtype=torch.uint8, device=device)
        buf = SymmetricBuffer(t, data_bytes, [t.data_ptr()], [], 0, 0, 1)
        buf.zero_signals()
        return buf

    symm = _symm_module()
    t = symm.empty(nbytes, dtype=torch.uint8, device=device)
    group_name = group if isinstance(group, str) else group.group_name
    try:
        hdl = symm.rendezvous(t, group_name)
    except RuntimeError:
        # torch < 2.11 needs the group enabled first (deprecated no-op-ish in newer versions)
        enable = getattr(symm, "enable_symm_mem_for_group", None)
        if enable is None:
            raise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(group_name)
        hdl = symm.rendezvous(t, group_name)
    if hdl.world_size != world_size or hdl.rank != rank:
        raise WeavelmError(f"symmetric memory rendezvous gave rank {hdl.rank}/{hdl.world_size}, "
                           f"expected {rank}/{world_size}")
    bases = list(hdl.buffer_ptrs)
    off = t.data_ptr() - bases[rank]  # our tensor inside torch's (pooled) allocation
    if off < 0 or off + nbytes > hdl.buffer_size:
        raise WeavelmError(f"symmetric buffer at offset {off} does not fit torch's "
                           f"{hdl.buffer_size}-byte allocation")
    mc = 0
    if multicast:  # read only here: allowed was checked above
        mc = int(hdl.multicast_ptr)
        if mc == 0:
            raise WeavelmError("multicast was asked for but torch mapped no multicast address "
                               "(no NVLink SHARP on this system?)")
        mc += off
    buf = SymmetricBuffer(t, data_bytes, [b + off for b in bases], list(hdl.signal_pad_ptrs),
                          mc, rank, world_size, handle=hdl, alloc_off=off)
    buf.zero_signals()
    _check_same_offset(off, group, world_size)
    return buf


def _check_same_offset(off: int, group, world_size: int) -> None:
    """Every rank's tensor must sit at the same offset in its allocation (peer address = peer
    base + our offset). True when all ranks allocate alike; checked once, it is cheap."""
    import torch.distributed as dist

    if not dist.is_initialized() or isinstance(group, str):
        return
    offs = [None] * world_size
    dist.all_gather_object(offs, off, group=group)
    if len(set(offs)) != 1:
        raise WeavelmError(f"symmetric buffers sit at different offsets on different ranks "
                           f"({offs}): allocate them in the same order on every rank")
