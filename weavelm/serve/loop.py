"""The engine loop: one thread on rank 0 owns the `LLMEngine` and drives its steps; the HTTP side
talks to it only through a queue, and the outputs go back to each request's asyncio queue.

    loop = EngineLoop(build_engine, metrics)     # build_engine runs in the loop's thread
    loop.start(asyncio_loop)
    loop.submit(rid, prompt_ids, params, queue)  # outputs: RequestOutput, put on `queue`
    loop.abort(rid)                              # a client went away: its KV blocks are freed
    loop.stop(timeout_s)                         # the rest are aborted, every rank leaves

Each iteration takes the commands that arrived (adds, aborts), applies them, and runs one
engine step. At TP > 1 these commands are the step's inputs: rank 0 broadcasts them before
applying them, and every other rank (`follow`) applies the same commands and takes the same
step, so all ranks keep the same requests and the same KV blocks. While nothing runs rank 0
still broadcasts an empty list every `IDLE_S`, so the others never wait long in a collective.
"""
from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
import traceback

import torch

from weavelm.engine.sampler import SamplingParams

log = logging.getLogger("weavelm.serve")
IDLE_S = 0.5


def broadcast_inputs(comm, device, message=None):
    """Rank 0's `message` (any picklable object) on every rank: a size, then the bytes."""
    if comm.world_size == 1:
        return message
    if comm.rank == 0:
        data = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    comm.broadcast(size, src=0)
    n = int(size.item())
    buf = data.to(device) if comm.rank == 0 else torch.empty(n, dtype=torch.uint8, device=device)
    comm.broadcast(buf, src=0)
    return message if comm.rank == 0 else pickle.loads(buf.cpu().numpy().tobytes())


def apply(engine, commands) -> list[tuple[str, str]]:
    """Apply adds and ends to the engine (the same on every rank); returns the (id, reason) of
    the requests that ended here (an add the engine refused ends with an error)."""
    ended = []
    for cmd in commands:
        if cmd[0] == "add":
            _, rid, tokens, params = cmd
            try:
                engine.add_request(rid, tokens, params)
            except Exception as e:                   # noqa: BLE001 - that request fails alone
                ended.append((rid, f"error: {e}"))
        else:                                        # ("end", rid, reason)
            _, rid, reason = cmd
            if engine.abort_request(rid):
                ended.append((rid, reason))
    return ended


def follow(engine) -> None:
    """What ranks other than 0 run: rank 0's commands, then the same step, until told to stop."""
    while True:
        commands, stop = broadcast_inputs(engine.host_comm, engine.device)
        apply(engine, commands)
        if stop:
            return
        if engine.has_unfinished_requests():
            engine.step()


