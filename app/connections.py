"""What the server does with a connection before and while the app reads its request: a deadline for the
request headers, a least data rate and a deadline for the body, and a cap on open connections.

uvicorn starts no timer until a request's headers are complete and none on a body that trickles in, so
a client sending a header line every few seconds, or a byte a second of body, held its connection (and
a file descriptor) for as long as it liked; a thousand such clients exhausted the process's file limit.
:class:`GuardedH11Protocol` is uvicorn's h11 protocol with those timers (nginx's
``client_header_timeout`` and ``client_body_timeout``, Kestrel's ``RequestHeadersTimeout`` and
``MinRequestBodyDataRate``) and the cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import error_body

log = logging.getLogger(__name__)

FD_HEADROOM_MIN = 128  # descriptors kept for everything but client connections (model files, pipes, epoll, logs)
EVICT_AFTER_S = 1.0  # a client whose request headers take longer than this is not an ordinary one
BODY_CHECK_MIN_S = 0.25  # least time between two checks of a body's data rate
CUT_REASONS = ("header_timeout", "body_too_slow", "upload_timeout", "connection_limit", "evicted")  # what on_cut is told


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float  # from the connection's start, or the end of its last response, to a request's complete headers
    body_min_rate: float  # bytes per second a request body must average, once past the grace period; 0: no check
    body_grace_s: float
    upload_timeout_s: float  # from a request's headers to its body's last byte
    max_connections: int


def connection_cap(configured: int) -> int:
    """The configured cap, or (0) one that leaves headroom below the process's file limit, whose soft value is
    first raised to the hard one (as Go's runtime does): a server's sockets need more than the common 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    automatic = max(1, soft - max(FD_HEADROOM_MIN, soft // 8)) if soft != resource.RLIM_INFINITY else 65536
    if configured:
        if configured > automatic:
            log.warning("ASR_MAX_CONNECTIONS=%d leaves too few of the %d file descriptors for the rest; %d are allowed", configured, soft, automatic)
        return min(configured, automatic)
    return automatic


class ConnectionGuard:
    """Shared by the connections of one server: the limits, the connections waiting for request headers
    (oldest first), and what is told of each connection cut (``on_cut(reason)``)."""

    def __init__(self, limits: ConnectionLimits, on_cut: Callable[[str], None]):
        self.limits = limits
        self.on_cut = on_cut
        self.awaiting_headers: dict[GuardedH11Protocol, float] = {}  # insertion order: the oldest first
        self.connections: set | None = None  # uvicorn's set of open connections, known at the first one

    def protocol_class(self) -> type[GuardedH11Protocol]:
        """The protocol class to give uvicorn (``Config(http=...)``), bound to this guard."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def open_connections(self) -> int:
        return len(self.connections) if self.connections is not None else 0

    def evict_oldest_waiting(self, now: float) -> bool:
        """At the cap, the connection that has waited longest for its headers (past EVICT_AFTER_S) makes
        room: a slow-header client must not keep out a client whose headers come at once."""
        oldest = next(iter(self.awaiting_headers.items()), None)
        if oldest is None or now - oldest[1] < EVICT_AFTER_S:
            return False
        oldest[0].cut("evicted", respond=oldest[0].sent_part_of_a_request, message=f"the request headers took over {EVICT_AFTER_S:g} s "
                      "while the server was at its connection limit (ASR_MAX_CONNECTIONS); the connection was closed to make room")
        return True


class GuardedH11Protocol(H11Protocol):
    guard: ConnectionGuard  # set on the class :meth:`ConnectionGuard.protocol_class` makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        guard.connections = self.connections
        self._timer: asyncio.TimerHandle | None = None
        self._bytes = 0  # received since the timer's start: header bytes, then body bytes
        self._started = self._checked = 0.0  # when that timer started (moved on by time that does not count); last body check
        if len(self.connections) > guard.limits.max_connections and not guard.evict_oldest_waiting(self.loop.time()):
            self.cut("connection_limit")
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._bytes += len(data)
        cycle = self.cycle
        super().data_received(data)
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: its route has timers of its own
            self._stop_timer()
        elif self.cycle is not cycle:  # a request's headers are complete
            self._headers_done()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is not cycle:  # a pipelined request started in there
            self._headers_done()
        else:
            self._await_headers()

    # timers

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.awaiting_headers.pop(self, None)

    def _await_headers(self) -> None:
        self._stop_timer()
        self._bytes, self._started = 0, self.loop.time()
        self.guard.awaiting_headers[self] = self._started
        self._timer = self.loop.call_later(self.guard.limits.header_timeout_s, self._headers_late)

    @property
    def sent_part_of_a_request(self) -> bool:
        """Whether bytes of the awaited request came: such a client is told why it is cut; one that sent nothing is just closed."""
        return self._bytes > 0

    def _headers_late(self) -> None:
        self._timer = None
        self.cut("header_timeout", respond=self.sent_part_of_a_request, message=f"the request headers did not arrive within "
                 f"{self.guard.limits.header_timeout_s:g} s (ASR_HEADER_TIMEOUT_S)")

    def _headers_done(self) -> None:
        self._stop_timer()
        if self.conn.their_state is h11.SEND_BODY:
            self._bytes, self._started = len(self.cycle.body), self.loop.time()  # the body's bytes that came with the headers
            self._checked = self._started
            self._timer = self.loop.call_later(min(self.guard.limits.body_grace_s, self.guard.limits.upload_timeout_s), self._check_body)

    def _check_body(self) -> None:
        self._timer = None
        cycle, limits, now = self.cycle, self.guard.limits, self.loop.time()
        if cycle is None or not cycle.more_body or cycle.response_complete or self.transport.is_closing():
            return  # the body is complete, or the request is over
        # while the app has not asked for the body (100-continue) or is not reading it (reading paused), the
        # client is not the slow side: that time does not count
        if cycle.waiting_for_100_continue or self.flow.read_paused:
            self._started += now - self._checked
        self._checked = now
        elapsed = now - self._started
        if elapsed >= limits.upload_timeout_s:
            self.cut("upload_timeout", respond=True, message=f"the request body took longer than {limits.upload_timeout_s:g} s (ASR_UPLOAD_TIMEOUT_S)")
            return
        if limits.body_min_rate and elapsed >= limits.body_grace_s and self._bytes < limits.body_min_rate * elapsed:
            self.cut("body_too_slow", respond=True, message=f"the request body arrived at {self._bytes / elapsed:.0f} bytes/s, under the "
                     f"least rate of {limits.body_min_rate:g} (ASR_BODY_MIN_RATE_BYTES_S)")
            return
        # next: when the average would fall under the rate with nothing more received, or at the deadline
        due = max(limits.body_grace_s, self._bytes / limits.body_min_rate) if limits.body_min_rate else limits.upload_timeout_s
        self._timer = self.loop.call_later(max(BODY_CHECK_MIN_S, min(due, limits.upload_timeout_s) - elapsed), self._check_body)

    def cut(self, reason: str, respond: bool = False, message: str = "") -> None:
        """Close the connection, first answering 408 with a JSON reason when ``respond`` and no response has
        started. The app, if it is reading the body, sees the client disconnect."""
        self._stop_timer()
        if self.transport.is_closing():
            return
        self.guard.on_cut(reason)
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if respond and (cycle is None or not cycle.response_started):
            body = json.dumps(error_body("request_timeout", message)).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

