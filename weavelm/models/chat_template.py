"""Chat templates rendered in a child process, bounded in time and memory.

A chat template is code from a model repository. jinja's sandbox stops it from reaching Python
objects, but not from computing `10 ** (10 ** 9)` (one C call that holds the interpreter lock:
a thread cannot stop it, and a server rendering it in-process stops answering) or building a
string of many GB before any size check sees it. So templates render in one long-lived child
process (`python -m weavelm.models.chat_template`: a fresh interpreter, safe beside the server's
threads, and unlike multiprocessing's spawn it never re-runs the caller's script), with an
address-space limit a little above what it holds after its imports; past the deadline it is
killed (SIGKILL needs no lock) and the next render starts a fresh one. Requests and replies are
pickles framed by their length on its stdin and stdout. Each tokenizer is sent to it once; it
calls transformers' `apply_chat_template` itself, so rendering is exactly transformers' own.
A tokenizer is sent again when its chat template changed, or when it is another object under a
reused `id()` (a tokenizer that died forgets its entry).

    text = render(tokenizer, messages, seconds=10.0, max_chars=10_000_000, tools=None)
    warm_up()          # start the child early (its imports take a second) where chat will follow
"""
from __future__ import annotations

import atexit
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import weakref

from weavelm.errors import WeavelmError

MEMORY_HEADROOM = 2 << 30       # bytes of address space a render may add to the child's own
STARTUP_SECONDS = 60            # the child's imports (about a second on a quiet machine)
_FIX = "fix the template, or pass --no-chat (chat=False)"


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux), else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _send(f, obj) -> None:
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _read_exact(f, n: int) -> bytes:
    chunks = []
    while n:
        chunk = f.read(n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(f):
    return pickle.loads(_read_exact(f, struct.unpack("<Q", _read_exact(f, 8))[0]))


def _serve() -> None:
    """The child: render requests from stdin until it closes; replies on the real stdout (fd 1
    then points at stderr, so nothing else can write into the channel)."""
    import resource
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    inp = os.fdopen(0, "rb", buffering=0)
    import transformers  # noqa: F401 - imported before the limit is measured
    used = _address_space()
    if used:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = used + MEMORY_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    tokenizers: dict[int, object] = {}
    try:
        _send(out, "ready")
    except OSError:                       # the parent is gone already (it failed early)
        return
    while True:
        try:
            key, blob, messages, max_chars, tools = _recv(inp)
        except (EOFError, OSError):
            return
        try:
            if blob is not None:
                tokenizers[key] = pickle.loads(blob)
            extra = {"tools": tools} if tools else {}
            text = tokenizers[key].apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False, **extra)
            if isinstance(text, str) and len(text) > max_chars:
                reply = ("long", len(text))
            else:
                reply = ("ok", text) if isinstance(text, str) else ("type", type(text).__name__)
        except MemoryError:
            reply = ("memory", None)
        except BaseException as e:        # noqa: BLE001 - the template's error, sent back
            reply = ("error", (type(e).__name__, " ".join(str(e).split())[:200],
                               getattr(e, "lineno", None)))
        text = None
        try:
            _send(out, reply)
        except OSError:
            return


class _Renderer:
    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        # tokenizers the current child holds: id -> the chat template it was sent with
        self._sent: dict[int, object] = {}

    @staticmethod
    def _ready(proc, seconds: float) -> bool:
        """Whether the child's reply is there within `seconds`."""
        return bool(select.select([proc.stdout], [], [], seconds)[0])

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", "weavelm.models.chat_template"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self._sent = {}
        # its imports take a second or more: not part of any render's time
        try:
            ready = self._ready(proc, STARTUP_SECONDS) and _recv(proc.stdout) == "ready"
        except (EOFError, OSError, ValueError, pickle.UnpicklingError):   # killed at exit too
            ready = False
        if not ready:
            self._kill()
            raise WeavelmError(f"the chat template renderer did not start (python -m "
                               f"weavelm.models.chat_template): {_FIX}")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None     # (at exit a warm-up thread may be here too)
        if proc is None:
            return
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def _forget(self, key: int) -> None:
        self._sent.pop(key, None)

    def warm_up(self) -> None:
        """Start the child now (in the background of whatever the caller does next)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                threading.Thread(target=self._start_quietly, daemon=True).start()

    def _start_quietly(self) -> None:
        with self._lock:
            try:
                self._ensure()
            except Exception:                # noqa: BLE001 - the render that needs it will say so
                pass

    def render(self, tokenizer, messages: list[dict], seconds: float, max_chars: int,
               tools: list[dict] | None = None) -> str:
        with self._lock:
            self._ensure()
            key, template = id(tokenizer), getattr(tokenizer, "chat_template", None)
            fresh = key not in self._sent or self._sent[key] != template
            blob = pickle.dumps(tokenizer) if fresh else None
            try:
                _send(self._proc.stdin, (key, blob, messages, max_chars, tools))
                if fresh and key not in self._sent:     # its id may be reused once it dies
                    weakref.finalize(tokenizer, self._forget, key)
                self._sent[key] = template
                if not self._ready(self._proc, seconds):
                    self._kill()
                    raise WeavelmError(f"the chat template did not finish within {seconds:g} s "
                                       f"(a loop that never ends, or a huge computation?): {_FIX}")
                kind, value = _recv(self._proc.stdout)
            except (EOFError, OSError, BrokenPipeError):
                self._kill()
                raise WeavelmError(f"the chat template's renderer died (it used more memory "
                                   f"than {MEMORY_HEADROOM >> 30} GiB?): {_FIX}") from None
        if kind == "ok":
            return value
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        if kind == "long":
            raise WeavelmError(f"the chat template wrote {value:,} characters for a {chars:,}-"
                               f"character prompt (over {max_chars:,}): {_FIX}")
        if kind == "memory":
            raise WeavelmError(f"the chat template needed more than {MEMORY_HEADROOM >> 30} GiB "
                               f"of memory for a {chars:,}-character prompt: {_FIX}")
        if kind == "type":
            raise WeavelmError(f"the chat template rendered {value}, not text: {_FIX}")
        name, reason, lineno = value
        if lineno:                                    # jinja's syntax errors know the line
            reason += f" (template line {lineno})"
        raise WeavelmError(f"the chat template failed ({name}{': ' + reason if reason else ''})"
                           f": {_FIX}")


_RENDERER = _Renderer()
render = _RENDERER.render
warm_up = _RENDERER.warm_up
atexit.register(_RENDERER._kill)        # its pipes closed, no child left behind

if __name__ == "__main__":
    _serve()
