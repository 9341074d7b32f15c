"""Optional API keys, for HTTP and WebSocket alike, checked before anything else runs.

With ``ASR_API_KEYS`` set, every request outside ``ASR_AUTH_OPEN_PATHS`` (exact paths, or prefixes ending
in ``*``) must carry one of the keys:
``Authorization: Bearer KEY``, or for a browser's WebSocket (which cannot set headers) an ``api_key``
query parameter. Keys are compared in constant time, so response timing does not leak them.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from app.errors import error_body


def presented_key(scope: Scope) -> bytes | None:
    """The key a request carries, checked or not."""
    authorization = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and token:
        return token.strip()
    if scope["type"] == "websocket":
        values = parse_qs(scope.get("query_string", b"").decode()).get("api_key")
        return values[0].encode() if values else None
    return None


def tenant_of(scope: Scope) -> str:
    """Who sent the request, for ASR_ENCODER_PACKING=per_key: a digest of its API key ("" without one); the
    key itself never goes further."""
    key = presented_key(scope)
    return hashlib.sha256(key).hexdigest()[:16] if key else ""


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: list[str], open_paths: list[str]):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = {path for path in open_paths if not path.endswith("*")}
        self.open_prefixes = tuple(path.removesuffix("*") for path in open_paths if path.endswith("*"))

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def _allowed(self, scope: Scope) -> bool:
        presented = presented_key(scope)
        # every key is compared, so the time taken does not say which one came close
        return presented is not None and sum(hmac.compare_digest(presented, key) for key in self.keys) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._open(scope["path"]) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        how = "send 'Authorization: Bearer <key>'" + (" or the query parameter api_key" if scope["type"] == "websocket" else "")
        response = JSONResponse(error_body("unauthorized", f"a valid API key is required: {how}"), 401,
                                headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "websocket":
            await WebSocket(scope, receive, send).send_denial_response(response)
        else:
            await response(scope, receive, send)
