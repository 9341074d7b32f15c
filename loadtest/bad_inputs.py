"""A catalog of bad and hostile input, fired at a running server over REST and the `/v1/stream`
WebSocket, one entry at a time, with what each must get back.

Run: python -m loadtest.bad_inputs --url http://127.0.0.1:8000 [--json rows.json]

For each entry the client records what came back: over REST the HTTP status and the error code of
the body (`not-json` when the body is not the service's `{"error": {"code", "message"}}`); over the
WebSocket the handshake status (101 when accepted), the codes of the `error` events in order, the
close code, and the text of the finals. After each entry the server must answer `GET /healthz` with
200 and hold no stream session (a leaked one would show in `asr_stream_sessions_held`), and no body
may carry a stack trace or a source path. The last entry checks that a real transcription still
works. The report is a Markdown table; the exit status is 0 when every row got what it expected.

Some entries probe the server's limits (upload size, audio length, stream slots, idle and session
timeouts, frame size). Nothing on the server tells a client those, so they are options here, by
default what `configs.Settings` reads from this environment (the `ASR_*` variables and `.env`), i.e.
what a server started from the same shell uses. An entry that would have to wait longer than
`--max-wait-s` for a server timeout is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import av
import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from configs import Settings
from loadtest.evalset import normalize
from loadtest.rest import positive_float, positive_int
from loadtest.stream import decode_file, to_pcm, with_query

DEFAULT_URL = "http://127.0.0.1:8000"
JFK_FLAC = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "audio" / "faster_whisper_tests" / "jfk.flac"
JFK_REFERENCE = "and so my fellow americans ask not what your country can do for you ask what you can do for your country"
JFK_MIN_RECALL = 0.8  # share of the reference's words a resampled or oddly framed copy must still give
REQUEST_TIMEOUT_S = 120.0
STREAM_CLOSE_WAIT_S = 30.0  # longest a stream may take to close once the client asked (its last final included)
SETTLE_S = 5.0  # longest the server may take to release a stream session once its socket is gone
RATE_WINDOW_S = 2.0  # the stream message rate is averaged over this long
LONG_AUDIO_RATE = 4000  # the over-long WAV is 4 kHz, so that many seconds of it stay a small upload
HEAD_PIECE_BYTES = 8192  # a raw request's head is sent in pieces of this size ...
PIECE_PAUSE_S = 0.1  # ... this far apart
WAV_HEADER_BYTES = 100  # ffmpeg's WAV header with its LIST chunk, rounded up
NOT_JSON = "not-json"  # the "code" of an error body that is not the service's JSON error
SWITCHING_PROTOCOLS = 101
LEAK_MARKERS = ("Traceback (most recent call last)", "/site-packages/", 'File "/')
CLOSE = json.dumps({"type": "close"})
FINALIZE = json.dumps({"type": "finalize"})
WS_OPTIONS: dict[str, Any] = {"open_timeout": 30, "ping_interval": None, "compression": None, "proxy": None}

Surface = Literal["REST", "WS"]
TextCheck = Literal["any", "empty", "jfk"]  # empty: no words (a stream: finals, all empty); jfk: the JFK speech


@dataclass(frozen=True)
class Limits:
    """The server's limits that the catalog probes: its settings of the same names."""

    max_upload_bytes: int
    max_audio_s: float
    stream_max_sessions: int
    stream_idle_timeout_s: float
    stream_max_session_s: float
    stream_max_frame_bytes: int
    stream_max_messages_per_s: float
    max_wait_s: float = 60.0  # an entry waiting longer than this for a server timeout is skipped

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_upload_bytes, settings.max_audio_s, settings.stream_max_sessions,
                   settings.stream_idle_timeout_s, settings.stream_max_session_s, settings.stream_max_frame_bytes,
                   settings.stream_max_messages_per_s)


@dataclass(frozen=True)
class Outcome:
    """What one input got. `status`: the HTTP status (a stream's handshake: 101 when accepted), None when
    no answer came; `codes`: the error code of the body, or a stream's `error` events in order; `close`:
    a stream's close code; `text`: a 200's transcript, or a stream's finals joined (None: no final);
    `note`: what went wrong on the way (no answer, no close in time); `bodies`: every body and message."""

    status: int | None
    codes: tuple[str, ...] = ()
    close: int | None = None
    text: str | None = None
    note: str = ""
    bodies: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.status is None:
            return f"no answer: {self.note}"
        text = None if self.text is None else json.dumps(self.text[:40] + ("..." if len(self.text) > 40 else ""))
        return " ".join([summary(self.status, self.codes, self.close, text), self.note]).strip()


