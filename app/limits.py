"""Limits applied before a request body is read: its size (enforced while it streams in) and admission."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body


def _message(max_bytes: int) -> str:
    return f"the request body is over the limit of {max_bytes} bytes (ASR_MAX_UPLOAD_BYTES)"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body; an HTTPException, so parsers pass it on and the handler answers 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, _message(max_bytes))


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(error_body("payload_too_large", _message(self.max_bytes)), 413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


class Admission:
    """Refuses transcription requests with 429 before their body is read, once the pipeline is backed up:
    more windows waiting in its queues than ``max_waiting``, or the oldest waiting longer than
    ``max_age_s``. Reading a 50 MB upload only to refuse it would waste the time the backlog needs."""

    PATHS = ("/v1/transcribe", "/v1/audio/transcriptions")

    def __init__(self, app: ASGIApp, backlog: Callable[[], tuple[int, float]], max_waiting: int, max_age_s: float,
                 on_refuse: Callable[[str], None]):
        self.app = app
        self.backlog = backlog  # (windows waiting in all stage queues, oldest wait in seconds)
        self.max_waiting = max_waiting
        self.max_age_s = max_age_s
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.PATHS:
            waiting, oldest_s = self.backlog()
            reason = None
            if waiting > self.max_waiting:
                reason = f"{waiting} windows are waiting, over the limit of {self.max_waiting} (ASR_ADMISSION_MAX_WAITING)"
            elif oldest_s > self.max_age_s:
                reason = f"the oldest window has waited {oldest_s:.1f} s, over the limit of {self.max_age_s:g} s (ASR_ADMISSION_MAX_AGE_S)"
            if reason is not None:
                self.on_refuse("backlog")
                # the connection is closed after the answer: the unread body must not be taken for the next request
                response = JSONResponse(error_body("overloaded", f"the service is at capacity: {reason}; retry later"), 429,
                                        headers={"Retry-After": str(max(1, round(oldest_s or 1))), "Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