class EngineLoop:
    def __init__(self, build, metrics=None):
        self.build, self.metrics = build, metrics
        self.inbox: queue.Queue = queue.Queue()
        self.engine = self.tokenizer = None
        self.ready = threading.Event()
        self.error: str | None = None                # why the model could not load
        self.failure: BaseException | None = None    # what stopped the loop, if anything did
        self.on_failure = None                       # called (in the loop thread) if it fails
        self._sinks: dict[str, tuple] = {}           # id -> (queue, arrival, first token time)
        self._thread = threading.Thread(target=self._main, name="weavelm-engine", daemon=True)
        self._progress = time.monotonic()             # when the last iteration finished
        self._aloop = None

    # -- the HTTP side (event-loop thread) ------------------------------------------------------
    def start(self, aloop) -> None:
        self._aloop = aloop
        self._thread.start()

    def submit(self, rid: str, tokens: list[int], params: SamplingParams, sink) -> None:
        self.inbox.put(("add", rid, tokens, params, sink, time.perf_counter()))

    def abort(self, rid: str, reason: str = "abort") -> None:
        self.inbox.put(("end", rid, reason))

    def stalled_seconds(self) -> float:
        """Seconds since the loop last finished an iteration while requests were open (0 when
        none are, or it is not stuck)."""
        if not self._sinks:
            return 0.0
        return time.monotonic() - self._progress

    def end_all(self, reason: str = "abort") -> None:
        """End every open request now (shutdown: their streams get their last event)."""
        self.inbox.put(("end_all", reason))

    def stop(self, timeout_s: float = 30.0) -> None:
        self.inbox.put(("stop",))
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = self.build()
            self.engine.stop_ids                     # the tokenizer loads here, not mid-step
            self.tokenizer = _tokenizer(self.engine)
        except BaseException as e:                   # noqa: BLE001 - reported to the server
            self.error = str(e) if str(e) else type(e).__name__
            log.error("the model could not be loaded: %s", self.error)
            if not isinstance(e, Exception) or type(e).__name__ != "WeavelmError":
                log.error("%s", traceback.format_exc())
            if self.on_failure is not None:
                self.on_failure()
            return
        if self.metrics is not None:
            self.metrics.set_capacity(self.engine.runner.blocks.capacity)
        self.ready.set()
        log.info("engine ready")
        try:
            self._run(self.engine)
        except BaseException as e:                   # noqa: BLE001 - e.g. a rank went away
            from weavelm.parallel.launch import peer_failure
            if not peer_failure(e):      # a lost peer: the launcher's one line names the rank
                log.error("the engine loop stopped:\n%s", traceback.format_exc())
            self.failure = e
            self.error = f"the engine loop stopped ({type(e).__name__}: {e})"
            ended = [self._ended(rid, f"error: {self.error}") for rid in list(self._sinks)]
            self._deliver([d for d in ended if d is not None])
            if self.on_failure is not None:
                self.on_failure()

    def _take(self, block: bool) -> tuple[list, bool]:
        """The commands waiting in the inbox (waiting up to IDLE_S for one when idle)."""
        commands, stop = [], False
        try:
            item = self.inbox.get(timeout=IDLE_S) if block else self.inbox.get_nowait()
            while True:
                if item[0] == "stop":
                    stop = True
                elif item[0] == "end_all":
                    commands += [("end", rid, item[1]) for rid in self._sinks]
                elif item[0] == "add":
                    _, rid, tokens, params, sink, arrival = item
                    self._sinks[rid] = [sink, arrival, None]
                    commands.append(("add", rid, tokens, params))
                else:
                    commands.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        return commands, stop

    def _run(self, engine) -> None:
        while True:
            commands, stop = self._take(block=not engine.has_unfinished_requests())
            if stop:                                 # every request left ends now
                commands += [("end", rid, "abort") for rid in list(self._sinks)]
            broadcast_inputs(engine.host_comm, engine.device, (commands, stop))
            deliveries = []
            for rid, reason in apply(engine, commands):
                deliveries.append(self._ended(rid, reason))
            for cmd in commands:                     # ended before the engine saw a step
                if cmd[0] == "end" and cmd[1] in self._sinks:
                    deliveries.append(self._ended(cmd[1], cmd[2]))
            outs = []
            if not stop and engine.has_unfinished_requests():
                try:
                    outs = engine.step()
                except Exception:                    # noqa: BLE001 - fail the running requests
                    if engine.state.num_ranks > 1:
                        raise        # the followers are mid-step: end every rank, not just these
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    for rid in list(self._sinks):
                        engine.abort_request(rid)
                        deliveries.append(self._ended(rid, "error: the engine step failed"))
            now = time.perf_counter()
            for out in outs:
                deliveries.append(self._output(out, now))
            if self.metrics is not None:
                self.metrics.update(engine)
            self._progress = time.monotonic()
            self._deliver([d for d in deliveries if d is not None])
            if stop:
                return

    def _output(self, out, now: float):
        entry = self._sinks.get(out.request_id)
        if entry is None:
            return None
        metrics = self.metrics
        if entry[2] is None and out.new_token_ids:
            entry[2] = now
            if metrics is not None:
                metrics.first_token(now - entry[1], len(out.prompt_token_ids))
        if metrics is not None:
            metrics.tokens(len(out.new_token_ids))
        if out.finished:
            del self._sinks[out.request_id]
            n = len(out.token_ids)
            if metrics is not None:
                metrics.finished(out.finish_reason, (now - entry[2]) / (n - 1) if n > 1 else None)
        return entry[0], out

    def _ended(self, rid: str, reason: str):
        """A request ended by the server (abort, a stop string, shutdown): a final output."""
        from weavelm.engine.engine import RequestOutput
        entry = self._sinks.pop(rid, None)
        if entry is None:
            return None
        if self.metrics is not None:
            self.metrics.finished(reason, None)
        return entry[0], RequestOutput(rid, [], [], [], True, reason)

    def _deliver(self, deliveries) -> None:
        if deliveries and self._aloop is not None and not self._aloop.is_closed():
            try:
                self._aloop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:                     # the event loop closed meanwhile
                pass


def _tokenizer(engine):
    from weavelm.errors import WeavelmError
    try:
        return engine.tokenizer
    except WeavelmError:                 # random weights of a shape: token ids only
        return None


def _put_all(deliveries) -> None:
    for sink, out in deliveries:
        sink.put_nowait(out)
