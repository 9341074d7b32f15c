"""``/v1/stream``: live transcription over a WebSocket (the protocol is documented in the README).

This module speaks the wire protocol and enforces its limits; the session logic (VAD, interim steps,
finals) is :class:`workers.streaming.StreamSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketState

from app.audio import PcmStream
from app.auth import tenant_of
from app.errors import APIError
from app.formats import word_json
from app.limits import TokenBucket, client_identity
from app.service import ServedModel, Service
from app.webhook import stream_final_payload
from configs.settings import comma_list
from workers.engine import Event, Final, OptionError, Partial, StreamError, StreamOptions, StreamSession

log = logging.getLogger(__name__)
router = APIRouter(tags=["streaming"])

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL = 1000, 1001, 1008, 1009, 1011
RATE_BURST_S = 2.0  # the message-rate limit is an average over this long
CLOCK_SLACK_S = 0.01  # asyncio may wake a timeout this much early
PROMPT_MAX_CHARS = 2000  # the decoder keeps its last 223 tokens anyway


class StartMessage(BaseModel):
    """The options of a stream: the optional first text message, or the same names as query parameters."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["start"] = "start"
    sample_rate: int = Field(16000, ge=8000, le=192000)
    encoding: Literal["pcm_s16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw"] = "pcm_s16le"
    language: str | None = Field(None, max_length=16)  # unset: en, or detected per utterance by a multilingual model
    prompt: str | None = Field(None, max_length=PROMPT_MAX_CHARS)  # text before the stream's first words (names, terms)
    interim_results: bool = True
    endpoint_silence_ms: int | None = Field(None, ge=100, le=10_000)
    word_timestamps: bool = False
    model: str | None = Field(None, max_length=64)


class BadOptions(ValueError):
    pass