def summary(status: int, codes: Sequence[str], close: int | None, text: str | None) -> str:
    """One line for an outcome or an expectation: `400 empty_audio`, `101, errors [bad_message], close 1000`."""
    if status != SWITCHING_PROTOCOLS:
        head = " ".join([str(status), *codes])
        return head if text is None else f"{head}, text {text}"
    parts = [str(status), *([f"errors [{', '.join(codes)}]"] if codes else []), f"close {close}"]
    return ", ".join(parts + ([] if text is None else [f"finals {text}"]))


def jfk_recall(text: str) -> float:
    """Share of the JFK reference's words (with their counts) found in `text`."""
    reference, said = Counter(JFK_REFERENCE.split()), Counter(normalize(text).split())
    return sum((reference & said).values()) / sum(reference.values())


@dataclass(frozen=True)
class Expect:
    """What an entry must get: the fields of an :class:`Outcome`, and a check of its text."""

    status: int
    codes: tuple[str, ...] = ()
    close: int | None = None
    text: TextCheck = "any"

    def met_by(self, got: Outcome) -> bool:
        if got.note or (got.status, got.codes, got.close) != (self.status, self.codes, self.close):
            return False
        if self.text == "empty":
            return got.text is not None and not normalize(got.text)
        return self.text == "any" or (got.text is not None and jfk_recall(got.text) >= JFK_MIN_RECALL)

    def describe(self) -> str:
        text = {"any": None, "empty": '""', "jfk": "~JFK"}[self.text]
        return summary(self.status, self.codes, self.close, text)


def error(status: int, code: str) -> Expect:
    """An HTTP answer (or refused handshake) with this status and error code."""
    return Expect(status, (code,))


def transcribed(text: TextCheck = "any") -> Expect:
    return Expect(200, text=text)


def stream(*codes: str, close: int = 1000, text: TextCheck = "any") -> Expect:
    """An accepted stream that sent these `error` events and closed with `close`."""
    return Expect(SWITCHING_PROTOCOLS, codes, close, text)


@dataclass(frozen=True)
class Target:
    """The server under test, and the HTTP client every REST entry shares."""

    base_url: str
    limits: Limits
    http: httpx.AsyncClient

    @property
    def stream_url(self) -> str:
        return "ws" + self.base_url.removeprefix("http") + "/v1/stream"


Perform = Callable[[Target], Awaitable[Outcome]]


def runs_always(limits: Limits) -> str | None:
    return None


@dataclass(frozen=True)
class Entry:
    """One kind of bad input: `perform` sends it and returns what came back; `skip_reason` says why it
    cannot run against a server with these limits (None: it can)."""

    name: str
    surface: Surface
    expect: Expect
    perform: Perform
    skip_reason: Callable[[Limits], str | None] = runs_always


@dataclass
class Row:
    """One entry's line of the report; `ok`: it got what it expected and left the server well."""

    number: int
    name: str
    surface: Surface
    expected: str
    outcome: Outcome | None  # None when skipped
    problems: list[str] = field(default_factory=list)  # internals shown in a body, the server unwell afterwards
    ok: bool = False
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def got(self) -> str:
        if self.outcome is None:
            return f"skipped: {self.skipped}"
        return "; ".join([self.outcome.describe(), *self.problems])

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "got": self.got}


# ---- inputs -------------------------------------------------------------------------------------


@functools.cache
def jfk_flac() -> bytes:
    return JFK_FLAC.read_bytes()


@functools.cache
def jfk_samples() -> np.ndarray:
    return decode_file(JFK_FLAC)


def wav_file(samples: np.ndarray, rate: int = 16000, *, file_rate: int | None = None, layout: str = "mono",
             codec: str = "pcm_s16le") -> bytes:
    """Mono float samples at `rate` -> a WAV file at `file_rate` (default: `rate`) with `layout`
    channels in `codec`; ffmpeg's encoder resamples and upmixes."""
    out = io.BytesIO()
    with av.open(out, "w", format="wav") as container:
        audio = container.add_stream(codec, rate=file_rate or rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*audio.encode(frame), *audio.encode(None)]:
            container.mux(packet)
    return out.getvalue()


def silence_wav(seconds: float) -> bytes:
    return wav_file(np.zeros(round(16000 * seconds)))


