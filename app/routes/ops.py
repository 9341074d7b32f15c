"""Operator endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import error_body

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process is up and serving HTTP")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up, else 503")
async def readyz(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service.ready:
        return JSONResponse({"status": "ready", "model": service.model_name})
    if service.load_error:
        return JSONResponse(error_body("model_failed", f"the model could not be loaded: {service.load_error}"), 503)
    return JSONResponse(error_body("loading", "the model is loading"), 503, headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/pipeline", summary="The operator's view: each stage's pool, queue, latency, utilization and pressure; the bottleneck, budgets and the allocator's last decisions")
async def pipeline(request: Request) -> JSONResponse:
    service = request.app.state.service
    if not service.ready:
        return JSONResponse(error_body("loading", "the model is loading"), 503, headers={"Retry-After": "5"})
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
