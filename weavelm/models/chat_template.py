"""Chat templates rendered in a child process, bounded in time and memory.

A chat template is code from a model repository. jinja's sandbox stops it from reaching Python
objects, but not from computing `10 ** (10 ** 9)` (one C call that holds the interpreter lock:
a thread cannot stop it, and a server rendering it in-process stops answering) or building a
string of many GB before any size check sees it. So templates render in one long-lived child
process (spawned: safe beside the server's threads), with an address-space limit a little above
what it holds after its imports; past the deadline it is killed (SIGKILL needs no lock) and the
next render starts a fresh one. Each tokenizer is sent to it once; it calls transformers'
`apply_chat_template` itself, so rendering is exactly transformers' own.

    text = render(tokenizer, messages, seconds=10.0, max_chars=10_000_000)
    warm_up()          # start the child early (its imports take a second) where chat will follow
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import threading

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


def _serve(conn) -> None:
    """The child: render requests until the pipe closes."""
    import resource

    import transformers  # noqa: F401 - imported before the limit is measured
    used = _address_space()
    if used:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = used + MEMORY_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    tokenizers: dict[int, object] = {}
    conn.send("ready")
    while True:
        try:
            key, blob, messages, max_chars = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if blob is not None:
                tokenizers[key] = pickle.loads(blob)
            text = tokenizers[key].apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
            if isinstance(text, str) and len(text) > max_chars:
                reply = ("long", len(text))
            else:
                reply = ("ok", text) if isinstance(text, str) else ("type", type(text).__name__)
        except MemoryError:
            reply = ("memory", None)
        except BaseException as e:        # noqa: BLE001 - the template's error, sent back
            reply = ("error", (type(e).__name__, " ".join(str(e).split())[:200],
                               getattr(e, "lineno", None)))
        conn.send(reply)


class _Renderer:
    def __init__(self):
        self._lock = threading.Lock()
        self._proc = self._conn = None
        self._sent: set[int] = set()        # tokenizers the current child holds

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="weavelm-chat-template",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._sent = set()
        # its imports take a second or more: not part of any render's time
        try:
            ready = self._conn.poll(STARTUP_SECONDS) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise WeavelmError(f"the chat template renderer did not start within "
                               f"{STARTUP_SECONDS} s: {_FIX}")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def warm_up(self) -> None:
        with self._lock:
            self._ensure()

    def render(self, tokenizer, messages: list[dict], seconds: float, max_chars: int) -> str:
        with self._lock:
            self._ensure()
            key = id(tokenizer)
            blob = None if key in self._sent else pickle.dumps(tokenizer)
            self._conn.send((key, blob, messages, max_chars))
            self._sent.add(key)
            if not self._conn.poll(seconds):
                self._kill()
                raise WeavelmError(f"the chat template did not finish within {seconds:g} s (a "
                                   f"loop that never ends, or a huge computation?): {_FIX}")
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
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
