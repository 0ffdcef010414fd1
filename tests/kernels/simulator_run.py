"""Run a test file's `test_sim_*` tests again in a subprocess under numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM must be set before numba loads, so it cannot be switched in-process)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REPO = Path(__file__).resolve().parents[2]
RUNS: list[tuple[str, int]] = []     # (test file, test_sim_* tests passed), for the summary


def run_sim_tests(test_file: str, timeout: int) -> None:
    """Assert that every test_sim_* of `test_file` passes in the simulator, none skipped."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-W", "ignore::DeprecationWarning", "-k", "test_sim_", test_file],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, r.stdout[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    RUNS.append((Path(test_file).name, passed))
    print(f"{Path(test_file).name}: {passed} test_sim_* tests passed in the CUDA simulator")
