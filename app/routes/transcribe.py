"""REST batch transcription: ``POST /v1/transcribe``, and OpenAI's ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.auth import tenant_of
from app.errors import INTERNAL_ERROR, APIError, error_body
from app.formats import ResponseFormat, service_json, sse_event, to_srt, to_vtt, token_usage, verbose_json
from app.limits import admission_refusal
from app.service import ServedModel, Service
from app.webhook import transcript_payload
from configs.settings import OPENAI_ALIAS
from workers.engine import MAX_BEAM_SIZE, FileWindow, OptionError, Overloaded, Priority, StageError, StageStopped, Transcript, WindowOptions

log = logging.getLogger(__name__)
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


class FileTranscription:
    """One request's file through the engine, started at once: its work (which a drain that runs out of time
    cancels), the windows it has made final, in order, and a watch on the client: when it disconnects, the
    work is cancelled and its windows still queued are dropped. :meth:`close` it whatever happens."""

    def __init__(self, request: Request, service: Service, served: ServedModel, audio: np.ndarray, options: WindowOptions):
        self.request, self.service, self.served = request, service, served
        self._final: asyncio.Queue[FileWindow | None] = asyncio.Queue()  # None: the work has ended
        self.work = asyncio.ensure_future(served.engine.transcribe(audio, options, Priority.BULK, self._final.put_nowait))
        self.work.add_done_callback(lambda _: self._final.put_nowait(None))
        self.gone = asyncio.ensure_future(_client_gone(request))
        self.gone.add_done_callback(lambda _: self.work.cancel())
        service.transcriptions.add(self.work)

    @classmethod
    async def start(cls, request: Request, service: Service, served: ServedModel, data: bytes, options: WindowOptions) -> FileTranscription:
        """Decode an upload (400 for what is not audio) and start its work."""
        return cls(request, service, served, await service.decoder.decode(data), options)

    async def next_window(self) -> FileWindow | None:
        """The next window made final; None after the last (then :meth:`transcript` says how the work ended)."""
        return await self._final.get()

    async def transcript(self) -> Transcript:
        """The whole transcript, delivered to the webhook, or the APIError that answers why there is none."""
        await asyncio.wait({self.work})
        if self.gone.done():
            self.service.metrics.rejected.labels("client_gone").inc()
            raise APIError(499, "client_closed_request", "the client disconnected before the transcript was ready")
        if self.work.cancelled():
            raise APIError(503, "shutting_down", "the server shut down before this transcript was finished; retry it", {"Retry-After": "5"})
        try:
            transcript = self.work.result()
        except Overloaded as exc:
            self.service.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, "overloaded", f"the service is at capacity ({exc}); retry after a few seconds", {"Retry-After": "2"}) from exc
        except StageError as exc:
            raise APIError(500, "model_error", str(exc)) from exc
        except StageStopped as exc:
            raise APIError(503, "shutting_down", "the server shut down before this transcript was finished; retry it", {"Retry-After": "5"}) from exc
        self.service.metrics.audio_seconds.labels(self.served.name, "rest").inc(transcript.duration_s)
        if self.service.webhook is not None:
            self.service.webhook.offer(transcript_payload(self.request.state.request_id, self.served.name, transcript.text, transcript.duration_s,
                                                          [{"start": s.start, "end": s.end, "text": s.text} for s in transcript.segments]))
        return transcript

    def close(self) -> None:
        self.service.transcriptions.discard(self.work)
        self.gone.cancel()
        self.work.cancel()  # unless it is done: the client has gone, or we are cancelled


async def _transcribe(request: Request, service: Service, served: ServedModel, data: bytes, options: WindowOptions) -> Transcript:
    work = await FileTranscription.start(request, service, served, data, options)
    try:
        return await work.transcript()
    finally:
        work.close()


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


SSE_EVENT = {  # one event of the stream (before OpenAPI 3.2, an event stream's schema is that of each event)
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"enum": ["transcript.text.delta", "transcript.text.done", "error"]},
                   "data": {"type": "string", "contentMediaType": "application/json",
                            "description": "The event in JSON, its type again: {type, delta}; {type, text, usage}; {type, error: {code, message}}."}},
}
OPENAI_RESPONSES = {200: {
    "description": "json and verbose_json: JSON; text and srt: text/plain; vtt: text/vtt",
    "content": {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}},
}}
STREAMED_RESPONSES = {200: {
    "description": OPENAI_RESPONSES[200]["description"] + "; with stream=true: text/event-stream",
    "content": {**OPENAI_RESPONSES[200]["content"], "text/event-stream": {"schema": SSE_EVENT}},
}}
OPENAI_MODEL_HELP = ("A served model's name or alias (GET /v1/models); 'whisper-1', 'gpt-4o-transcribe' and 'gpt-4o-mini-transcribe' mean the "
                     "default model unless ASR_MODEL_ALIASES maps them.")
TEMPERATURE_HELP = ("As OpenAI's: 0 decodes at 0 and falls back to higher temperatures while a window fails Whisper's "
                    "quality rules; above 0 starts the schedule there.")
BEAM_HELP = "Not OpenAI's: beams of each window's search; unset: ASR_BEAM_SIZE."
STREAM_HELP = ("Server-Sent Events, as OpenAI's: transcript.text.delta with each window's text (up to 30 s of audio) as soon as "
               "it is final, then transcript.text.done with the whole text; response_format json or text only.")
STREAMED_FORMATS = (ResponseFormat.json, ResponseFormat.text)  # OpenAI's: the formats that are only text


def _openai_model(request: Request, model: str) -> tuple[Service, ServedModel]:
    service = _service(request)
    served = service.model(model)  # aliases, OpenAI's model names among them, are the service's to resolve
    if served.name != service.settings.default_model_name and (refusal := admission_refusal(service, served.name)) is not None:
        raise refusal  # admission, before the form was read, could only decide for the default model
    return service, served


class EventStream(StreamingResponse):
    """Server-Sent Events. Its generator watches for the client's disconnect itself (FileTranscription):
    Starlette's own watch would cancel the response at whatever it awaits, the generator's ``yield`` among
    them, leaving its ``finally`` to the garbage collector. It is closed however the response ends."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator):
            await self.stream_response(send)


