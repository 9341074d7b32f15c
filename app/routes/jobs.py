"""Durable asynchronous transcription: ``/v1/jobs``. A job is submitted (202), runs in its own lane, survives
restarts, and is read back, in any of the transcript formats, when it is done. With API keys on, a key
sees and touches only its own jobs (another's answer 404, as one that does not exist)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from app.auth import tenant_of
from app.errors import APIError
from app.formats import ResponseFormat, service_json
from app.jobs.runner import job_summary, window_from_json
from app.jobs.store import UNFINISHED, JobRecord, StorageFull
from app.jobs.webhooks import webhook_refusal
from app.routes.transcribe import CONTEXT_HELP, LANGUAGE_HELP, _openai_answer, _options, _service
from app.service import JobLane, Service
from configs.settings import comma_list
from workers.engine import MAX_BEAM_SIZE, Transcript

router = APIRouter(tags=["jobs"])
PAGE_MAX = 100


def _lane(service: Service) -> JobLane:
    if service.jobs is None:
        raise APIError(503, "jobs_unavailable", service.jobs_unavailable or "the job store is not open yet; retry shortly", {"Retry-After": "5"})
    return service.jobs


def _store_full(exc: StorageFull, kept: str) -> APIError:
    return APIError(507, "insufficient_storage", f"{exc}; {kept}: free space under ASR_DATA_DIR and retry", {"Retry-After": "60"})


async def _job(request: Request, job_id: str) -> tuple[JobLane, JobRecord]:
    lane = _lane(request.app.state.service)
    job = await lane.store.get(job_id, tenant_of(request.scope))
    if job is None:
        raise APIError(404, "job_not_found", f"no job {job_id!r} (GET /v1/jobs lists yours)")
    return lane, job


@router.post("/v1/jobs", status_code=202, summary="Submit a file for durable transcription (202; poll GET /v1/jobs/{id}, or name a webhook_url)")
async def submit_job(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio file: wav, flac, mp3, ogg/opus, m4a, webm, ... up to ASR_JOB_MAX_AUDIO_S.")],
    model: Annotated[str | None, Form(max_length=64, description="A served model's name or alias (GET /v1/models); unset: the default model.")] = None,
    language: Annotated[str | None, Form(max_length=16, description=LANGUAGE_HELP)] = None,
    prompt: Annotated[str | None, Form(max_length=2000, description="Text that conditions the decoder: names, spellings, style.")] = None,
    beam_size: Annotated[int | None, Form(ge=1, le=MAX_BEAM_SIZE, description="Beams of each window's search; unset: ASR_BEAM_SIZE.")] = None,
    temperature: Annotated[float, Form(ge=0, le=1, description="The first temperature of each window's decoding (then Whisper's fallback).")] = 0.0,
    condition_on_previous_text: Annotated[bool | None, Form(description=CONTEXT_HELP)] = None,
    word_timestamps: Annotated[bool, Form(description="Each segment's words with their start, end and probability.")] = False,
    task: Annotated[Literal["transcribe", "translate"], Form(description="translate: the text in English (multilingual models only).")] = "transcribe",
    webhook_url: Annotated[str | None, Form(max_length=2000, description="POSTed the job's summary, signed (ASR-Signature), when it ends.")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="The same key with the same request returns the same job.")] = None,
) -> JSONResponse:
    service = _service(request)
    lane = _lane(service)
    served = service.model(model)
    settings, tenant = service.settings, tenant_of(request.scope)
    options = {"language": language, "prompt": prompt, "tenant": tenant, "beam_size": beam_size, "temperature": temperature,
               "condition_on_previous_text": condition_on_previous_text, "word_timestamps": word_timestamps, "task": task}
    _options(request, served, **{k: v for k, v in options.items() if k != "tenant"})  # 400 now for what the model cannot do
    if webhook_url is not None and (why := webhook_refusal(webhook_url, settings.job_webhook_secret, comma_list(settings.job_webhook_allowed_hosts))):
        raise APIError(400, "invalid_webhook_url", why)
    data = await file.read()
    request_sha256 = hashlib.sha256(data + json.dumps([served.name, options, webhook_url], sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None and (existing := await lane.store.by_key(tenant, idempotency_key)) is not None:
        return _submitted(existing, request_sha256)
    await lane.admit()
    audio = await lane.decoder.decode(data)
    job = JobRecord(id="job_" + uuid.uuid4().hex, tenant=tenant, status="queued", created_at=time.time(), model=served.name,
                    model_sha256=served.engine.info().weights_sha256, options=options, audio_bytes=0, duration_s=round(len(audio) / 16000, 3),
                    windows_total=len(served.engine.plan(audio)), request_sha256=request_sha256, idempotency_key=idempotency_key,
                    webhook_url=webhook_url)
    try:
        job.audio_bytes = await lane.store.write_audio(job.id, audio)
        stored = await lane.store.insert(job)
    except StorageFull as exc:
        await lane.store.drop_audio(job.id)
        raise _store_full(exc, "nothing was stored") from exc
    if stored is not job:  # the same key was used meanwhile
        await lane.store.drop_audio(job.id)
        return _submitted(stored, request_sha256)
    lane.runner.submitted()
    return _submitted(job, request_sha256)


def _submitted(job: JobRecord, request_sha256: str) -> JSONResponse:
    if job.request_sha256 != request_sha256:
        raise APIError(409, "idempotency_key_reused", "this Idempotency-Key was used for another request (another file or other options): "
                       "use a new key for a new request")
    return JSONResponse({"id": job.id, "object": "transcription.job", "status": job.status, "created_at": job.created_at}, 202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs", summary="Your jobs, newest first")
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="Jobs per page.")] = 20,
    after: Annotated[str | None, Query(max_length=64, description="The last id of the page before (its next_after).")] = None,
) -> JSONResponse:
    lane = _lane(request.app.state.service)
    tenant = tenant_of(request.scope)
    before = None
    if after is not None:
        if (anchor := await lane.store.get(after, tenant)) is None:
            raise APIError(404, "job_not_found", f"no job {after!r} to page after")
        before = (anchor.created_at, anchor.id)
    jobs = await lane.store.page(tenant, limit + 1, before)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JSONResponse({"object": "list", "data": [job_summary(j, result=False) for j in jobs],
                         "has_more": more, "next_after": jobs[-1].id if more else None})


@router.get("/v1/jobs/{job_id}", summary="A job: its status, progress, model and, once succeeded, its result")
async def get_job(request: Request, job_id: str) -> JSONResponse:
    _, job = await _job(request, job_id)
    return JSONResponse(job_summary(job))


@router.get("/v1/jobs/{job_id}/result", summary="A succeeded job's transcript in a format of your choice")
async def job_result(
    request: Request, job_id: str,
    response_format: Annotated[ResponseFormat, Query(description="json: the /v1/transcribe JSON; text, srt, vtt, verbose_json: as OpenAI's.")] = ResponseFormat.json,
) -> Response:
    lane, job = await _job(request, job_id)
    if job.status != "succeeded":
        why = f": {job.error['message']}" if job.error else ""
        raise APIError(409, "job_not_succeeded", f"job {job.id} is {job.status}{why}; its result exists once it has succeeded",
                       {"Retry-After": "5"} if job.status in UNFINISHED else None)
    windows = [window_from_json(window) for _, window in await lane.store.windows(job.id)]
    transcript = Transcript([segment for window in windows for segment in window.segments], job.duration_s, job.result["language"])
    if response_format is ResponseFormat.json:
        return JSONResponse(service_json(transcript, job.model))
    return _openai_answer(transcript, response_format, {"segment", "word"} if job.options["word_timestamps"] else {"segment"},
                          job.options["task"], {})


@router.delete("/v1/jobs/{job_id}", summary="Cancel a job that has not ended, and remove it with its audio and result")
async def delete_job(request: Request, job_id: str) -> JSONResponse:
    lane, job = await _job(request, job_id)
    if job.status in UNFINISHED:
        await lane.runner.cancel(job.id)
        job = await lane.store.get(job.id) or job
        if job.status in UNFINISHED:  # queued, never started: nothing ran
            job.status, job.finished_at = "cancelled", time.time()
    try:
        await lane.store.delete(job.id)
    except StorageFull as exc:
        raise _store_full(exc, "the job is kept") from exc
    return JSONResponse({**job_summary(job, result=False), "deleted": True})
