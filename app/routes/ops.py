"""Operator endpoints: liveness, readiness, Prometheus metrics, the pipeline's state, the models served."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from configs.settings import OPENAI_MODEL_NAMES

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process is up and serving HTTP")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up; 503 while loading, after a failed load, and while shutting down")
async def readyz(request: Request) -> JSONResponse:
    service = request.app.state.service
    if (unavailable := service.unavailable()) is not None:
        return unavailable.response()
    return JSONResponse({"status": "ready", "models": list(service.models), "default_model": service.settings.default_model_name})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", summary="The models served: pass one's id as `model` to choose it (OpenAI's list format)")
async def models(request: Request) -> JSONResponse:
    service = request.app.state.service
    settings = service.settings
    aliases = [*settings.model_aliases, *(n for n in OPENAI_MODEL_NAMES if n not in settings.model_aliases)]
    return JSONResponse({"object": "list", "data": [
        {**served.describe(), "default": name == settings.default_model_name,
         "aliases": [alias for alias in aliases if settings.model_name(alias) == name]}
        for name, served in service.models.items()]})


@router.get("/v1/pipeline", summary="The operator's view of one model's pipeline: each stage's pool, queue, latency, utilization and pressure; the bottleneck, budgets and the allocator's last decisions")
async def pipeline(request: Request, model: Annotated[str | None, Query(max_length=64, description="A served model's name; unset: the default model.")] = None) -> JSONResponse:
    service = request.app.state.service
    served = service.model(model)  # answers while the server drains too: operators watch it empty
    profile = served.profiler.profile()
    allocator = served.allocator
    engine = served.engine.snapshot()
    return JSONResponse({
        **profile.to_json(),
        "engine": {"windows_in_flight": engine.windows_in_flight, "windows_waiting": engine.windows_waiting,
                   "seconds_per_window": round(engine.seconds_per_window, 3), "predicted_wait_s": round(engine.predicted_wait_s, 3),
                   "streams_open": engine.streams_open, "worker_restarts": {s.name: s.restarts for s in engine.stages},
                   "encoder_fill": engine.encoder_fill},
        "budgets": allocator.budgets(),
        "allocator": {
            "enabled": allocator.enabled, **asdict(allocator.policy),
            "decisions": [asdict(d) for d in reversed(allocator.decisions)],  # newest first
        },
        "model": served.name,
    })
