"""Running the `weavelm` command from the source tree, and what a refusal must look like."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weavelm(*args, env=None, timeout=300, stdin=None):
    """Run the CLI from the source tree; return (exit code, stdout, stderr)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", *map(str, args)], cwd=ROOT,
                       env=full_env, input=stdin, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, out, err, *needles):
    """Exit code 2 and one `error: ...` line holding every needle (strings, or lists of them)."""
    words = [w for n in needles for w in ([n] if isinstance(n, str) else n)]
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
