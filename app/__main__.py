"""``python -m app``: serve on ASR_HOST:ASR_PORT with uvicorn (one process, one event loop)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket

import uvicorn

from app.connections import CUT_REASONS, ConnectionGuard, ConnectionLimits, connection_cap
from app.main import create_app
from app.service import Service
from configs import Settings

AFTER_DRAIN_S = 5.0  # for uvicorn to close the connections the drain left idle
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int) -> None:
    """glibc gives threads that contend for malloc arenas of their own (up to 8 per core); the memory of
    tensors freed by the stages' threads then stays scattered over them and RSS creeps up. Measured in a
    300 s soak: +126 MiB with glibc's default, +55 MiB with 2 arenas, same throughput."""
    if arenas:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


class RefusedHandshakeFilter(logging.Filter):
    """Drops uvicorn's "ASGI callable returned without completing handshake." ERROR, which its websockets
    protocol logs after every handshake the app refuses with an HTTP response (the client gets that
    response; Kludex/uvicorn#3138). Refusals are counted in asr_rejected_requests_total, and an attacker
    must not be able to write a log line per connection. Every stream route here accepts or refuses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


class DrainingServer(uvicorn.Server):
    """uvicorn whose shutdown (SIGTERM, SIGINT) drains the service first.

    uvicorn's own first step would close every WebSocket with 1012 and drop the streams' last finals;
    draining first refuses new work (/readyz 503), lets each stream send its final and close with 1001
    and lets admitted requests finish, within ASR_SHUTDOWN_TIMEOUT_S; a second signal cuts the drain short.
    Then uvicorn stops as usual."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:  # a second SIGTERM or SIGINT: the operator will not wait for the drain
            self.service.cut_drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.service.drain(self.service.settings.shutdown_timeout_s)
        await super().shutdown(sockets)


def main() -> None:
    settings = Settings()
    limit_malloc_arenas(settings.malloc_arenas)  # before the threads that would create arenas
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per webhook delivery would drown the log
    app = create_app(settings)
    metrics = app.state.service.metrics
    guard = ConnectionGuard(ConnectionLimits(settings.header_timeout_s, settings.body_min_rate_bytes_s, settings.body_grace_s,
                                             settings.upload_timeout_s, connection_cap(settings.max_connections)),
                            on_cut=lambda reason: metrics.connections_cut.labels(reason).inc())
    metrics.connections_open.set_function(guard.open_connections)
    for reason in CUT_REASONS:  # exported from the start, so a panel shows zeros rather than no data
        metrics.connections_cut.labels(reason)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=guard.protocol_class(), forwarded_allow_ips=settings.forwarded_allow_ips,
                            timeout_graceful_shutdown=AFTER_DRAIN_S,
                            # the stream route answers frames over ASR_STREAM_MAX_FRAME_BYTES itself (error event,
                            # close 1009); uvicorn's own limit only stops frames too large to even hold in memory
                            ws_max_size=max(16 << 20, 2 * settings.stream_max_frame_bytes))
    server = DrainingServer(config, app.state.service)
    logging.getLogger("uvicorn.error").addFilter(RefusedHandshakeFilter())  # after uvicorn's Config set up its loggers
    server.run()


if __name__ == "__main__":
    main()