def truncated_wav() -> bytes:
    """10 s of silence cut to its first third: the header still declares all 10 s."""
    data = silence_wav(10)
    return data[: len(data) // 3]


def wav_data_offset(wav: bytes) -> int:
    """Where the data chunk's header starts (ffmpeg writes a LIST chunk before it)."""
    return wav.index(b"data", 12)


def wav_claiming_huge_data() -> bytes:
    """0.1 s of silence whose RIFF and data chunk sizes claim about 2 GB."""
    wav = bytearray(silence_wav(0.1))
    size_at = wav_data_offset(wav) + 4
    wav[4:8], wav[size_at : size_at + 4] = (0x7FFFFFF8).to_bytes(4, "little"), (0x7FFFFFF0).to_bytes(4, "little")
    return bytes(wav)


def header_only_wav() -> bytes:
    """A WAV's header with an empty data chunk: a well-formed file of no samples."""
    wav = silence_wav(0.1)
    header = bytearray(wav[: wav_data_offset(wav) + 8])
    header[4:8] = (len(header) - 8).to_bytes(4, "little")  # the RIFF size: all that follows it
    header[-4:] = bytes(4)  # the data chunk's size
    return bytes(header)


def flac_audio_offset(flac: bytes) -> int:
    """Where a FLAC's audio frames start: past "fLaC" and its metadata blocks (the last one is flagged)."""
    offset = 4
    while True:
        last, size = flac[offset] & 0x80, int.from_bytes(flac[offset + 1 : offset + 4], "big")
        offset += 4 + size
        if last:
            return offset


def scrambled_flac() -> bytes:
    """The JFK FLAC with its audio frames' bytes shuffled: intact metadata, then nothing decodable."""
    data, start = np.frombuffer(jfk_flac(), np.uint8), flac_audio_offset(jfk_flac())
    return data[:start].tobytes() + np.random.default_rng(0).permutation(data[start:]).tobytes()


def nan_float_wav() -> bytes:
    """3 s of 32-bit float WAV: full scale, with NaN, +Inf and -Inf samples all through."""
    samples = np.full(16000 * 3, 1.0, np.float32)
    samples[::7], samples[::11], samples[::13] = np.nan, np.inf, -np.inf
    return wav_file(samples, codec="pcm_f32le")


def non_finite_f32_frame() -> bytes:
    """100 ms of pcm_f32le that is all NaN, +Inf, -Inf and 1e30."""
    return np.tile(np.array([np.nan, np.inf, -np.inf, 1e30], "<f4"), 400).tobytes()


def too_long_seconds(limits: Limits) -> float:
    return limits.max_audio_s + 5


def too_long_wav(limits: Limits) -> bytes:
    """A quiet tone longer than the audio limit, at 4 kHz so that it stays a small upload."""
    return wav_file(np.full(round(LONG_AUDIO_RATE * too_long_seconds(limits)), 0.1), LONG_AUDIO_RATE)


def too_long_wav_fits(limits: Limits) -> str | None:
    size = WAV_HEADER_BYTES + 2 * LONG_AUDIO_RATE * too_long_seconds(limits)
    return None if size <= limits.max_upload_bytes else f"{too_long_seconds(limits):g} s of audio do not fit in the upload limit"


def odd_frames(pcm: bytes, sizes: Sequence[int] = (3201, 1, 4799, 3)) -> list[bytes]:
    """`pcm` cut into frames of odd byte lengths, so that most cuts split a 16-bit sample in two."""
    frames, start, next_sizes = [], 0, itertools.cycle(sizes)
    while start < len(pcm):
        size = next(next_sizes)
        frames.append(pcm[start : start + size])
        start += size
    return frames


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


async def zeros_in_chunks(total: int, chunk: int = 1 << 16) -> AsyncIterator[bytes]:
    """A body of `total` zero bytes with no length known up front: httpx sends it chunked."""
    for start in range(0, total, chunk):
        yield bytes(min(chunk, total - start))


# ---- REST ---------------------------------------------------------------------------------------


def http_outcome(status: int, body: bytes) -> Outcome:
    """An HTTP answer (a refused stream handshake included): an error's code, or a 200's transcript."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status >= 400:
        shaped = isinstance(data, dict) and set(data) == {"error"} and isinstance(data["error"], dict)
        return Outcome(status, (str(data["error"].get("code")) if shaped else NOT_JSON,), bodies=(text,))
    transcript = data.get("text") if isinstance(data, dict) else None
    return Outcome(status, text=transcript if isinstance(transcript, str) else None, bodies=(text,))


async def send(target: Target, method: str = "POST", path: str = "/v1/transcribe", **request: Any) -> Outcome:
    """One request through httpx (`content=`, `files=`, `data=`, `params=`)."""
    try:
        response = await target.http.request(method, path, **request)
    except httpx.TransportError as exc:
        return Outcome(None, note=f"{type(exc).__name__}: {exc}")
    return http_outcome(response.status_code, response.content)


async def send_raw(target: Target, path: str, body: bytes = b"", *, content_length: int | str | None = None) -> Outcome:
    """A POST over a bare socket, for what httpx will not send: a Content-Length the body does not
    have, a URL over 64 kB. The head goes in pieces of `HEAD_PIECE_BYTES` a pause apart, as a slow
    client sends it (the server's answer to a long head would otherwise depend on how TCP happens to
    cut it), and nothing more is sent once the server has answered."""
    url = urlsplit(target.base_url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body) if content_length is None else content_length}\r\nConnection: close\r\n\r\n").encode()
    pieces = [head[start : start + HEAD_PIECE_BYTES] for start in range(0, len(head), HEAD_PIECE_BYTES)] + [body]
    try:
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
        try:
            start = await send_until_answered(reader, writer, pieces)
            status, answer = await asyncio.wait_for(read_http_answer(reader, start), REQUEST_TIMEOUT_S)
        finally:
            writer.close()
    except (OSError, TimeoutError, EOFError) as exc:
        return Outcome(None, note=f"{type(exc).__name__}: {exc}")
    except (IndexError, ValueError) as exc:
        return Outcome(None, note=f"not an HTTP answer ({exc})")
    return http_outcome(status, answer)


async def send_until_answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: list[bytes]) -> bytes:
    """Send `pieces` one after the other, `PIECE_PAUSE_S` apart, until the server's answer begins; its first bytes."""
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(reader.read(1 << 16), PIECE_PAUSE_S)
    return b""


async def read_http_answer(reader: asyncio.StreamReader, start: bytes) -> tuple[int, bytes]:
    """The status and body of the HTTP answer that begins with `start`. The body ends after its
    Content-Length (the server may keep the socket open a while after a refusal), else at EOF."""
    answer = start
    while b"\r\n\r\n" not in answer and (more := await reader.read(1 << 16)):
        answer += more
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    if "content-length" in headers:
        body += await reader.readexactly(max(0, int(headers["content-length"]) - len(body)))
    else:
        body += await reader.read()
    return int(status_line.split()[1]), body


def openai_form(**form: str) -> dict[str, Any]:
    """The OpenAI route's form with a real file, so that only the fields in `form` can be at fault."""
    return {"files": {"file": ("jfk.flac", jfk_flac())}, "data": form}


async def openai(target: Target, **request: Any) -> Outcome:
    return await send(target, path="/v1/audio/transcriptions", **request)


# ---- WebSocket ----------------------------------------------------------------------------------

Script = Callable[[ClientConnection], Awaitable[None]]


def sends(*messages: str | bytes) -> Script:
    """A script that sends these messages in order (text as text frames, bytes as binary)."""
    async def script(ws: ClientConnection) -> None:
        for message in messages:
            await ws.send(message)
    return script


async def collect(ws: ClientConnection, messages: list[str]) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            messages.append(message if isinstance(message, str) else message.decode("utf-8", "replace"))


def parse_event(message: str) -> dict[str, Any]:
    try:
        event = json.loads(message)
    except ValueError:
        event = None
    return event if isinstance(event, dict) else {"type": NOT_JSON}


def stream_outcome(messages: list[str], close: int | None, note: str) -> Outcome:
    """An accepted stream's messages -> its error codes, and its finals' texts joined (None: no final)."""
    events = [parse_event(message) for message in messages]
    codes = tuple(str(event.get("code")) for event in events if event.get("type") == "error")
    finals = [str(event.get("text", "")) for event in events if event.get("type") == "final"]
    text = " ".join(final for final in finals if final) if finals else None
    return Outcome(SWITCHING_PROTOCOLS, codes, close, text, note, tuple(messages))


async def stream_session(target: Target, script: Script, *, query: dict[str, str] | None = None,
                         wait_s: float = STREAM_CLOSE_WAIT_S) -> Outcome:
    """One stream: connect with `query`, run `script` while every server message is collected, then
    wait up to `wait_s` for the server to close. The server closing the socket in the middle of the
    script is an outcome like any other, not an error."""
    note = ""
    try:
        async with connect(with_query(target.stream_url, query or {}), **WS_OPTIONS) as ws:
            messages: list[str] = []
            reader = asyncio.create_task(collect(ws, messages))
            with contextlib.suppress(ConnectionClosed):
                await script(ws)
            try:
                await asyncio.wait_for(reader, wait_s)
            except TimeoutError:
                note = f"(still open {wait_s:g} s after the script)"
    except InvalidStatus as exc:
        return http_outcome(exc.response.status_code, exc.response.body or b"")
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        return Outcome(None, note=f"{type(exc).__name__}: {exc}")
    return stream_outcome(messages, ws.close_code, note)


async def one_stream_too_many(target: Target) -> Outcome:
    """Take every stream slot, then ask for one more."""
    async with contextlib.AsyncExitStack() as held:
        for _ in range(target.limits.stream_max_sessions):
            ws = await held.enter_async_context(connect(target.stream_url, **WS_OPTIONS))
            await ws.recv()  # `ready`: the slot is taken
        return await stream_session(target, sends(CLOSE))


async def outlive_the_session_limit(target: Target) -> Outcome:
    """Never idle (silence every half idle timeout), so that only the session length can end the stream."""
    limits = target.limits

    async def keep_sending(ws: ClientConnection) -> None:
        silence = to_pcm(np.zeros(1600), "pcm_s16le")
        deadline = time.monotonic() + limits.stream_max_session_s + SETTLE_S
        while time.monotonic() < deadline:
            await ws.send(silence)
            await asyncio.sleep(limits.stream_idle_timeout_s / 2)

    return await stream_session(target, keep_sending)


async def flood_messages(target: Target) -> Outcome:
    """Twice the allowed message rate, sustained over the averaging window, sent in one burst."""
    rate = target.limits.stream_max_messages_per_s
    frame = to_pcm(np.zeros(160), "pcm_s16le")  # 10 ms of silence
    return await stream_session(target, sends(*[frame] * math.ceil(2 * rate * RATE_WINDOW_S), CLOSE))


async def drop_mid_stream(ws: ClientConnection) -> None:
    """Some audio, then the TCP connection is cut: no close frame ever reaches the server."""
    await ws.send(to_pcm(jfk_samples()[:16000], "pcm_s16le"))
    ws.transport.abort()


def waits_for(seconds: Callable[[Limits], float], setting: str) -> Callable[[Limits], str | None]:
    """Skips an entry that would wait longer than `--max-wait-s` for the server's `setting`."""
    def skip_reason(limits: Limits) -> str | None:
        wait = seconds(limits)
        return None if wait <= limits.max_wait_s else f"waits {wait:g} s for {setting}, over --max-wait-s {limits.max_wait_s:g}"
    return skip_reason


# ---- the catalog --------------------------------------------------------------------------------

# The expectations are what the server does (checked against app/), the README's errors table for
# the most part. Where the server's answer is arguably wrong, the entry records it as it is and says so.
CATALOG: tuple[Entry, ...] = (
    # REST: bodies that are not (whole) audio
    Entry("empty body", "REST", error(400, "empty_audio"), lambda t: send(t, content=b"")),
    Entry("plain text instead of audio", "REST", error(415, "unsupported_audio"),
          lambda t: send(t, content=b"this is plain text, not sound " * 50)),
    Entry("50 kB of random bytes", "REST", error(415, "unsupported_audio"), lambda t: send(t, content=random_bytes(50_000))),
    Entry("WAV cut to its first third", "REST", error(400, "truncated_audio"), lambda t: send(t, content=truncated_wav())),
    Entry("JFK FLAC, its audio frames' bytes shuffled", "REST", error(400, "corrupt_audio"), lambda t: send(t, content=scrambled_flac())),
    Entry("WAV header claiming 2 GB of data", "REST", error(400, "truncated_audio"), lambda t: send(t, content=wav_claiming_huge_data())),
    Entry("WAV header, no samples", "REST", error(400, "corrupt_audio"), lambda t: send(t, content=header_only_wav())),
    # REST: size limits
    Entry("Content-Length over the upload limit, no body sent", "REST", error(413, "payload_too_large"),
          lambda t: send_raw(t, "/v1/transcribe", content_length=t.limits.max_upload_bytes + 1)),
    Entry("chunked body over the upload limit, no Content-Length", "REST", error(413, "payload_too_large"),
          lambda t: send(t, content=zeros_in_chunks(t.limits.max_upload_bytes + 1))),
    # uvicorn's HTTP parser refuses the request before the app sees it, with a plain-text 400
    Entry("Content-Length of 23 digits", "REST", error(400, NOT_JSON),
          lambda t: send_raw(t, "/v1/transcribe", content_length="9" * 23)),
    Entry("audio 5 s over the audio-length limit", "REST", error(413, "audio_too_long"),
          lambda t: send(t, content=too_long_wav(t.limits)), too_long_wav_fits),
    # REST: forms
    Entry("multipart without a 'file' field", "REST", error(400, "missing_file"),
          lambda t: send(t, files={"audio": ("jfk.flac", jfk_flac())})),
    Entry("multipart with an empty 'file'", "REST", error(400, "empty_audio"), lambda t: send(t, files={"file": ("a.wav", b"")})),
    Entry("multipart Content-Type without a boundary", "REST", error(400, "bad_request"),
          lambda t: send(t, content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data"})),
    Entry("?language=xx", "REST", error(400, "unsupported_language"),
          lambda t: send(t, params={"language": "xx"}, content=silence_wav(1))),
    Entry("?language= 5000 characters", "REST", error(422, "invalid_request"),
          lambda t: send(t, params={"language": "x" * 5000}, content=silence_wav(1))),
    Entry("?model= a model not served, JFK as the body", "REST", error(404, "model_not_found"),
          lambda t: send(t, content=jfk_flac(), params={"model": "large-v9"})),
    Entry("OpenAI: unknown model", "REST", error(404, "model_not_found"), lambda t: openai(t, **openai_form(model="large-v9"))),
    Entry("OpenAI: temperature 1.5", "REST", error(422, "invalid_request"), lambda t: openai(t, **openai_form(temperature="1.5"))),
    Entry("OpenAI: temperature NaN", "REST", error(422, "invalid_request"), lambda t: openai(t, **openai_form(temperature="nan"))),
    Entry("OpenAI: response_format=mp3", "REST", error(422, "invalid_request"), lambda t: openai(t, **openai_form(response_format="mp3"))),
    Entry("OpenAI: timestamp_granularities[]=character", "REST", error(400, "unsupported_granularity"),
          lambda t: openai(t, **openai_form(**{"timestamp_granularities[]": "character"}))),
    Entry("OpenAI: beam_size 0", "REST", error(422, "invalid_request"), lambda t: openai(t, **openai_form(beam_size="0"))),
    Entry("OpenAI: no file", "REST", error(422, "invalid_request"), lambda t: openai(t, data={"model": "whisper-1"})),
    Entry("GET /v1/transcribe", "REST", error(405, "method_not_allowed"), lambda t: send(t, "GET")),
    Entry("GET an unknown path", "REST", error(404, "not_found"), lambda t: send(t, "GET", "/v1/nothing")),
    # REST: odd but valid audio
    Entry("float WAV full of NaN and Inf", "REST", transcribed(), lambda t: send(t, content=nan_float_wav())),
    Entry("3 s of digital silence", "REST", transcribed("empty"), lambda t: send(t, content=silence_wav(3))),
    Entry("WAV of 10 samples", "REST", transcribed("empty"), lambda t: send(t, content=wav_file(np.full(10, 0.5)))),
    Entry("JFK as 8 kHz WAV", "REST", transcribed("jfk"), lambda t: send(t, content=wav_file(jfk_samples(), file_rate=8000))),
    Entry("JFK as stereo WAV", "REST", transcribed("jfk"), lambda t: send(t, content=wav_file(jfk_samples(), layout="stereo"))),
    Entry("JFK as 48 kHz WAV", "REST", transcribed("jfk"), lambda t: send(t, content=wav_file(jfk_samples(), file_rate=48000))),
    # uvicorn refuses a request head over 16 kB (h11_max_incomplete_event_size) before the app sees it
    Entry("JFK with a 100 kB prompt in the query", "REST", error(400, NOT_JSON),
          lambda t: send_raw(t, "/v1/transcribe?prompt=" + "word+" * 20_000, jfk_flac())),
    Entry("OpenAI: JFK with a 100 kB prompt field", "REST", transcribed("jfk"),
          lambda t: openai(t, **openai_form(prompt="word " * 20_000))),
    # WS: refused handshakes
    Entry("?sample_rate=7", "WS", error(400, "bad_options"), lambda t: stream_session(t, sends(CLOSE), query={"sample_rate": "7"})),
    Entry("unknown query option ?color=red", "WS", error(400, "bad_options"),
          lambda t: stream_session(t, sends(CLOSE), query={"color": "red"})),
    Entry("?encoding=mp3", "WS", error(400, "bad_options"), lambda t: stream_session(t, sends(CLOSE), query={"encoding": "mp3"})),
    Entry("?model= a model not served", "WS", error(404, "model_not_found"), lambda t: stream_session(t, sends(CLOSE), query={"model": "large-v9"})),
    Entry("start naming a model not served", "WS", stream("bad_start"), lambda t: stream_session(t, sends('{"type": "start", "model": "large-v9"}', CLOSE))),
    Entry("one stream more than the stream slots", "WS", error(503, "server_busy"), one_stream_too_many),
    # WS: bad control messages, which leave the stream open
    Entry("text that is not JSON", "WS", stream("bad_message"), lambda t: stream_session(t, sends("{not json", CLOSE))),
    Entry("JSON object without 'type'", "WS", stream("bad_message"), lambda t: stream_session(t, sends('{"sample_rate": 8000}', CLOSE))),
    Entry("JSON array", "WS", stream("bad_message"), lambda t: stream_session(t, sends("[1, 2]", CLOSE))),
    Entry("unknown message type", "WS", stream("unknown_message"), lambda t: stream_session(t, sends('{"type": "dance"}', CLOSE))),
    Entry("start after audio", "WS", stream("bad_message"),
          lambda t: stream_session(t, sends(bytes(3200), json.dumps({"type": "start"}), CLOSE))),
    Entry("start with a bad sample_rate and an unknown field", "WS", stream("bad_start"),
          lambda t: stream_session(t, sends(json.dumps({"type": "start", "sample_rate": "fast", "color": "red"}), CLOSE))),
    Entry("finalize before any audio", "WS", stream(text="empty"), lambda t: stream_session(t, sends(FINALIZE, CLOSE))),
    # WS: frames
    Entry("binary frame of exactly the frame limit", "WS", stream(),
          lambda t: stream_session(t, sends(bytes(t.limits.stream_max_frame_bytes), CLOSE))),
    Entry("binary frame 2 bytes over the frame limit", "WS", stream("frame_too_large", close=1009),
          lambda t: stream_session(t, sends(bytes(t.limits.stream_max_frame_bytes + 2), CLOSE))),
    Entry("text message over the frame limit", "WS", stream("frame_too_large", close=1009),
          lambda t: stream_session(t, sends("x" * (t.limits.stream_max_frame_bytes + 1), CLOSE))),
    Entry("JFK in odd-length s16 frames", "WS", stream(text="jfk"),
          lambda t: stream_session(t, sends(*odd_frames(to_pcm(jfk_samples(), "pcm_s16le")), FINALIZE, CLOSE),
                                   query={"interim_results": "false"})),
    Entry("30 frames of random bytes", "WS", stream(),
          lambda t: stream_session(t, sends(*[random_bytes(3200, seed) for seed in range(30)], CLOSE))),
    Entry("f32 frames of NaN, Inf and 1e30", "WS", stream(),
          lambda t: stream_session(t, sends(*[non_finite_f32_frame()] * 10, CLOSE), query={"encoding": "pcm_f32le"})),
    # WS: clients that go away or stay too long
    Entry("client closes right after the handshake", "WS", stream(), lambda t: stream_session(t, lambda ws: ws.close())),
    # 1006 is the client's own view; what counts is the check after it, that the server let the session go
    Entry("TCP cut mid-stream, no close frame", "WS", stream(close=1006), lambda t: stream_session(t, drop_mid_stream)),
    Entry("client sends nothing", "WS", stream("idle_timeout", close=1008),
          lambda t: stream_session(t, sends(), wait_s=t.limits.stream_idle_timeout_s + SETTLE_S),
          waits_for(lambda limits: limits.stream_idle_timeout_s, "ASR_STREAM_IDLE_TIMEOUT_S")),
    Entry("stream open past the session limit", "WS", stream("session_too_long", close=1008), outlive_the_session_limit,
          waits_for(lambda limits: limits.stream_max_session_s, "ASR_STREAM_MAX_SESSION_S")),
    Entry("messages at twice the rate limit", "WS", stream("rate_limited", close=1008), flood_messages),
    # last: after all of the above, real speech is still transcribed
    Entry("JFK FLAC, after everything above", "REST", transcribed("jfk"), lambda t: send(t, content=jfk_flac())),
)


# ---- running it ---------------------------------------------------------------------------------


async def stream_sessions_held(target: Target) -> float:
    """Stream sessions the server holds or counts as connected now (0 when it exports neither metric)."""
    metrics = (await target.http.get("/metrics")).text
    values = [float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith(("asr_stream_sessions_held ", "asr_streams_active "))]
    return max(values, default=0.0)


async def server_problems(target: Target) -> list[str]:
    """What is wrong with the server after an entry: /healthz not 200, or a stream session still held
    `SETTLE_S` after its socket closed (a leak, or a slot the next stream could not get)."""
    try:
        health = await target.http.get("/healthz")
        if health.status_code != 200:
            return [f"then /healthz {health.status_code}"]
        deadline = time.monotonic() + SETTLE_S
        while (held := await stream_sessions_held(target)) > 0:
            if time.monotonic() > deadline:
                return [f"then {held:g} stream session(s) still held after {SETTLE_S:g} s"]
            await asyncio.sleep(0.1)
    except httpx.TransportError as exc:
        return [f"then no answer from the server ({type(exc).__name__})"]
    return []


async def run_entry(number: int, entry: Entry, target: Target) -> Row:
    row = Row(number, entry.name, entry.surface, entry.expect.describe(), None, skipped=entry.skip_reason(target.limits))
    if row.skipped is not None:
        return row
    started = time.monotonic()
    try:
        row.outcome = await entry.perform(target)
    except Exception as exc:  # noqa: BLE001 - a client-side failure is this row's result, not the end of the run
        row.outcome = Outcome(None, note=f"client error {type(exc).__name__}: {exc}")
    row.seconds = time.monotonic() - started
    row.problems = [f"body shows {marker!r}" for marker in LEAK_MARKERS if any(marker in body for body in row.outcome.bodies)]
    row.problems += await server_problems(target)
    row.ok = entry.expect.met_by(row.outcome) and not row.problems
    return row


async def run_catalog_async(base_url: str, limits: Limits, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    base_url = base_url.rstrip("/")
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as http:
        target = Target(base_url, limits, http)
        rows = []
        for number, entry in enumerate(CATALOG, 1):
            rows.append(await run_entry(number, entry, target))
            if on_row is not None:
                on_row(rows[-1])
        return rows


def run_catalog(base_url: str, limits: Limits | None = None, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Fire every entry at the server at `base_url`, one after the other; `limits` default to this
    environment's settings."""
    return asyncio.run(run_catalog_async(base_url, limits or Limits.from_settings(Settings()), on_row))


def all_as_expected(rows: Sequence[Row]) -> bool:
    return all(row.ok or row.skipped for row in rows)


def markdown_table(rows: Sequence[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| # | surface | input | expected | got | ok |", "|---|---|---|---|---|---|"]
    for row in rows:
        ok = "skipped" if row.skipped else "yes" if row.ok else "**NO**"
        lines.append(f"| {row.number} | {row.surface} | {cell(row.name)} | {cell(row.expected)} | {cell(row.got)} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = Limits.from_settings(Settings())
    parser = argparse.ArgumentParser(prog="python -m loadtest.bad_inputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's base URL (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the rows as JSON")
    limit_options = [
        ("--max-upload-bytes", "max_upload_bytes", positive_int, "ASR_MAX_UPLOAD_BYTES"),
        ("--max-audio-s", "max_audio_s", positive_float, "ASR_MAX_AUDIO_S"),
        ("--stream-max-sessions", "stream_max_sessions", positive_int, "ASR_STREAM_MAX_SESSIONS"),
        ("--stream-idle-timeout-s", "stream_idle_timeout_s", positive_float, "ASR_STREAM_IDLE_TIMEOUT_S"),
        ("--stream-max-session-s", "stream_max_session_s", positive_float, "ASR_STREAM_MAX_SESSION_S"),
        ("--stream-max-frame-bytes", "stream_max_frame_bytes", positive_int, "ASR_STREAM_MAX_FRAME_BYTES"),
        ("--max-messages-per-s", "stream_max_messages_per_s", positive_float, "ASR_STREAM_MAX_MESSAGES_PER_S"),
    ]
    for flag, name, kind, setting in limit_options:
        parser.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name), metavar="N" if kind is positive_int else "S",
                            help=f"the server's {setting} (default: %(default)s)")
    parser.add_argument("--max-wait-s", type=positive_float, default=defaults.max_wait_s, metavar="S",
                        help="skip entries that wait longer than this for a server timeout (default: %(default)s)")
    args = parser.parse_args(argv)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})

    def progress(row: Row) -> None:
        print(f"[{row.number}/{len(CATALOG)}] {row.name}: {row.got}", file=sys.stderr)

    started = time.monotonic()
    rows = run_catalog(args.url, limits, progress)
    print(markdown_table(rows))
    ran = [row for row in rows if not row.skipped]
    print(f"\n{sum(row.ok for row in ran)}/{len(ran)} as expected, {len(rows) - len(ran)} skipped, "
          f"{time.monotonic() - started:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps([row.to_json() for row in rows], indent=2) + "\n")
    return 0 if all_as_expected(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
