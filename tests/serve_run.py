"""Starting and stopping a real `weavelm serve` on 127.0.0.1 for the tests (CPU)."""
import os
import signal
import subprocess
import sys
import time

import httpx

from weavelm.parallel.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(path, tp, log, *extra, shutdown_timeout=20, port=None, env=None):
    """A server of the checkpoint `path` at TP `tp` (more CLI options in `extra`; on `port`,
    else a free one), once its /health answers 200: (process, base url, the 503 answers seen
    while it loaded)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "weavelm.cli.main", "serve", str(path), "--device", "cpu",
           "--port", str(port), "--tp", str(tp), "--served-model-name", "tiny",
           "--shutdown-timeout", str(shutdown_timeout), *map(str, extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})),
                            stdout=log, stderr=subprocess.STDOUT)
    url, deadline, loading = f"http://127.0.0.1:{port}", time.time() + 180, []
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return proc, url, loading
            loading.append(r)                        # 503 while the model loads
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become healthy within 180 s")


def stop_server(proc, timeout=60):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

