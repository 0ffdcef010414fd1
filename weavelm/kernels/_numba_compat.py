"""Everything that must happen before and around numba-cuda's import, in one place.

* numba-cuda 0.30.4 calls `numpy.row_stack`, which numpy 2.5 removed; the GPU image ships numpy
  2.5, so we restore the alias before numba-cuda loads (it is the same function as `vstack`).
* `import weavelm` must not import numba: CPU-only code paths (references, gloo) never need it, and
  numba-cuda's import costs seconds. Kernel modules call `numba_cuda()` when they first need it.
* Torch must own the CUDA context: numba attaches, once per thread, to whatever primary context is
  current, so torch creates it first (`ensure_torch_context`).
"""
from __future__ import annotations

import functools
import os

import numpy

if not hasattr(numpy, "row_stack"):  # numpy >= 2.5; numba-cuda 0.30.4 still calls it
    numpy.row_stack = numpy.vstack


@functools.cache
def numba_cuda():
    """Import and return `numba.cuda` (the simulator's when `NUMBA_ENABLE_CUDASIM=1`)."""
    # Grids under 128 CTAs are normal here (few-SM fused kernels); the warning is noise.
    os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
    from numba import cuda

    return cuda


def simulator_enabled() -> bool:
    """True when numba-cuda runs its pure-Python CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`)."""
    return bool(numba_cuda().config.ENABLE_CUDASIM)


_owned_devices: set[int] = set()


def ensure_torch_context(device) -> int:
    """Make torch create and own the primary CUDA context of `device` before numba touches it.

    Returns the device index. Cheap after the first call per device.
    """
    if device in _owned_devices:  # hot path: an int already seen
        return device
    import torch

    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index in _owned_devices:
        return index
    torch.cuda.set_device(index)
    torch.empty(1, device=f"cuda:{index}")  # forces context creation in torch, not numba
    # numba attaches lazily to the current (torch's primary) context on its first driver call;
    # `cuda.select_device` would push the context a second time, so we leave it to that.
    _owned_devices.add(index)
    return index
