"""Bounds on the server's connections: what a client may hold without sending a request.

uvicorn gives a connection unlimited time to send its request line and headers (its keep-alive
timer only runs between requests, and any byte restarts it), so a client that opens many
connections and trickles its headers in (slowloris) holds them, and their file descriptors, for
as long as it likes. `header_deadline_protocol(s)` is uvicorn's h11 protocol with a deadline:
a connection whose request line and headers are not all in `s` seconds after it opened (or
after its previous response ended) is closed. Bodies and responses are not bounded here (the
body size is, by the app's BodyLimit). `connection_cap()` is the most connections uvicorn may
hold before it answers new requests with 503, below the process's file-descriptor limit.
"""
from __future__ import annotations

import h11

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 4096
FD_RESERVE = 128        # descriptors kept for the model's files, the ranks' sockets, logs


def header_deadline_protocol(seconds: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's HTTP protocol class (httptools' where installed, as uvicorn's "auto" picks,
    else h11's) that closes a connection still sending its request line or headers `seconds`
    after it opened or after its last response (pass as `Config(http=...)`)."""
    import importlib.util
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderDeadlineProtocol(Base):
        _header_timer = None
        _awaiting_headers = True

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:       # httptools: the headers are all in
            self._awaiting_headers = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._awaiting_headers = True
            self._header_timer = self.loop.call_later(seconds, self._deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _still_awaiting_headers(self) -> bool:
            conn = getattr(self, "conn", None)
            if conn is not None and hasattr(conn, "their_state"):
                # h11: IDLE until a whole request line and header block has been parsed
                return conn.their_state is h11.IDLE
            return self._awaiting_headers

        def _deadline(self) -> None:
            self._header_timer = None
            if self._still_awaiting_headers() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


def connection_cap() -> int:
    """`MAX_CONNECTIONS`, or fewer where the file-descriptor limit (raised to its hard limit
    first, as servers do) leaves less room."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = MAX_CONNECTIONS + FD_RESERVE if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
    except (ImportError, ValueError, OSError):
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - FD_RESERVE))
