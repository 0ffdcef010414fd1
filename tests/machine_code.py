"""The machine-code tools the kernel tests use: nvdisasm reads the SASS ptxas makes."""
from __future__ import annotations

import os
import shutil


def nvdisasm() -> str | None:
    """nvdisasm on PATH, else the one of the nvidia-cuda-nvdisasm wheel (the [test] extra)."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for sub in ("cu13", "cuda_nvdisasm"):
            path = os.path.join(root, sub, "bin", "nvdisasm")
            if os.access(path, os.X_OK):
                return path
    return None
