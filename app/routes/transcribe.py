"""REST batch transcription: ``POST /v1/transcribe``, and OpenAI's ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.auth import tenant_of
from app.errors import APIError
from app.formats import ResponseFormat, service_json, to_srt, to_vtt, verbose_json
from app.limits import admission_refusal
from app.service import ServedModel, Service
from app.webhook import transcript_payload
from configs.settings import OPENAI_ALIAS
from workers.engine import MAX_BEAM_SIZE, OptionError, Overloaded, Priority, StageError, StageStopped, Transcript, WindowOptions

router = APIRouter(tags=["transcription"])
CONTEXT_HELP = "Condition each window of a long file on the text before it (Whisper's long-form context); unset: ASR_CONDITION_ON_PREVIOUS_TEXT."
LANGUAGE_HELP = "Language code or name (de, german); unset: a multilingual model detects it, the English-only default model takes 'en'."


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    if (unavailable := service.unavailable()) is not None:
        raise unavailable
    return service


def _options(request: Request, served: ServedModel, language: str | None, prompt: str | None, **options: Any) -> WindowOptions:
    """The request's options (those of Engine.options), normalised once: nothing in them can fail the batch they join."""
    try:
        return served.engine.options(language, prompt, tenant_of(request.scope), **options)
    except OptionError as exc:
        raise APIError(400, exc.code, str(exc)) from exc


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects: with the body read, the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _transcribe(request: Request, service: Service, served: ServedModel, data: bytes, options: WindowOptions) -> Transcript:
    audio = await service.decoder.decode(data)
    work = asyncio.ensure_future(served.engine.transcribe(audio, options, Priority.BULK))
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
    except StageStopped as exc:
        raise APIError(503, "shutting_down", "the server shut down before this transcript was finished; retry it", {"Retry-After": "5"}) from exc
    service.metrics.audio_seconds.labels(served.name, "rest").inc(transcript.duration_s)
    if service.webhook is not None:
        service.webhook.offer(transcript_payload(request.state.request_id, served.name, transcript.text, transcript.duration_s,
                                                 [{"start": s.start, "end": s.end, "text": s.text} for s in transcript.segments]))
    return transcript


def _request_id(request: Request) -> str:
    """The id a webhook delivery names this request by; the client reads it in X-Request-Id."""
    request.state.request_id = uuid.uuid4().hex
    return request.state.request_id


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
    language: Annotated[str | None, Query(max_length=16, description=LANGUAGE_HELP)] = None,
    prompt: Annotated[str | None, Query(description="Text that conditions the decoder: names, spellings, style.")] = None,
    model: Annotated[str | None, Query(max_length=64, description="A served model's name (GET /v1/models); unset: the default model.")] = None,
    beam_size: Annotated[int | None, Query(ge=1, le=MAX_BEAM_SIZE, description="Beams of each window's search; 1: greedy; unset: ASR_BEAM_SIZE.")] = None,
    temperature: Annotated[float, Query(ge=0, le=1, description="The first temperature of each window's decoding; a window whose result fails "
                                        "Whisper's quality rules is decoded again at the next of the schedule (see ASR_TEMPERATURE_INCREMENT_ON_FALLBACK).")] = 0.0,
    condition_on_previous_text: Annotated[bool | None, Query(description=CONTEXT_HELP)] = None,
    word_timestamps: Annotated[bool, Query(description="Each segment's words with their start, end and probability (aligned on the "
                                           "model's cross-attention, as openai-whisper's word timestamps).")] = False,
    task: Annotated[Literal["transcribe", "translate"], Query(description="translate: the text in English (multilingual models only).")] = "transcribe",
) -> JSONResponse:
    service = _service(request)
    served = service.model(model)
    options = _options(request, served, language, prompt, beam_size=beam_size, temperature=temperature,
                       condition_on_previous_text=condition_on_previous_text, word_timestamps=word_timestamps, task=task)
    request_id = _request_id(request)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing_file", "the multipart body has no file field named 'file'")
        data = await upload.read()
    else:
        data = await request.body()
    transcript = await _transcribe(request, service, served, data, options)
    return JSONResponse(service_json(transcript, served.name), headers={"X-Request-Id": request_id})


OPENAI_RESPONSES = {200: {
    "description": "json and verbose_json: JSON; text and srt: text/plain; vtt: text/vtt",
    "content": {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}},
}}
OPENAI_MODEL_HELP = "A served model's name (GET /v1/models); 'whisper-1' means the default model."
TEMPERATURE_HELP = ("As OpenAI's: 0 decodes at 0 and falls back to higher temperatures while a window fails Whisper's "
                    "quality rules; above 0 starts the schedule there.")
