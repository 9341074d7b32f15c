"""Operator endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import APIError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process is up and serving HTTP")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up; 503 while loading, after a failed load, and while shutting down")
async def readyz(request: Request) -> JSONResponse:
    service = request.app.state.service
    if (unavailable := service.unavailable()) is not None:
        return unavailable.response()
    return JSONResponse({"status": "ready", "model": service.model_name})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/pipeline", summary="The operator's view: each stage's pool, queue, latency, utilization and pressure; the bottleneck, budgets and the allocator's last decisions")
async def pipeline(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service.pipeline is None:
        return APIError(503, "loading", "the model is loading", {"Retry-After": "5"}).response()
    profile = service.profiler.profile()
    allocator = service.allocator
    return JSONResponse({
        **profile.to_json(),
        "budgets": allocator.budgets(),
        "allocator": {
            "enabled": allocator.enabled, **asdict(allocator.policy),
            "decisions": [asdict(d) for d in reversed(allocator.decisions)],  # newest first
        },
        "model": service.model_name,
    })
