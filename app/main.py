"""The FastAPI app: lifespan (load, serve, stop), middleware and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from app.auth import ApiKeyAuth
from app.errors import install_error_handlers
from app.limits import Admission, BodySizeLimit, ClientRateLimit
from app.routes import jobs, ops, page, realtime, stream, transcribe
from app.service import Service
from configs import Settings
from configs.settings import comma_list

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the server listens while the model loads: /healthz answers, /readyz says 503 until it is warm
        loading = asyncio.create_task(service.load())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(BaseException):
                await loading
            await service.close()

    app = FastAPI(title="ASR service", version="0.1.0", lifespan=lifespan,
                  description="Streaming and batch speech recognition on a self-tuning four-stage Whisper pipeline.")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes, per_path={"/v1/jobs": settings.job_max_upload_bytes})
    app.add_middleware(Admission, service=service)
    service.metrics.watch_endpoints(Admission.PATHS)
    if settings.client_max_requests_per_s:  # inside the keys: a caller without one is refused before it spends a request
        app.add_middleware(ClientRateLimit, rate=settings.client_max_requests_per_s, burst=settings.client_request_burst,
                           keyed=bool(settings.api_keys), on_refused=service.metrics.rejected.labels("client_rate").inc)
    if settings.api_keys:  # nothing past this runs for a caller without a key
        app.add_middleware(ApiKeyAuth, keys=comma_list(settings.api_keys), open_paths=comma_list(settings.auth_open_paths))
    if settings.cors_origins:  # outside the keys: a browser's preflight carries none
        app.add_middleware(CORSMiddleware, allow_origins=comma_list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def count_requests(request: Request, call_next) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"  # raw paths would explode label cardinality
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - started)
        return response
    install_error_handlers(app)
    app.include_router(transcribe.router)
    app.include_router(stream.router)
    app.include_router(realtime.router)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    return app
