"""May this process use CUDA multicast (NVLink SHARP, `multimem.*`)?

Multicast is opt-out by environment first: any of these variables set to a true value means no,
before anything could create a multicast object:
  WEAVELM_DISABLE_MULTICAST=1, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NCCL_NVLS_ENABLE=0.
Only when none of them forbids it is the device asked whether it supports multicast at all.
The answer comes with its reason, so callers can log why a backend was or was not chosen.
"""
from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def _env_forbids() -> str | None:
    if os.environ.get("WEAVELM_DISABLE_MULTICAST", "").lower() in _TRUE:
        return "WEAVELM_DISABLE_MULTICAST is set"
    if os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST", "").lower() in _TRUE:
        return "TORCH_SYMM_MEM_DISABLE_MULTICAST is set"
    if os.environ.get("NCCL_NVLS_ENABLE", "").lower() in ("0", "false", "no", "off"):
        return "NCCL_NVLS_ENABLE=0"
    return None


def _device_supports_multicast(device_index: int) -> bool:
    """Reads CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED; creates nothing."""
    from cuda.bindings import driver
    (err,) = driver.cuInit(0)
    if err != driver.CUresult.CUDA_SUCCESS:
        return False
    err, dev = driver.cuDeviceGet(device_index)
    if err != driver.CUresult.CUDA_SUCCESS:
        return False
    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED
    err, value = driver.cuDeviceGetAttribute(attr, dev)
    return err == driver.CUresult.CUDA_SUCCESS and bool(value)


def multicast_allowed(device_index: int | None = 0) -> tuple[bool, str]:
    """(allowed, reason). Environment first; the device attribute only if the environment allows."""
    reason = _env_forbids()
    if reason is not None:
        return False, reason
    if device_index is None:
        return False, "no CUDA device"
    try:
        import torch
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if not _device_supports_multicast(device_index):
            return False, "the device does not support multicast"
    except Exception as e:                              # noqa: BLE001 - missing bindings etc.
        return False, f"multicast support could not be queried ({type(e).__name__})"
    return True, "multicast supported and not disabled"
