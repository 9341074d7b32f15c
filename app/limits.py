"""Request body limit, enforced while the body streams in, before any of it is parsed."""

from __future__ import annotations

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
