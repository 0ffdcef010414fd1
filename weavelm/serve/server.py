"""What every rank runs for `weavelm serve` (the CLI checks its input, then starts the ranks with
`parallel.launch.run_ranks`).

Rank 0 answers HTTP at once (503 while the model loads) with uvicorn in its main thread, and
loads and drives the model in the engine loop's thread; the other ranks load the model and
follow rank 0's steps. SIGINT or SIGTERM (a second one changes nothing): uvicorn stops taking
connections and gives the open ones `shutdown_timeout` seconds to finish, the engine loop then
aborts what is left and tells the other ranks to stop, and every rank returns.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import uvicorn

log = logging.getLogger("weavelm.serve")


def build_engine(opts: dict):
    """The engine of `opts["config"]`: its checkpoint, or random weights of a named shape
    (`shape`)."""
    from weavelm.engine.engine import LLMEngine
    if opts.get("shape"):
        from weavelm.bench.prefill import fill_random
        from weavelm.bench.shapes import shape_config
        cfg = shape_config(opts["shape"], opts.get("layers"))
        seed = opts.get("seed", 0)
        tokenizer = None
        if opts.get("tokenizer"):           # text prompts and structured output at a real size
            from weavelm.models.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(opts["tokenizer"])
        return LLMEngine.from_config(opts["config"], cfg, lambda model: fill_random(model, seed),
                                     tokenizer=tokenizer, progress=False)
    engine = LLMEngine.from_config(opts["config"], progress=False)
    if opts.get("chat_template"):           # --chat-template: before stop_ids read the template
        engine.tokenizer.chat_template = opts["chat_template"]
    return engine


def serve_rank(opts: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        from weavelm.serve.loop import follow
        # Rank 0 decides when to stop; a terminal's Ctrl-C reaches this process too.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow(build_engine(opts))
        return None
    from weavelm.errors import WeavelmError
    from weavelm.serve.app import create_app
    from weavelm.serve.loop import EngineLoop
    from weavelm.serve.metrics import ServerMetrics
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # Two threads share the GIL here: the engine loop (which lets go of it while it waits for
    # the device) and the event loop. Python hands it over only every 5 ms by default, which
    # could hold a step back that long; 1 ms keeps the engine loop waiting less.
    sys.setswitchinterval(0.001)
    from weavelm.models.chat_template import warm_up
    warm_up()                           # chat requests render their template in this child
    metrics = ServerMetrics()
    loop = EngineLoop(lambda: build_engine(opts), metrics)
    app = create_app(loop, opts["served_name"], metrics,
                     shutdown_timeout_s=opts["shutdown_timeout"] + 30,
                     parse_special_tokens=opts.get("parse_special_tokens", False),
                     api_key=opts.get("api_key"), tool_parser=opts.get("tool_parser"))
    from weavelm.serve.connections import (HEADER_TIMEOUT_S, connection_cap,
                                           header_deadline_protocol)
    config = uvicorn.Config(app, host=opts["host"], port=opts["port"], log_level="info",
                            access_log=opts.get("access_log", False),
                            timeout_graceful_shutdown=opts["shutdown_timeout"],
                            http=header_deadline_protocol(opts.get("header_timeout",
                                                                   HEADER_TIMEOUT_S)),
                            limit_concurrency=connection_cap())
    server = GracefulServer(config)
    loop.on_failure = server.request_exit
    server.on_deadline = loop.end_all
    tp, pp = opts["config"].tp, opts["config"].pp
    log.info("serving %s on http://%s:%d (TP %d%s)", opts["served_name"], opts["host"],
             opts["port"], tp, f" x PP {pp}" if pp > 1 else "")
    server.run()
    from weavelm.parallel.launch import peer_failure
    if loop.failure is not None and peer_failure(loop.failure):
        raise loop.failure              # the launcher names the rank that went away
    if loop.error is not None:
        raise WeavelmError(loop.error)
    return None


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but a second signal does not skip the graceful shutdown (a Ctrl-C
    reaches every process of the terminal's group, and the launcher forwards it as well), and
    requests still open shortly before the shutdown timeout are ended by the engine loop: their
    responses finish with a 503 "cancelled" error (streams: an error event, then `[DONE]`)
    instead of being cut when uvicorn cancels the connections."""

    on_deadline = None               # called shortly before uvicorn cancels open connections

    def handle_exit(self, sig, frame) -> None:
        self.should_exit = True

    def request_exit(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        import asyncio
        grace = self.config.timeout_graceful_shutdown or 0
        if self.on_deadline is not None:
            asyncio.get_running_loop().call_later(max(0.0, grace - min(1.0, grace / 2)),
                                                  self.on_deadline)
        await super().shutdown(sockets)
