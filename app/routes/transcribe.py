"""REST batch transcription: ``POST /v1/transcribe`` and OpenAI's ``POST /v1/audio/transcriptions``."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.errors import APIError
from app.formats import ResponseFormat, service_json, to_srt, to_vtt, verbose_json
from app.limits import backlog_refusal
from app.service import ServedModel, Service
from configs.settings import OPENAI_ALIAS
from workers.pipeline import Overloaded, Transcript
from workers.scheduler import Priority
from workers.stages import StageError

router = APIRouter(tags=["transcription"])


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    if (unavailable := service.unavailable()) is not None:
        raise unavailable
    return service


def _check_language(served: ServedModel, language: str | None) -> str:
    language = (language or "en").lower()
    if not served.transcribes(language):
        raise APIError(400, "unsupported_language", f"the model {served.name} does not transcribe language {language!r}")
    return language


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects: with the body read, the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _transcribe(request: Request, service: Service, served: ServedModel, data: bytes, language: str,
                      prompt: str | None) -> Transcript:
    audio = await service.decoder.decode(data)
    work = asyncio.ensure_future(served.pipeline.transcribe(audio, priority=Priority.BULK, language=language, prompt=prompt))
    gone = asyncio.ensure_future(_client_gone(request))
    service.transcriptions.add(work)  # a drain that runs out of time cancels it
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        service.transcriptions.discard(work)
        client_gone = gone.done()
        gone.cancel()
        if not work.done():  # the client has gone (or we are cancelled): its windows still queued are dropped
            work.cancel()
    if client_gone:
        service.metrics.rejected.labels("client_gone").inc()
        raise APIError(499, "client_closed_request", "the client disconnected before the transcript was ready")
    if work.cancelled():
        raise APIError(503, "shutting_down", "the server shut down before this transcript was finished; retry it", {"Retry-After": "5"})
    try:
        transcript = work.result()
    except Overloaded as exc:
        service.metrics.rejected.labels("queue_full").inc()
        raise APIError(429, "overloaded", f"the service is at capacity ({exc}); retry after a few seconds", {"Retry-After": "2"}) from exc
    except StageError as exc:
        raise APIError(500, "model_error", str(exc)) from exc
    service.metrics.audio_seconds.labels(served.name, "rest").inc(transcript.duration_s)
    return transcript


@router.post(
    "/v1/transcribe",
    summary="Transcribe an audio file (multipart field 'file', or the raw file as the body)",
    openapi_extra={"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}},
)
async def transcribe(
    request: Request,
    language: Annotated[str | None, Query(max_length=16, description="Language code; the English-only default model takes 'en'.")] = None,
    prompt: Annotated[str | None, Query(description="Text that conditions the decoder: names, spellings, style.")] = None,
    model: Annotated[str | None, Query(max_length=64, description="A served model's name (GET /v1/models); unset: the default model.")] = None,
) -> JSONResponse:
    service = _service(request)
    served = service.model(model)
    language = _check_language(served, language)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing_file", "the multipart body has no file field named 'file'")
        data = await upload.read()
    else:
        data = await request.body()
    transcript = await _transcribe(request, service, served, data, language, prompt)
    return JSONResponse(service_json(transcript, served.name, language))


@router.post("/v1/audio/transcriptions", summary="OpenAI-compatible transcription", responses={200: {
    "description": "json and verbose_json: JSON; text and srt: text/plain; vtt: text/vtt",
    "content": {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}},
}})
async def openai_transcriptions(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio file: wav, flac, mp3, ogg/opus, m4a, webm, ...")],
    model: Annotated[str, Form(description="A served model's name (GET /v1/models); 'whisper-1' means the default model.")] = OPENAI_ALIAS,
    language: Annotated[str | None, Form(max_length=16)] = None,
    prompt: Annotated[str | None, Form()] = None,
    temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
    response_format: Annotated[ResponseFormat, Form()] = ResponseFormat.json,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
) -> Response:
    service = _service(request)
    served = service.model(None if model == OPENAI_ALIAS else model)
    if served.name != service.settings.default_model_name and (refusal := backlog_refusal(service, served)) is not None:
        raise refusal  # admission, before the form was read, could only check the default model
    if temperature != 0:
        raise APIError(400, "unsupported_temperature", "only greedy decoding is served: send temperature 0")
    if set(timestamp_granularities or []) - {"segment"}:
        raise APIError(400, "unsupported_granularity", "only timestamp_granularities[]=segment is served")
    language = _check_language(served, language)
    transcript = await _transcribe(request, service, served, await file.read(), language, prompt)
    if response_format is ResponseFormat.text:
        return PlainTextResponse(transcript.text)
    if response_format is ResponseFormat.srt:
        return PlainTextResponse(to_srt(transcript.segments))
    if response_format is ResponseFormat.vtt:
        return PlainTextResponse(to_vtt(transcript.segments), media_type="text/vtt")
    if response_format is ResponseFormat.verbose_json:
        return JSONResponse(verbose_json(transcript, "english" if language == "en" else language))
    return JSONResponse({"text": transcript.text})