BEAM_HELP = "Not OpenAI's: beams of each window's search; unset: ASR_BEAM_SIZE."


def _openai_model(request: Request, model: str) -> tuple[Service, ServedModel]:
    service = _service(request)
    served = service.model(None if model == OPENAI_ALIAS else model)
    if served.name != service.settings.default_model_name and (refusal := admission_refusal(service, served.name)) is not None:
        raise refusal  # admission, before the form was read, could only decide for the default model
    return service, served


def _openai_answer(transcript: Transcript, response_format: ResponseFormat, granularities: set[str], task: str, headers: dict) -> Response:
    if response_format is ResponseFormat.text:
        return PlainTextResponse(transcript.text, headers=headers)
    if response_format is ResponseFormat.srt:
        return PlainTextResponse(to_srt(transcript.segments), headers=headers)
    if response_format is ResponseFormat.vtt:
        return PlainTextResponse(to_vtt(transcript.segments), media_type="text/vtt", headers=headers)
    if response_format is ResponseFormat.verbose_json:
        return JSONResponse(verbose_json(transcript, granularities, task), headers=headers)
    return JSONResponse({"text": transcript.text}, headers=headers)


@router.post("/v1/audio/transcriptions", summary="OpenAI-compatible transcription", responses=OPENAI_RESPONSES)
async def openai_transcriptions(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio file: wav, flac, mp3, ogg/opus, m4a, webm, ...")],
    model: Annotated[str, Form(description=OPENAI_MODEL_HELP)] = OPENAI_ALIAS,
    language: Annotated[str | None, Form(max_length=16, description=LANGUAGE_HELP)] = None,
    prompt: Annotated[str | None, Form()] = None,
    temperature: Annotated[float, Form(ge=0, le=1, description=TEMPERATURE_HELP)] = 0.0,
    response_format: Annotated[ResponseFormat, Form()] = ResponseFormat.json,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    beam_size: Annotated[int | None, Form(ge=1, le=MAX_BEAM_SIZE, description=BEAM_HELP)] = None,
    condition_on_previous_text: Annotated[bool | None, Form(description="Not OpenAI's: " + CONTEXT_HELP)] = None,
) -> Response:
    service, served = _openai_model(request, model)
    granularities = set(timestamp_granularities or ["segment"])
    if granularities - {"segment", "word"}:
        raise APIError(400, "unsupported_granularity", "timestamp_granularities[] takes segment and word")
    words = "word" in granularities and response_format is ResponseFormat.verbose_json  # the only format that has them
    options = _options(request, served, language, prompt, beam_size=beam_size, temperature=temperature,
                       condition_on_previous_text=condition_on_previous_text, word_timestamps=words)
    headers = {"X-Request-Id": _request_id(request)}
    transcript = await _transcribe(request, service, served, await file.read(), options)
    return _openai_answer(transcript, response_format, granularities, "transcribe", headers)


@router.post("/v1/audio/translations", summary="OpenAI-compatible translation into English (multilingual models)",
             responses=OPENAI_RESPONSES)
async def openai_translations(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio file: wav, flac, mp3, ogg/opus, m4a, webm, ...")],
    model: Annotated[str, Form(description=OPENAI_MODEL_HELP + " An English-only model answers 400 unsupported_task.")] = OPENAI_ALIAS,
    prompt: Annotated[str | None, Form(description="Text in English that conditions the decoder.")] = None,
    temperature: Annotated[float, Form(ge=0, le=1, description=TEMPERATURE_HELP)] = 0.0,
    response_format: Annotated[ResponseFormat, Form()] = ResponseFormat.json,
    beam_size: Annotated[int | None, Form(ge=1, le=MAX_BEAM_SIZE, description=BEAM_HELP)] = None,
    condition_on_previous_text: Annotated[bool | None, Form(description="Not OpenAI's: " + CONTEXT_HELP)] = None,
) -> Response:
    service, served = _openai_model(request, model)
    # the spoken language is detected, as OpenAI's endpoint (which takes none) does
    options = _options(request, served, None, prompt, beam_size=beam_size, temperature=temperature,
                       condition_on_previous_text=condition_on_previous_text, task="translate")
    headers = {"X-Request-Id": _request_id(request)}
    transcript = await _transcribe(request, service, served, await file.read(), options)
    return _openai_answer(transcript, response_format, {"segment"}, "translate", headers)
