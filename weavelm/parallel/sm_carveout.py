"""Leave SMs free for the communication kernel while GEMMs run beside it (the weave).

cuBLAS's Hopper GEMMs are persistent: one CTA per SM, each looping over output tiles. When the
fused communication kernel holds a few SMs, such a GEMM's last CTAs wait for a second wave, so
its time can grow by far more than the share of SMs it lost. Asking cuBLAS to target
(SMs - carveout) keeps the GEMM in one wave on the SMs the communication leaves free.

Two switches, because torch versions differ in which GEMM path honours what:
* `torch._C._set_sm_carveout_experimental(n)`: torch's own knob (cuBLASLt path; newer torch also
  its cuBLAS path);
* `cublasSetSmCountTarget` on torch's cuBLAS handle of this thread and device (the cuBLAS path of
  torch versions whose knob does not reach it), called through ctypes on the libcublas torch
  loaded. Restored afterwards (0, the library default, unless something else had set it).
Both are host settings read when a GEMM is launched (or captured into a CUDA graph).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging

import torch

log = logging.getLogger("weavelm")


@functools.lru_cache(maxsize=1)
def _cublas():
    """torch's libcublas (the library already mapped into this process), or None."""
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith("libcublas.so"):
                    path = line.split(None, 5)[-1].strip()
                    break
    except OSError:
        pass
    if path is None:
        log.info("weavelm: libcublas is not loaded; GEMM carveout through torch's knob only")
        return None
    try:
        lib = ctypes.CDLL(path)
        for fn, args in (("cublasSetSmCountTarget", [ctypes.c_void_p, ctypes.c_int]),
                         ("cublasGetSmCountTarget", [ctypes.c_void_p,
                                                     ctypes.POINTER(ctypes.c_int)])):
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int
        return lib
    except (OSError, AttributeError) as e:
        log.info("weavelm: no cuBLAS SM count target (%s)", e)
        return None


def cublas_sm_count_target() -> int | None:
    """The SM count target of torch's cuBLAS handle on this thread and device (0: all)."""
    lib = _cublas()
    if lib is None:
        return None
    n = ctypes.c_int(-1)
    if lib.cublasGetSmCountTarget(ctypes.c_void_p(torch.cuda.current_blas_handle()),
                                  ctypes.byref(n)):
        return None
    return n.value


def _set_cublas_target(n: int) -> None:
    lib = _cublas()
    if lib is not None:
        lib.cublasSetSmCountTarget(ctypes.c_void_p(torch.cuda.current_blas_handle()), n)


@contextlib.contextmanager
def gemm_sm_carveout(sms: int | None):
    """GEMMs launched inside leave `sms` SMs of the current device unused (None or 0: none)."""
    if not sms or not torch.cuda.is_available():
        yield
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    sms = max(0, min(int(sms), total - 1))
    knob = hasattr(torch._C, "_set_sm_carveout_experimental")
    previous = torch._C._get_sm_carveout_experimental() if knob else None
    previous_target = cublas_sm_count_target() or 0
    if knob:
        torch._C._set_sm_carveout_experimental(sms)
    _set_cublas_target(total - sms)
    try:
        yield
    finally:
        _set_cublas_target(previous_target)
        if knob:
            torch._C._set_sm_carveout_experimental(previous)