def parse_start(data: dict, service: Service) -> tuple[StartMessage, ServedModel]:
    """Validate stream options (a start message or the query parameters), normalised once (the language
    as the model knows it), and find the model they name; raises :class:`BadOptions`, or :class:`APIError`
    404 for a model not served."""
    try:
        start = StartMessage.model_validate(data)
    except ValidationError as exc:
        raise BadOptions("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors())) from exc
    served = service.model(start.model)  # 404 model_not_found for a model not served
    try:
        language = served.engine.options(start.language, None).language
    except OptionError as exc:
        raise BadOptions(str(exc)) from exc
    return start.model_copy(update={"language": language}), served


class StreamConnection:
    """One client: reads its messages, feeds its session, and is the only writer to its socket.

    This class speaks the service's own protocol; :class:`app.routes.realtime.RealtimeConnection` speaks
    OpenAI's over the same limits, session and lifecycle, by overriding what is said on the wire:
    ``greeting``, ``error_message``, ``farewell``, ``emit``, ``stream_options``, ``audio_format``,
    ``_binary`` and ``_control``."""

    def __init__(self, websocket: WebSocket, service: Service, start: StartMessage, served: ServedModel, client: str):
        self.websocket = websocket
        self.client = client  # whom per-client limits count it for
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.start, self.served = start, served
        self.session: StreamSession | None = None  # opened at the first audio or control message
        self.pcm: PcmStream | None = None
        # bounded: a client that does not read is closed (client_too_slow) instead of buffering without end
        self.outbox: deque[dict] = deque()
        self._outbox_changed = asyncio.Event()
        self._closing_outbox = False
        self._too_slow = asyncio.Event()
        self.id = uuid.uuid4().hex[:12]
        self.task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        # a few seconds of burst: a client catching up after a network stall sends faster than it records
        self.rate = TokenBucket(service.settings.stream_max_messages_per_s, service.settings.stream_max_messages_per_s * RATE_BURST_S)
        self.heard_audio = False  # until then the first-audio timeout runs

    def stop(self) -> None:
        """Graceful end (the server is draining): the audio received so far gets its final, then 1001."""
        self._stopping.set()

    def abort(self) -> None:
        """Hard end (the drain ran out of time): pending work is dropped, the client still gets 1001."""
        if self.task is not None:
            self.task.cancel()

    def options(self) -> dict:
        endpoint_ms = self.start.endpoint_silence_ms or self.settings.stream_endpoint_silence_ms
        return {"model": self.served.name, "sample_rate": self.start.sample_rate, "encoding": self.start.encoding, "language": self.start.language,
                "interim_results": self.start.interim_results, "endpoint_silence_ms": endpoint_ms,
                "word_timestamps": self.start.word_timestamps}

    def stream_options(self) -> StreamOptions:
        options = self.options()
        return StreamOptions(language=options["language"], interim_results=options["interim_results"],
                             endpoint_silence_s=options["endpoint_silence_ms"] / 1000, tenant=tenant_of(self.websocket.scope),
                             word_timestamps=options["word_timestamps"], prompt=self.start.prompt)

    def audio_format(self) -> tuple[str, int]:
        """(PCM encoding, sample rate) of the audio the client sends."""
        return self.start.encoding, self.start.sample_rate

    def greeting(self) -> dict:
        return {"type": "ready", "session_id": self.id, **self.options()}

    def farewell(self, reason: str) -> dict | None:
        """The last message before the close frame."""
        return {"type": "closed", "reason": reason}

    def error_message(self, code: str, message: str) -> dict:
        return {"type": "error", "code": code, "message": message}

    def send(self, message: dict) -> None:
        if len(self.outbox) >= self.settings.stream_max_pending_messages:
            self._too_slow.set()
            return
        self.outbox.append(message)
        self._outbox_changed.set()

    def error(self, code: str, message: str) -> None:
        self.send(self.error_message(code, message))

    def observe(self, event: Event) -> None:
        """What any protocol does with a session event besides saying it: latency metrics, the final's webhook."""
        if isinstance(event, Partial):
            (self.metrics.first_partial_latency if event.first else self.metrics.partial_latency).labels(self.served.name).observe(event.latency_s)
        elif isinstance(event, Final):
            self.metrics.final_latency.labels(self.served.name).observe(event.latency_s)
            if self.service.webhook is not None:
                self.service.webhook.offer(stream_final_payload(self.id, self.served.name, event.utterance, event.text,
                                                                event.start, event.end, event.reason))

    def emit(self, event: Event) -> None:
        """Session events -> wire messages."""
        self.observe(event)
        if isinstance(event, Partial):
            self.send({"type": "partial", "utterance": event.utterance, "text": event.text, "stable": event.stable,
                       "start": event.start})
        elif isinstance(event, Final):
            final = {"type": "final", "utterance": event.utterance, "text": event.text, "start": event.start,
                     "end": event.end, "reason": event.reason, "language": event.language,
                     "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in event.segments]}
            if self.start.word_timestamps:
                final["words"] = [word_json(w) for s in event.segments for w in s.words or []]
            self.send(final)
        elif isinstance(event, StreamError):
            self.error(event.code, event.message)

    def _open(self) -> StreamSession:
        if self.session is None:
            self.pcm = PcmStream(*self.audio_format())
            self.session = self.served.engine.open_stream(self.stream_options(), self.emit)
        return self.session

    async def run(self) -> None:
        self.task = asyncio.current_task()
        sender = asyncio.create_task(self._send_loop())
        self.send(self.greeting())
        reason, code, finish_work = "internal_error", CLOSE_INTERNAL, True
        try:
            reason, code = await self._receive_loop()
        except asyncio.CancelledError:
            reason, code, finish_work = "server_shutdown", CLOSE_GOING_AWAY, False
        except Exception:  # noqa: BLE001 - one broken session must not take the server down
            log.exception("stream %s failed", self.id)
            self.error("internal_error", "the server failed on this stream; the error is logged")
        finally:
            await self._finish(reason, code, sender, finish_work)

    async def _finish(self, reason: str, code: int | None, sender: asyncio.Task, finish_work: bool) -> None:
        session = self.session
        if session is not None:
            if code is None or not finish_work:  # the client has gone, or there is no time left
                session.abort()
            else:
                try:
                    await asyncio.wait_for(session.close(), self.settings.stream_final_timeout_s)
                except (TimeoutError, asyncio.CancelledError):
                    session.abort()
        self.metrics.stream_sessions.labels(reason).inc()
        if code is not None and (last := self.farewell(reason)) is not None:
            self.outbox.append(last)  # past the bound: the last word is always sent
        self._closing_outbox = True
        self._outbox_changed.set()
        # a client that does not read would hold its sender (and this connection) forever
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(sender, self.settings.stream_send_timeout_s)
        if code is not None and self.websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(code), self.settings.stream_send_timeout_s)

    async def _send_loop(self) -> None:
        while True:
            while self.outbox:
                try:
                    await self.websocket.send_text(json.dumps(self.outbox.popleft()))
                except Exception:  # noqa: BLE001 - the client has gone; the receive loop will see it
                    return
            if self._closing_outbox:
                return
            self._outbox_changed.clear()
            await self._outbox_changed.wait()

    async def _receive_loop(self) -> tuple[str, int | None]:
        settings = self.settings
        opened = time.monotonic()
        deadline, first_audio_deadline = opened + settings.stream_max_session_s, opened + settings.stream_first_audio_timeout_s
        stopping = asyncio.ensure_future(self._stopping.wait())
        too_slow = asyncio.ensure_future(self._too_slow.wait())
        try:
            while True:
                now = time.monotonic()
                wait = min(settings.stream_idle_timeout_s, deadline - now)
                if not self.heard_audio:
                    wait = min(wait, first_audio_deadline - now)
                receiving = asyncio.ensure_future(self.websocket.receive())
                await asyncio.wait({receiving, stopping, too_slow}, timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED)
                if too_slow.done():
                    receiving.cancel()
                    self.outbox.clear()  # the client is not reading them; what it gets is why it is closed
                    self.outbox.append(self.error_message("client_too_slow", f"over {settings.stream_max_pending_messages} messages are waiting for this "
                                                          "client to read them (ASR_STREAM_MAX_PENDING_MESSAGES); read the socket as fast as the server writes"))
                    return "client_too_slow", CLOSE_POLICY
                if not receiving.done():
                    receiving.cancel()
                    if stopping.done():
                        if self.session is not None:
                            await self._flush()
                        return "server_shutdown", CLOSE_GOING_AWAY
                    return self._timed_out(deadline, first_audio_deadline)
                result = await self._handle(receiving.result())
                if result is not None:
                    return result
        finally:
            stopping.cancel()
            too_slow.cancel()

    def _timed_out(self, deadline: float, first_audio_deadline: float) -> tuple[str, int]:
        settings = self.settings
        if time.monotonic() >= deadline - CLOCK_SLACK_S:
            self.error("session_too_long", f"streams last at most {settings.stream_max_session_s:g} s (ASR_STREAM_MAX_SESSION_S); open a new one")
            return "session_too_long", CLOSE_POLICY
        if not self.heard_audio and time.monotonic() >= first_audio_deadline - CLOCK_SLACK_S:
            self.error("no_audio", f"no audio within {settings.stream_first_audio_timeout_s:g} s of the handshake (ASR_STREAM_FIRST_AUDIO_TIMEOUT_S)")
            return "no_audio", CLOSE_POLICY
        self.error("idle_timeout", f"nothing received for {settings.stream_idle_timeout_s:g} s (ASR_STREAM_IDLE_TIMEOUT_S)")
        return "idle_timeout", CLOSE_POLICY

    async def _handle(self, message: dict) -> tuple[str, int | None] | None:
        """One message from the client; returns how the stream ends, or None while it goes on."""
        settings = self.settings
        if message["type"] == "websocket.disconnect":
            return "client_gone", None
        if not self.rate.allow():
            self.error("rate_limited", f"more than {settings.stream_max_messages_per_s:g} messages per second (ASR_STREAM_MAX_MESSAGES_PER_S); send larger frames, less often")
            return "rate_limited", CLOSE_POLICY
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len(text or "")
        if size > settings.stream_max_frame_bytes:
            self.error("frame_too_large", f"a message of {size} bytes is over the limit of {settings.stream_max_frame_bytes} (ASR_STREAM_MAX_FRAME_BYTES); send smaller frames")
            return "frame_too_large", CLOSE_TOO_BIG
        if data is not None:
            await self._binary(data)
        elif text is not None and await self._control(text):
            return "client_close", CLOSE_NORMAL
        return None

    async def _binary(self, data: bytes) -> None:
        await self._audio(data)

    async def _audio(self, data: bytes) -> None:
        session = self._open()
        audio = self.pcm.decode(data)
        if len(audio):
            self.heard_audio = True
            self.metrics.audio_seconds.labels(self.served.name, "stream").inc(len(audio) / 16000)
            await session.feed(audio)

    async def _flush(self) -> StreamSession:
        session = self._open()
        tail = self.pcm.flush()
        if len(tail):
            await session.feed(tail)
        return session

    async def _control(self, text: str) -> bool:
        """Handle a text message; True when the client asked to close."""
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, KeyError, TypeError, RecursionError):  # not JSON (or nested past reason), no type, not an object
            self.error("bad_message", 'text messages are JSON objects with a "type": start, finalize or close')
            return False
        if kind == "start":
            if self.session is not None:
                self.error("bad_message", "start must be the first message of the stream")
                return False
            try:
                self.start, self.served = parse_start(message, self.service)
            except (BadOptions, APIError) as exc:
                self.error("bad_start", f"start message rejected, options unchanged: {exc}")
                return False
            self.send({"type": "started", **self.options()})
        elif kind == "finalize":
            (await self._flush()).finalize()
        elif kind == "close":
            await self._flush()
            return True
        else:
            self.error("unknown_message", f"unknown message type {kind!r}; expected start, finalize or close")
        return False


