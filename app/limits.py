"""Limits applied before a request body is read: its size (enforced while it streams in), admission,
and each client's request rate."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from app.auth import presented_key
from app.errors import APIError

if TYPE_CHECKING:
    from app.service import ServedModel, Service


LINGER_IDLE_S = 2.0  # a refused client that sends nothing for this long has stopped sending its body
LINGER_MAX_S = 10.0  # ... and none is read for longer than this
MAX_TRACKED_CLIENTS = 10_000  # past this many, the rate limiter forgets the clients whose bucket is full again


class TokenBucket:
    """At most ``rate`` events per second on average, ``burst`` of them at once."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.capacity = rate, burst
        self.tokens, self.updated = burst, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def allow(self) -> bool:
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def retry_after_s(self) -> float:
        """How long until the next event is allowed."""
        return max(0.0, (1 - self.tokens) / self.rate)

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity


def client_identity(scope: Scope, keyed: bool) -> str:
    """Who a request comes from, for per-client limits: its API key when keys are in use (a digest, never
    the key), else its address (the proxy's X-Forwarded-For where ASR_FORWARDED_ALLOW_IPS trusts it)."""
    if keyed and (key := presented_key(scope)) is not None:
        return "key:" + hashlib.sha256(key).hexdigest()[:16]
    client = scope.get("client")
    return "address:" + (client[0] if client else "unknown")


async def refuse_before_body(error: APIError, receive: Receive, send: Send) -> None:
    """Answer a request whose body has not been read, at once; then read and drop what the client still
    sends before the connection closes. Closing a socket with unread data in it resets the connection,
    and most clients, busy sending their body, would see the reset instead of this answer (nginx calls
    the remedy a lingering close). The answer's Content-Length tells the client it is complete."""
    response = error.response()
    response.headers["Connection"] = "close"  # the unread rest of the body must not be taken for the next request
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    deadline = time.monotonic() + LINGER_MAX_S
    with contextlib.suppress(TimeoutError):
        while (left := deadline - time.monotonic()) > 0:
            message = await asyncio.wait_for(receive(), min(LINGER_IDLE_S, left))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
    await send({"type": "http.response.body", "body": b""})


def _message(max_bytes: int) -> str:
    return f"the request body is over the limit of {max_bytes} bytes (ASR_MAX_UPLOAD_BYTES)"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body; an HTTPException, so parsers pass it on and the handler answers 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, _message(max_bytes))


class BodySizeLimit:
    """``max_bytes`` per request body, or for a path of ``per_path`` its own (a durable job's upload may be hours long)."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await refuse_before_body(APIError(413, "payload_too_large", _message(limit)), receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


class Admission:
    """Decides, before a transcription request's body is read, whether it comes in: not while the server
    is loading or shutting down (503), nor for a model it does not serve (404), nor while that model's
    pipeline is backed up (429, see :func:`backlog_refusal`). Reading a 50 MB upload only to refuse it
    would waste the time the backlog needs. Counts the admitted requests in flight, which a graceful
    shutdown waits for."""

    PATHS = ("/v1/transcribe", "/v1/audio/transcriptions", "/v1/audio/translations")

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.PATHS):
            await self.app(scope, receive, send)
            return
        # the model is known here when the query names it; one named in a form is checked again once read
        if (refusal := self.refusal(QueryParams(scope["query_string"]).get("model"))) is not None:
            await refuse_before_body(refusal, receive, send)
            return
        self.service.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.service.request_finished()

    def refusal(self, model: str | None) -> APIError | None:
        return admission_refusal(self.service, model)


def admission_refusal(service: Service, model: str | None) -> APIError | None:
    """The one admission decision for new transcription work on ``model`` (None: the default model): 503
    while the server cannot take work, 429 while the decoding threads are full or the model's pipeline is
    backed up (:func:`backlog_refusal`), 404/503 for a model not served or still loading."""
    if (unavailable := service.unavailable()) is not None:
        service.metrics.rejected.labels(unavailable.code).inc()
        return unavailable
    if (busy := service.decoder.refusal()) is not None:
        service.metrics.rejected.labels("decoders_busy").inc()
        return busy
    try:
        served = service.model(model)
    except APIError as not_found:
        return not_found
    return backlog_refusal(service, served)


def backlog_refusal(service: Service, served: ServedModel) -> APIError | None:
    """429 while the model's pipeline is backed up: more windows waiting in its queues than
    ASR_ADMISSION_MAX_WAITING, or the work in flight predicted to take longer than ASR_ADMISSION_MAX_WAIT_S
    at the rate the pipeline has been finishing windows."""
    settings = service.settings
    snapshot = served.engine.snapshot()
    waiting, wait_s = snapshot.windows_waiting, snapshot.predicted_wait_s
    if waiting > settings.admission_max_waiting:
        reason = f"{waiting} windows are waiting, over the limit of {settings.admission_max_waiting} (ASR_ADMISSION_MAX_WAITING)"
    elif wait_s > settings.admission_max_wait_s:
        reason = f"new work would wait about {wait_s:.1f} s, over the limit of {settings.admission_max_wait_s:g} s (ASR_ADMISSION_MAX_WAIT_S)"
    else:
        return None
    service.metrics.rejected.labels("backlog").inc()
    # by then about the excess has been worked off
    retry_s = max(1, math.ceil(wait_s - settings.admission_max_wait_s))
    return APIError(429, "overloaded", f"the model {served.name} is at capacity: {reason}; retry later", {"Retry-After": str(retry_s)})


class ClientRateLimit:
    """Each client (see :func:`client_identity`) may send ASR_CLIENT_MAX_REQUESTS_PER_S API requests per
    second on average, ASR_CLIENT_REQUEST_BURST at once; past it: 429 ``rate_limited`` with Retry-After,
    and a stream handshake is refused the same way."""

    PREFIX = "/v1/"

    def __init__(self, app: ASGIApp, rate: float, burst: int, keyed: bool, on_refused: Callable[[], None]):
        self.app, self.rate, self.burst, self.keyed, self.on_refused = app, rate, burst, keyed, on_refused
        self.buckets: dict[str, TokenBucket] = {}

    def _bucket(self, client: str) -> TokenBucket:
        if (bucket := self.buckets.get(client)) is None:
            if len(self.buckets) >= MAX_TRACKED_CLIENTS:  # a full bucket is what a new one would be: forget it
                self.buckets = {c: b for c, b in self.buckets.items() if not b.full()}
                if len(self.buckets) >= MAX_TRACKED_CLIENTS:  # that many busy clients (IPv6 makes addresses cheap): the oldest half goes
                    self.buckets = dict(list(self.buckets.items())[MAX_TRACKED_CLIENTS // 2 :])
            bucket = self.buckets[client] = TokenBucket(self.rate, self.burst)
        return bucket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        bucket = self._bucket(client_identity(scope, self.keyed))
        if bucket.allow():
            await self.app(scope, receive, send)
            return
        self.on_refused()
        error = APIError(429, "rate_limited", f"more than {self.rate:g} requests per second from this client "
                         "(ASR_CLIENT_MAX_REQUESTS_PER_S); slow down", {"Retry-After": str(max(1, math.ceil(bucket.retry_after_s())))})
        if scope["type"] == "websocket":
            await WebSocket(scope, receive, send).send_denial_response(error.response())
        else:
            await refuse_before_body(error, receive, send)
