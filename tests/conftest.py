import os
import sys

import pytest

# Tests import the package from the source tree even when it is not installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Spawned ranks inherit sys.path from the parent; keep tests/ importable for their workers.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def pytest_collection_modifyitems(config, items):
    # The kernels' `test_sim_*` tests run only inside the CUDA-simulator subprocess that each
    # file's `test_in_simulator` starts (it asserts they all pass); outside it they are not
    # placeholders to skip but tests of another run: deselect them, so the summary counts them once.
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sim = [item for item in items if item.name.startswith("test_sim_")]
        if sim:
            items[:] = [item for item in items if not item.name.startswith("test_sim_")]
            config.hook.pytest_deselected(items=sim)
    n = _gpu_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    """Each test starts without a process group or communicator from an earlier test."""
    yield
    from weavelm.parallel.state import destroy_parallel
    destroy_parallel()