async def _transcript_events(work: FileTranscription, prompt_tokens: int) -> AsyncGenerator[bytes, None]:
    """OpenAI's streamed transcription: a ``transcript.text.delta`` per window with text as soon as it is final,
    then ``transcript.text.done``; the deltas, concatenated, are its text. Raises the APIError of a failure."""
    spoken = False  # a delta after the first begins with the space between two windows' texts
    while (window := await work.next_window()) is not None:
        if window.text:
            yield sse_event("transcript.text.delta", delta=(" " if spoken else "") + window.text)
            spoken = True
    transcript = await work.transcript()
    yield sse_event("transcript.text.done", text=transcript.text, usage=token_usage(transcript, prompt_tokens))


async def _after_headers(first: bytes, events: AsyncGenerator[bytes, None], work: FileTranscription) -> AsyncGenerator[bytes, None]:
    """The events after the first: the status has gone out, so a failure is an ``error`` event (the openai
    SDK raises APIError on it), and the stream ends."""
    try:
        yield first
        async for event in events:
            yield event
    except Exception as exc:
        if not isinstance(exc, APIError):
            log.exception("unhandled error in the event stream of %s", work.request.url.path)
        error = exc if isinstance(exc, APIError) else INTERNAL_ERROR
        yield sse_event("error", **error_body(error.code, error.message))
    finally:
        await events.aclose()
        work.close()


async def _stream_transcript(work: FileTranscription, prompt_tokens: int, headers: dict) -> EventStream:
    events = _transcript_events(work, prompt_tokens)
    try:
        first = await anext(events)  # until the first text (or the end): what fails before has its own status, in JSON
    except BaseException:
        work.close()
        raise
    # proxies must pass each event on as it comes (nginx buffers a response unless told not to)
    return EventStream(_after_headers(first, events, work), headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


@router.post("/v1/audio/transcriptions", summary="OpenAI-compatible transcription", responses=STREAMED_RESPONSES)
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
    stream: Annotated[bool, Form(description=STREAM_HELP)] = False,
) -> Response:
    service, served = _openai_model(request, model)
    granularities = set(timestamp_granularities or ["segment"])
    if granularities - {"segment", "word"}:
        raise APIError(400, "unsupported_granularity", "timestamp_granularities[] takes segment and word")
    if stream and response_format not in STREAMED_FORMATS:
        raise APIError(400, "unsupported_stream_format", f"stream=true sends text events, as the json and text formats do; "
                       f"{response_format.value} needs the whole transcript: send it without stream")
    words = "word" in granularities and response_format is ResponseFormat.verbose_json  # the only format that has them
    options = _options(request, served, language, prompt, beam_size=beam_size, temperature=temperature,
                       condition_on_previous_text=condition_on_previous_text, word_timestamps=words)
    headers = {"X-Request-Id": _request_id(request)}
    if stream:
        work = await FileTranscription.start(request, service, served, await file.read(), options)
        return await _stream_transcript(work, len(options.context), headers)
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
