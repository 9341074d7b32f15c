"""``/v1/realtime``: OpenAI's Realtime transcription sessions, on the same stream sessions, limits and drain
as ``/v1/stream`` (the protocol is documented in the README).

Two dialects share the path: the GA one, as the current ``openai`` SDK's ``client.realtime.connect`` speaks
it (``session.update`` with ``session.type`` = ``transcription``), and the beta one, chosen by the header
``OpenAI-Beta: realtime=v1`` (``transcription_session.update``, ``input_audio_format`` = ``pcm16``, ...).
Both are read into one :class:`RealtimeConfig` and answered from it.

An item is what the client gets a transcript for: with server VAD, each utterance the session ends; without
turn detection, the audio between two commits. Its events: ``input_audio_buffer.committed``, append-only
``conversation.item.input_audio_transcription.delta`` events of the words the session has committed
(LocalAgreement-2) and settled (each later transcription is made to begin with them), and ``.completed`` with the final transcript (or ``.failed``).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.audio import PcmStream
from app.auth import tenant_of
from app.errors import APIError
from app.routes.stream import PROMPT_MAX_CHARS, StartMessage, StreamConnection, admit, refuse, serve
from app.service import ServedModel, Service
from workers.engine import (SAMPLE_RATE, Event, Final, OptionError, Partial, SpeechStarted, SpeechStopped, StreamError,
                            StreamOptions)

router = APIRouter(tags=["streaming"])

Dialect = Literal["ga", "beta"]
# each format's name in either dialect, and the PCM it is
FORMATS = {"pcm": ("audio/pcm", "pcm16", "pcm_s16le", 24000),
           "pcmu": ("audio/pcmu", "g711_ulaw", "pcm_mulaw", 8000),
           "pcma": ("audio/pcma", "g711_alaw", "pcm_alaw", 8000)}
GA_FORMATS = {ga: key for key, (ga, *_) in FORMATS.items()}
BETA_FORMATS = {beta: key for key, (_, beta, *_) in FORMATS.items()}
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less audio than this
CLIENT_EVENTS = {"ga": ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear"),
                 "beta": ("transcription_session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear")}
SERVER_FAULTS = frozenset({"internal_error", "final_failed", "overloaded"})  # error.type server_error; the rest are the client's


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD, OpenAI's defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class RealtimeConfig:
    """A session's configuration, whichever dialect set it."""

    format: str = "pcm"  # a key of FORMATS
    model: str | None = None  # as the client named it; None: the default model
    language: str | None = None
    prompt: str | None = None
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None: the client commits
    noise_reduction: str | None = None  # near_field | far_field: accepted and echoed, not applied
    include: tuple[str, ...] = ()


# --- what each dialect's update may say (unknown fields are refused, as OpenAI does) ---------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Transcription(_Strict):
    model: str | None = Field(None, max_length=64)
    language: str | None = Field(None, max_length=16)
    prompt: str | None = Field(None, max_length=PROMPT_MAX_CHARS)


class ServerVad(_Strict):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(None, gt=0, lt=1)
    prefix_padding_ms: int | None = Field(None, ge=0, le=5000)
    silence_duration_ms: int | None = Field(None, ge=100, le=10_000)
    create_response: bool | None = None  # a conversation's options: nothing to do in a transcription session
    interrupt_response: bool | None = None
    eagerness: Literal["low", "medium", "high", "auto"] | None = None


class NoiseReduction(_Strict):
    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = Field(None, ge=0, le=1)


class GAFormat(_Strict):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
    rate: Literal[24000] | None = None


class GAInput(_Strict):
    format: GAFormat | None = None
    transcription: Transcription | None = None
    turn_detection: ServerVad | None = None
    noise_reduction: NoiseReduction | None = None


class GAAudio(_Strict):
    input: GAInput | None = None


Include = Literal["item.input_audio_transcription.logprobs"]


class GASession(_Strict):
    type: Literal["transcription"]
    audio: GAAudio | None = None
    include: list[Include] | None = None


