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


IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    # The kernels' `test_sim_*` tests run only inside the CUDA-simulator subprocess that each
    # file's `test_in_simulator` starts (it asserts they all pass, and the summary reports that
    # run's count: pytest_terminal_summary). Outside it they are not collected at all: neither
    # skipped placeholders nor "deselected" tests, so the summary counts each test once.
    if not IN_SIM and name.startswith("test_sim_"):
        return []
    return None


def pytest_terminal_summary(terminalreporter):
    runs = getattr(sys.modules.get("simulator_run"), "RUNS", None)
    if runs:
        passed = sum(n for _, n in runs)
        terminalreporter.write_line(
            f"CUDA simulator: {passed} test_sim_* tests passed inside the {len(runs)} "
            f"test_in_simulator test{'s' * (len(runs) > 1)} counted below")


def pytest_collection_modifyitems(config, items):
    n = _gpu_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    # With xdist (`-n 2 --dist loadgroup`, the README's command): a file's tests stay on one
    # worker (module fixtures are built once), and every GPU test runs on the same worker, so
    # two never share a GPU at once (each sizes its KV cache from the memory it finds free).
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        on_gpu = "gpu" in item.keywords or "multigpu" in item.keywords
        if "gpu" in item.keywords and n < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)
        if xdist:
            group = "gpu" if on_gpu else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    """Each test starts without a process group or communicator from an earlier test."""
    yield
    from weavelm.parallel.state import destroy_parallel
    destroy_parallel()


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    """The default model served with a Hermes-style tool template (tests/data/hermes_tools.jinja)
    and `--tool-call-parser hermes`: its base url (tests of tool calling and of clients)."""
    from serve_run import start_server, stop_server
    from weavelm.models.gguf import default_model_path
    template = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                            "hermes_tools.jinja")
    with open(tmp_path_factory.mktemp("log") / "server.log", "w+") as log:
        proc, url, _ = start_server(default_model_path(), 1, log, "--tool-call-parser",
                                    "hermes", "--chat-template", template)
        try:
            yield url
        finally:
            stop_server(proc)