async def refuse(websocket: WebSocket, error: APIError) -> None:
    """Refuse the handshake with an HTTP response and a JSON reason."""
    await websocket.send_denial_response(error.response())


def _origin_refused(websocket: WebSocket, service: Service) -> APIError | None:
    """A browser's handshake from an origin ASR_CORS_ORIGINS does not list (nor the server's own) is refused:
    a WebSocket is not covered by CORS, and a page elsewhere could otherwise stream with its visitors' keys."""
    allowed = comma_list(service.settings.cors_origins)
    origin = websocket.headers.get("origin")
    if not allowed or "*" in allowed or origin is None or origin in allowed or urlsplit(origin).netloc == websocket.headers.get("host"):
        return None
    return APIError(403, "origin_not_allowed", f"streams are not open to pages on {origin[:100]} (ASR_CORS_ORIGINS)")


async def admit(websocket: WebSocket, service: Service) -> str | None:
    """The client a new stream (of either protocol) counts for; None once its handshake is refused."""
    client = client_identity(websocket.scope, keyed=bool(service.settings.api_keys))
    if (refused := _refusal(websocket, service, client)) is not None:
        await refuse(websocket, refused)
        return None
    return client


def _refusal(websocket: WebSocket, service: Service, client: str) -> APIError | None:
    settings = service.settings
    if (unavailable := service.unavailable()) is not None:
        service.metrics.rejected.labels(unavailable.code).inc()
        return unavailable
    if (refused := _origin_refused(websocket, service)) is not None:
        service.metrics.rejected.labels("origin_not_allowed").inc()
        return refused
    if len(service.stream_connections) >= settings.stream_max_sessions:
        service.metrics.rejected.labels("streams_full").inc()
        return APIError(503, "server_busy", f"all {settings.stream_max_sessions} stream slots are taken (ASR_STREAM_MAX_SESSIONS); retry later", {"Retry-After": "5"})
    limit = settings.stream_max_sessions_per_client
    if limit and sum(c.client == client for c in service.stream_connections) >= limit:
        service.metrics.rejected.labels("client_streams_full").inc()
        return APIError(429, "too_many_streams", f"this client has {limit} streams open, the most allowed (ASR_STREAM_MAX_SESSIONS_PER_CLIENT); close one first", {"Retry-After": "5"})
    return None


async def serve(websocket: WebSocket, service: Service, connection: StreamConnection) -> None:
    """Accept an admitted stream and run it to its end; its slot is held throughout."""
    service.stream_opened(connection)  # the slot is taken before the first await
    try:
        await websocket.accept()
        await connection.run()
    finally:
        service.stream_closed(connection)


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    if (client := await admit(websocket, service)) is None:
        return
    try:
        # api_key is the authentication middleware's business, not a stream option
        start, served = parse_start({k: v for k, v in websocket.query_params.items() if k != "api_key"}, service)
    except BadOptions as exc:
        await refuse(websocket, APIError(400, "bad_options", f"stream options rejected: {exc}"))
        return
    except APIError as not_found:
        await refuse(websocket, not_found)
        return
    await serve(websocket, service, StreamConnection(websocket, service, start, served, client))