class BetaSession(_Strict):
    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None
    input_audio_transcription: Transcription | None = None
    turn_detection: ServerVad | None = None
    input_audio_noise_reduction: NoiseReduction | None = None
    include: list[Include] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    client_secret: dict | None = None


class BadEvent(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def _validated(model: type[BaseModel], data: object, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join([where, *(str(p) for p in first["loc"])])
        code = "unknown_parameter" if first["type"] == "extra_forbidden" else "invalid_value"
        raise BadEvent(code, f"{param}: {first['msg']}", param) from exc


def _set(model: BaseModel | None, name: str) -> bool:
    return model is not None and name in model.model_fields_set


def _turn_detection(vad: ServerVad | None, where: str) -> TurnDetection | None:
    if vad is None:
        return None
    if vad.type == "semantic_vad":
        raise BadEvent("invalid_value", "semantic_vad is not served here: use server_vad, or null to commit turns yourself", f"{where}.type")
    default = TurnDetection()
    return TurnDetection(default.threshold if vad.threshold is None else vad.threshold,
                         default.prefix_padding_ms if vad.prefix_padding_ms is None else vad.prefix_padding_ms,
                         default.silence_duration_ms if vad.silence_duration_ms is None else vad.silence_duration_ms)


def _changes(transcription: Transcription | None, parent: BaseModel | None, turn_key: str, noise_key: str, where: str) -> dict:
    """The fields of an update's transcription, turn detection and noise reduction that the client set."""
    changes = {}
    for name in ("model", "language", "prompt"):
        if _set(transcription, name):
            changes[name] = getattr(transcription, name)
    if _set(parent, turn_key):
        changes["turn_detection"] = _turn_detection(getattr(parent, turn_key), f"{where}.{turn_key}")
    if _set(parent, noise_key):
        noise = getattr(parent, noise_key)
        changes["noise_reduction"] = None if noise is None else noise.type or "near_field"
    return changes


def updated(config: RealtimeConfig, dialect: Dialect, session: object) -> RealtimeConfig:
    """``config`` with what a session update sets (only the fields it names); raises :class:`BadEvent`."""
    if dialect == "ga":
        if isinstance(session, dict) and session.get("type") == "realtime":
            raise BadEvent("invalid_value", "this server runs transcription sessions only: session.type must be transcription "
                           "(connect with ?intent=transcription)", "session.type")
        update: GASession = _validated(GASession, session, "session")
        audio_input = update.audio.input if update.audio is not None else None
        changes = _changes(audio_input.transcription if audio_input else None, audio_input, "turn_detection", "noise_reduction",
                           "session.audio.input")
        if _set(audio_input, "format") and audio_input.format is not None:
            changes["format"] = GA_FORMATS[audio_input.format.type]
    else:
        update: BetaSession = _validated(BetaSession, session, "session")
        changes = _changes(update.input_audio_transcription, update, "turn_detection", "input_audio_noise_reduction", "session")
        if update.input_audio_format is not None:
            changes["format"] = BETA_FORMATS[update.input_audio_format]
    if update.include is not None:
        changes["include"] = tuple(update.include)
    return replace(config, **changes)


def session_json(config: RealtimeConfig, dialect: Dialect, session_id: str, model: str) -> dict:
    """The session as the dialect describes it (session.created / transcription_session.created, and updated)."""
    ga_format, beta_format, _, rate = FORMATS[config.format]
    transcription = {"model": config.model or model, "language": config.language, "prompt": config.prompt or ""}
    turn = None if config.turn_detection is None else {"type": "server_vad", **vars(config.turn_detection)}
    noise = None if config.noise_reduction is None else {"type": config.noise_reduction}
    if dialect == "ga":
        return {"id": session_id, "object": "realtime.transcription_session", "type": "transcription",
                "audio": {"input": {"format": {"type": ga_format, **({"rate": rate} if config.format == "pcm" else {})},
                                    "transcription": transcription, "turn_detection": turn, "noise_reduction": noise}},
                "include": list(config.include)}
    return {"id": session_id, "object": "realtime.transcription_session", "input_audio_format": beta_format,
            "input_audio_transcription": transcription, "turn_detection": turn, "input_audio_noise_reduction": noise,
            "include": list(config.include), "modalities": ["text"], "client_secret": None}


def _id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex[:20]}"


@dataclass
class Item:
    """A transcript the client will get: its utterances and how much of its text went out as deltas."""

    id: str
    utterances: list[int]
    committed: bool = False
    published: list[str] = field(default_factory=list)  # words sent as deltas, in order


class RealtimeConnection(StreamConnection):
    """One Realtime client, in its dialect."""

    def __init__(self, websocket: WebSocket, service: Service, served: ServedModel, client: str, dialect: Dialect,
                 config: RealtimeConfig):
        super().__init__(websocket, service, StartMessage(), served, client)
        self.dialect = dialect
        self.config = config
        self.session_id = _id("sess")
        self.items: dict[int, Item] = {}  # by utterance, until completed
        self.settled: dict[int, list[str]] = {}  # each utterance's settled words so far (see emit)
        self.results: dict[int, Final | StreamError] = {}  # each utterance's final, until its item completes
        self.next_utterance = 0  # the first utterance in no committed item
        self.commit_mark = 0  # stream samples up to the last commit or clear
        self.last_item_id: str | None = None

    # --- what the base class asks of a protocol ---------------------------------------------------------------
    def options(self) -> dict:
        return session_json(self.config, self.dialect, self.session_id, self.served.name)

    def stream_options(self) -> StreamOptions:
        turn = self.config.turn_detection
        return StreamOptions(language=self.config.language, interim_results=True, tenant=tenant_of(self.websocket.scope),
                             endpoint_silence_s=None if turn is None else turn.silence_duration_ms / 1000,
                             vad_threshold=None if turn is None else turn.threshold,
                             prefix_padding_s=None if turn is None else turn.prefix_padding_ms / 1000, prompt=self.config.prompt,
                             beam_size=self.settings.realtime_beam_size,
                             context_s=self.settings.realtime_context_s, final_fallback=self.settings.realtime_temperature_fallback)

    def audio_format(self) -> tuple[str, int]:
        _, _, encoding, rate = FORMATS[self.config.format]
        return encoding, rate

    def greeting(self) -> dict:
        kind = "session.created" if self.dialect == "ga" else "transcription_session.created"
        return self.event(kind, session=self.options())

    def farewell(self, reason: str) -> dict | None:
        return None  # OpenAI's protocol ends with the close frame (1000, 1001 or 1008 and its reason)

    def error_message(self, code: str, message: str, param: str | None = None, client_event: str | None = None) -> dict:
        kind = "server_error" if code in SERVER_FAULTS else "invalid_request_error"
        return self.event("error", error={"type": kind, "code": code, "message": message, "param": param, "event_id": client_event})

    @staticmethod
    def event(kind: str, **fields: object) -> dict:
        return {"type": kind, "event_id": _id("event"), **fields}

    async def _binary(self, data: bytes) -> None:
        self.error("invalid_event", "Realtime events are JSON text messages; send audio as input_audio_buffer.append with base64 'audio'")

    async def _control(self, text: str) -> bool:
        try:
            message = json.loads(text)
            kind = message["type"]
            if not isinstance(kind, str):
                raise TypeError(kind)
        except (ValueError, KeyError, TypeError, RecursionError):
            self.error("invalid_json", "events are JSON objects with a string 'type'")
            return False
        client_event = message.get("event_id") if isinstance(message.get("event_id"), str) else None
        try:
            await self._event(kind, message)
        except BadEvent as bad:
            self.send(self.error_message(bad.code, str(bad), bad.param, client_event))
        return False  # a Realtime client ends its session by closing the socket

    # --- client events -----------------------------------------------------------------------------------------
    async def _event(self, kind: str, message: dict) -> None:
        if kind not in CLIENT_EVENTS[self.dialect]:
            other = "beta" if self.dialect == "ga" else "GA"
            hint = f" ({kind} is the {other} dialect's: the header OpenAI-Beta: realtime=v1 chooses the beta one)" if kind in CLIENT_EVENTS["beta" if self.dialect == "ga" else "ga"] else ""
            raise BadEvent("unknown_event", f"a transcription session takes {', '.join(CLIENT_EVENTS[self.dialect])}; not {kind[:64]!r}{hint}", "type")
        if kind.endswith("session.update"):
            await self._update(message.get("session"))
        elif kind == "input_audio_buffer.append":
            await self._append(message.get("audio"))
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        else:
            self._clear()

    def _param(self, name: str) -> str:
        return f"session.audio.input.transcription.{name}" if self.dialect == "ga" else f"session.input_audio_transcription.{name}"

    async def _update(self, session: object) -> None:
        config = updated(self.config, self.dialect, session)
        try:
            served = self.service.model(config.model)
            language = served.engine.options(config.language, None).language
        except APIError as exc:  # a model not served, or still loading
            raise BadEvent(exc.code, exc.message, self._param("model")) from exc
        except OptionError as exc:
            raise BadEvent(exc.code, str(exc), self._param("language")) from exc
        if served is not self.served and self.session is not None:
            raise BadEvent("invalid_value", "the model cannot change once audio was sent: open a new session for another model", self._param("model"))
        format_changed = config.format != self.config.format
        self.config, self.served = replace(config, language=language), served
        if self.session is not None:
            if format_changed:  # what the old format's resampler holds is still this stream's audio
                await self._flush()
                self.pcm = PcmStream(*self.audio_format())
            self.session.reconfigure(self.stream_options())
        self.send(self.event("session.updated" if self.dialect == "ga" else "transcription_session.updated", session=self.options()))

    async def _append(self, audio: object) -> None:
        if not isinstance(audio, str):
            raise BadEvent("invalid_value", "audio must be a base64 string of the session's audio format", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadEvent("invalid_value", "audio is not valid base64", "audio") from exc
        await self._audio(data)

    async def _commit(self) -> None:
        session = self.session
        buffered_s = 0.0 if session is None else (session.received - self.commit_mark) / SAMPLE_RATE
        if session is None or buffered_s < MIN_COMMIT_S:
            raise BadEvent("input_audio_buffer_commit_empty", f"the buffer holds {buffered_s * 1000:.0f} ms of audio since the last "
                           f"commit; at least {MIN_COMMIT_S * 1000:.0f} ms is needed")
        await self._flush()
        session.finalize()  # with server VAD, an utterance in progress is committed by its SpeechStopped
        self._commit_item(list(range(self.next_utterance, session.utterance)))
        self.commit_mark = session.received

    def _clear(self) -> None:
        session = self.session
        if session is not None:
            session.clear()
            self.commit_mark = session.received
            # the utterance in progress, and those ended (at a length cut) but not committed, are taken back
            for utterance in [u for u, item in self.items.items() if not item.committed] + list(range(self.next_utterance, session.utterance)):
                self.items.pop(utterance, None)
                self.settled.pop(utterance, None)
                self.results.pop(utterance, None)
            self.next_utterance = session.utterance
        self.send(self.event("input_audio_buffer.cleared"))

    # --- session events ----------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self.observe(event)
        vad = self.config.turn_detection is not None
        if isinstance(event, SpeechStarted):
            if vad:
                item = self.items[event.utterance] = Item(_id("item"), [event.utterance])
                self.send(self.event("input_audio_buffer.speech_started", audio_start_ms=round(event.start * 1000), item_id=item.id))
        elif isinstance(event, SpeechStopped):
            if vad or event.reason == "close":  # a drain commits what a manual session still holds: its transcript is not lost
                item = self.items.get(event.utterance)
                if vad and event.reason in ("endpoint", "max_length") and item is not None:
                    self.send(self.event("input_audio_buffer.speech_stopped", audio_end_ms=round(event.end * 1000), item_id=item.id))
                self._commit_item(list(range(self.next_utterance, event.utterance + 1)), item)
                if self.session is not None:
                    self.commit_mark = self.session.received
        elif isinstance(event, Partial):
            # only the settled words: every later transcription of the utterance begins with them, so the
            # deltas stay the start of its transcript
            self.settled[event.utterance] = event.settled.split()
            if (item := self.items.get(event.utterance)) is not None:
                self._progress(item)
        elif isinstance(event, Final | StreamError) and event.utterance is not None:
            if event.utterance in self.items or event.utterance >= self.next_utterance:  # not one the client cleared
                self.results[event.utterance] = event
            if (item := self.items.get(event.utterance)) is not None:
                self._progress(item)
        elif isinstance(event, StreamError):
            self.error(event.code, event.message)

    def _commit_item(self, utterances: list[int], item: Item | None = None) -> None:
        """Commit the item of these utterances (a new one unless given): committed, then what is known of its text."""
        if not utterances and item is None:
            return
        item = item or Item(_id("item"), utterances)
        item.utterances = sorted(set(item.utterances) | set(utterances))
        for utterance in item.utterances:
            self.items[utterance] = item
        item.committed = True
        self.next_utterance = max(self.next_utterance, item.utterances[-1] + 1)
        self.send(self.event("input_audio_buffer.committed", item_id=item.id, previous_item_id=self.last_item_id))
        self.last_item_id = item.id
        self._progress(item)

    def _progress(self, item: Item) -> None:
        """Deltas of the item's words that are settled (finals, then the settled words of the utterance in
        progress), and its completion once every utterance of it has its final."""
        words: list[str] = []
        for utterance in item.utterances:
            result = self.results.get(utterance)
            if isinstance(result, Final):
                words += result.text.split()
                continue
            if result is None:
                words += self.settled.get(utterance, [])
            break  # past an utterance still in progress (or failed), nothing is settled
        published = item.published
        if words[: len(published)] == published and len(words) > len(published):
            new = words[len(published):]
            self.send(self.event("conversation.item.input_audio_transcription.delta", item_id=item.id, content_index=0,
                                 delta=(" " if published else "") + " ".join(new)))
            item.published = words
        if not item.committed or any(u not in self.results for u in item.utterances):
            return
        results = [self.results.pop(u) for u in item.utterances]
        for utterance in item.utterances:
            self.items.pop(utterance, None)
            self.settled.pop(utterance, None)
        failed = next((r for r in results if isinstance(r, StreamError)), None)
        if failed is not None:
            self.send(self.event("conversation.item.input_audio_transcription.failed", item_id=item.id, content_index=0,
                                 error={"type": "server_error", "code": failed.code, "message": failed.message, "param": None}))
            return
        transcript = " ".join(r.text for r in results if r.text)
        if transcript.split()[: len(item.published)] != item.published:
            self.metrics.realtime_revisions.labels(self.served.name).inc()
        self.send(self.event("conversation.item.input_audio_transcription.completed", item_id=item.id, content_index=0,
                             transcript=transcript, usage={"type": "duration", "seconds": round(sum(r.end - r.start for r in results), 3)}))


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    if (client := await admit(websocket, service)) is None:
        return
    intent = websocket.query_params.get("intent", "transcription")
    if intent != "transcription":
        await refuse(websocket, APIError(400, "unsupported_intent", f"this server runs transcription sessions only: connect with "
                                         f"?intent=transcription, not {intent[:32]!r}"))
        return
    dialect: Dialect = "beta" if "realtime=v1" in websocket.headers.get("openai-beta", "") else "ga"
    # the SDKs put a conversation model in the URL (the beta one insists); a transcription session's model is
    # the session's audio.input.transcription.model, so a URL model this server does not serve is no error
    model = websocket.query_params.get("model")
    if service.settings.model_name(model) not in service.settings.models:
        model = None
    try:
        served = service.model(model)
    except APIError as loading:
        await refuse(websocket, loading)
        return
    config = RealtimeConfig(model=model)
    await serve(websocket, service, RealtimeConnection(websocket, service, served, client, dialect, config))
