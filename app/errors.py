"""Every error the API returns has one JSON shape: ``{"error": {"code": ..., "message": ...}}``.

Messages say what was wrong and what to do; no stack trace or internal path ever reaches a client.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.code, self.message), self.status, headers=self.headers)


INTERNAL_ERROR = APIError(500, "internal_error", "the server failed on this request; it has been logged")
SPOOL_FULL = APIError(507, "insufficient_storage", "the server's temporary directory is full (an upload past 1 MB is spooled there while it is "
                      "read); nothing was kept: retry later", {"Retry-After": "60"})
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or what it was raised from, is a write refused for want of space (or a file-size limit)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body("invalid_request", problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if _disk_full(exc):  # FastAPI answers a form it could not spool with a 400 of its own
            return _spool_full(request, exc)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left, or the server cut it off (app.connections)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return INTERNAL_ERROR.response()

    @app.exception_handler(OSError)  # handled here, not re-raised to the server as what reaches the catch-all is
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        return _spool_full(request, exc) if _disk_full(exc) else await _unexpected(request, exc)


def _spool_full(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: the upload could not be spooled to the temporary directory (%s); free space there (TMPDIR)",
              request.method, request.url.path, exc.__cause__ or exc)
    return SPOOL_FULL.response()
