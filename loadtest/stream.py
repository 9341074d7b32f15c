"""Load test for the streaming endpoint: play audio files to `/v1/stream` at real-time pace over N
concurrent WebSocket sessions, and report accuracy, latency and how the sessions ended.

Run: python -m loadtest.stream --set librispeech_test_other_resemblyzer --streams 4

Each file is played in its own session as 16 kHz mono frames of `--frame-ms` ms; frame k is due at
t0 + k * frame_s / speed, t0 being when `ready` arrived (an absolute schedule, so sleeps do not
drift). After the last frame the client sends `finalize` and `close`, and reads until the server
closes the socket. All times are the client's `time.monotonic()`; `--speed 0` sends without pacing.

Definitions (per file):
- final latency: for a final the client caused (reason `finalize` or `close`), from sending the last
  audio frame (immediately followed by that command) to receiving the final; for a final the server
  decided on its own (`endpoint`, `max_length`), from sending the frame that carried the audio at the
  final's `end` second to receiving it. An endpoint final therefore includes the silence the server
  waits for before it decides that the utterance ended.
- last-final latency: the final latency of the file's last final when the client caused it (`close`): how
  long a client that has sent all its audio waits for the rest of its transcript.
- first-partial latency: from sending the first audio frame to receiving the file's first partial.
- partial interval: time between consecutive partials of the same utterance (how often text updates).
  Partials carry no audio end time, so no latency against the audio is defined for them.
- behind schedule: a frame sent more than 1 s later than it was due (the client, the network or the
  server's back-pressure could not keep up with the pace).
- hypothesis: the texts of the file's finals joined with spaces in order; WER is over the files that
  have a reference in the manifest, a failed session scoring as all deletions.

The latency column of the event lines shows the final latency for finals, the first-partial latency
for a file's first partial and the partial interval for the other partials.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from app.audio import PCM_ENCODINGS
from app.errors import APIError
from loadtest.evalset import DEFAULT_MANIFEST, load_rows, percentile, word_error_rate
from loadtest.rest import positive_int

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"
DEFAULT_TIMEOUT_S = 60.0
BEHIND_SCHEDULE_S = 1.0
MAX_FILE_S = 24 * 3600.0  # decode limit for input files; the server enforces its own session limits
CLIENT_REASONS = ("finalize", "close")  # final reasons that answer a client command

Json = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    """One server message: when it arrived (monotonic clock) and its parsed JSON."""

    received_at: float
    data: Json

    @property
    def type(self) -> str:
        return str(self.data.get("type", ""))


@dataclass
class StreamRecord:
    """Everything one session did. `sent` holds, after each frame, (audio seconds sent so far, send
    time); `handshake_status` is the HTTP status of a refused handshake; `error` says why the session
    did not run to a close (refused, no connection, timed out), None when it did."""

    audio_s: float
    started_at: float
    events: list[Event] = field(default_factory=list)
    sent: list[tuple[float, float]] = field(default_factory=list)
    frames_behind: int = 0
    close_code: int | None = None
    close_reason: str = ""
    handshake_status: int | None = None
    error: str | None = None

    @property
    def finals(self) -> list[Event]:
        return [e for e in self.events if e.type == "final"]

    @property
    def final_texts(self) -> list[str]:
        return [str(e.data.get("text", "")).strip() for e in self.finals]

    @property
    def hypothesis(self) -> str:
        return " ".join(t for t in self.final_texts if t)

    @property
    def error_events(self) -> list[Event]:
        return [e for e in self.events if e.type == "error"]

    def sent_at(self, audio_s: float) -> float | None:
        """When the frame carrying the audio at `audio_s` seconds was sent (the last frame if the audio
        is past what was sent); None before any frame."""
        if not self.sent:
            return None
        i = bisect.bisect_left(self.sent, audio_s, key=lambda s: s[0])
        return self.sent[min(i, len(self.sent) - 1)][1]

    def latency(self, index: int) -> float | None:
        """The latency of `events[index]` as the module docstring defines it; None where none is
        defined. Uses only what was known when the event arrived, so live and final figures agree."""
        event = self.events[index]
        if event.type == "final":
            if event.data.get("reason") in CLIENT_REASONS or "end" not in event.data:
                sent = self.sent[-1][1] if self.sent else None
            else:
                sent = self.sent_at(float(event.data["end"]))
            return None if sent is None else event.received_at - sent
        if event.type != "partial":
            return None
        previous = next((e for e in reversed(self.events[:index]) if e.type == "partial"), None)
        if previous is None:
            return event.received_at - self.sent[0][1] if self.sent else None
        same_utterance = previous.data.get("utterance") == event.data.get("utterance")
        return event.received_at - previous.received_at if same_utterance else None

    def _indices(self, kind: str) -> list[int]:
        return [i for i, e in enumerate(self.events) if e.type == kind]

    @property
    def first_partial_latency_s(self) -> float | None:
        partials = self._indices("partial")
        return self.latency(partials[0]) if partials else None

    @property
    def partial_intervals_s(self) -> list[float]:
        return [lat for i in self._indices("partial")[1:] if (lat := self.latency(i)) is not None]

    @property
    def final_latencies_s(self) -> list[float]:
        return [lat for i in self._indices("final") if (lat := self.latency(i)) is not None]

    @property
    def last_final_latency_s(self) -> float | None:
        finals = self._indices("final")
        if not finals or self.events[finals[-1]].data.get("reason") not in CLIENT_REASONS:
            return None
        return self.latency(finals[-1])

    def to_json(self) -> Json:
        return {
            "audio_s": self.audio_s,
            "audio_s_sent": self.sent[-1][0] if self.sent else 0.0,
            "frames_sent": len(self.sent),
            "frames_behind": self.frames_behind,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "handshake_status": self.handshake_status,
            "error": self.error,
            "hypothesis": self.hypothesis,
            "first_partial_latency_s": self.first_partial_latency_s,
            "partial_intervals_s": self.partial_intervals_s,
            "final_latencies_s": self.final_latencies_s,
            "last_final_latency_s": self.last_final_latency_s,
            "events": [{"t": e.received_at - self.started_at, **e.data} for e in self.events],
        }


def to_pcm(audio: np.ndarray, encoding: str) -> bytes:
    """Float samples in [-1, 1] -> raw PCM as the server reads it: little-endian `pcm_s16le` (clipped and
    rounded) or `pcm_f32le`, or G.711 `pcm_mulaw` / `pcm_alaw` (each sample's nearest code)."""
    samples = np.asarray(audio, dtype=np.float32)
    if encoding == "pcm_f32le":
        return samples.astype("<f4").tobytes()
    if encoding == "pcm_s16le":
        return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()
    if encoding in PCM_ENCODINGS:
        values = PCM_ENCODINGS[encoding].to_float(np.arange(256, dtype=np.uint8))
        order = np.argsort(values)
        ranked = values[order]
        right = np.clip(np.searchsorted(ranked, samples), 1, 255)
        nearer_left = samples - ranked[right - 1] < ranked[right] - samples
        return order[np.where(nearer_left, right - 1, right)].astype(np.uint8).tobytes()
    raise ValueError(f"unknown encoding {encoding!r}: use one of {', '.join(PCM_ENCODINGS)}")


def with_query(url: str, params: dict[str, Any]) -> str:
    """`url` with `params` added to its query string (a parameter already in the URL wins)."""
    parts = urlsplit(url)
    query = {k: str(v) for k, v in params.items()} | dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode(query)))


def frame_due(t0: float, k: int, frame_s: float, speed: float) -> float | None:
    """When frame k is due on the absolute schedule; None at speed 0 (no schedule)."""
    return None if speed == 0 else t0 + k * frame_s / speed


def refusal_text(body: bytes | None) -> str:
    """A refused handshake's body, `{"error": {"code", "message"}}` as one line, else the raw text."""
    try:
        err = json.loads(body or b"")["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return (body or b"").decode("utf-8", "replace")[:200]


class LiveStream:
    """One open WebSocket session: send audio and commands, iterate over the server's messages."""

    def __init__(self, ws: ClientConnection, encoding: str):
        self.ws, self.encoding = ws, encoding

    async def send_audio(self, audio: np.ndarray) -> None:
        await self.ws.send(to_pcm(audio, self.encoding))

    async def send_json(self, message: Json) -> None:
        await self.ws.send(json.dumps(message))

    async def events(self) -> AsyncIterator[Event]:
        """Server messages until the connection closes (normally or not: see `close_code`). A message
        that is not a JSON object comes as an event of type "invalid"."""
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                try:
                    data = json.loads(message)
                except ValueError:
                    data = None
                if not isinstance(data, dict):
                    data = {"type": "invalid", "message": repr(message)[:200]}
                yield Event(time.monotonic(), data)

    @property
    def close_code(self) -> int | None:
        """The server's close code (1006 if the connection dropped without one); None while open."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str:
        return self.ws.close_reason or ""


@asynccontextmanager
async def open_stream(
    url: str,
    *,
    sample_rate: int = 16000,
    encoding: str = "pcm_s16le",
    start_options: Json | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    connect_options: Json | None = None,
) -> AsyncIterator[LiveStream]:
    """Connect to the stream endpoint. Without `start_options` the sample rate and encoding go as
    query parameters; with them (even {}), in a first `start` message together with those options.
    A refused handshake raises `InvalidStatus`. No proxy, no compression (the client should cost the
    machine little) and no keepalive pings (a busy server must not look like a dead one).
    `connect_options` go to websockets' `connect` as they are: an `origin`, or a `local_addr` to
    connect from (another loopback address is another client to per-client limits)."""
    if start_options is None:
        url = with_query(url, {"sample_rate": sample_rate, "encoding": encoding})
    async with connect(url, open_timeout=timeout_s, ping_interval=None, compression=None, proxy=None, **(connect_options or {})) as ws:
        session = LiveStream(ws, encoding)
        if start_options is not None:
            start = {"type": "start", "sample_rate": sample_rate, "encoding": encoding, **start_options}
            await session.send_json(start)
        yield session


EventFn = Callable[[StreamRecord, int], None]


class StreamClient:
    """Plays audio to the stream endpoint, one session per `run_file` call (calls may run concurrently).
    `timeout_s` bounds each wait on the server: connecting, `ready`, and the close after the last frame;
    `connect_options` are `open_stream`'s."""

    def __init__(
        self,
        url: str,
        *,
        sample_rate: int = 16000,
        encoding: str = "pcm_s16le",
        frame_ms: int = 100,
        speed: float = 1.0,
        start_options: Json | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_options: Json | None = None,
    ):
        if frame_ms <= 0 or speed < 0:
            raise ValueError(f"need frame_ms > 0 and speed >= 0, got {frame_ms} and {speed}")
        self.url, self.sample_rate, self.encoding = url, sample_rate, encoding
        self.frame_ms, self.speed, self.start_options, self.timeout_s = frame_ms, speed, start_options, timeout_s
        self.connect_options = connect_options

    async def run_file(
        self, audio: np.ndarray, *, finalize: bool = True, on_event: EventFn | None = None
    ) -> StreamRecord:
        """Stream `audio` (float32 mono at `sample_rate`) in one session and return what happened.
        Never raises for the server's behaviour: refusals, drops and timeouts end up in the record.
        `on_event(record, index)` is called as each event arrives."""
        record = StreamRecord(audio_s=audio.size / self.sample_rate, started_at=time.monotonic())
        try:
            async with open_stream(
                self.url,
                sample_rate=self.sample_rate,
                encoding=self.encoding,
                start_options=self.start_options,
                timeout_s=self.timeout_s,
                connect_options=self.connect_options,
            ) as session:
                await self._exchange(session, audio, record, finalize, on_event)
            record.close_code, record.close_reason = session.close_code, session.close_reason
        except InvalidStatus as exc:
            record.handshake_status = exc.response.status_code
            record.error = f"HTTP {exc.response.status_code}: {refusal_text(exc.response.body)}"
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    async def _exchange(
        self, session: LiveStream, audio: np.ndarray, record: StreamRecord, finalize: bool, on_event: EventFn | None
    ) -> None:
        first_message = asyncio.Event()

        async def receive() -> None:
            try:
                async for event in session.events():
                    record.events.append(event)
                    first_message.set()
                    if on_event is not None:
                        on_event(record, len(record.events) - 1)
            finally:
                first_message.set()

        receiver = asyncio.create_task(receive())
        try:
            await asyncio.wait_for(first_message.wait(), self.timeout_s)
            if record.events and record.events[0].type == "ready":
                with contextlib.suppress(ConnectionClosed):  # a drop shows in the close code
                    await self._send_frames(session, audio, record)
                    if finalize:
                        await session.send_json({"type": "finalize"})
                    await session.send_json({"type": "close"})
            await asyncio.wait_for(receiver, self.timeout_s)
        except TimeoutError:
            record.error = f"no answer from the server within {self.timeout_s:g} s"
        finally:
            receiver.cancel()
            await asyncio.wait([receiver])

    async def _send_frames(self, session: LiveStream, audio: np.ndarray, record: StreamRecord) -> None:
        frame_samples = max(1, round(self.sample_rate * self.frame_ms / 1000))
        frame_s = frame_samples / self.sample_rate
        t0 = time.monotonic()
        for k, start in enumerate(range(0, audio.size, frame_samples)):
            due = frame_due(t0, k, frame_s, self.speed)
            await asyncio.sleep(0 if due is None else max(0.0, due - time.monotonic()))
            if due is not None and time.monotonic() - due > BEHIND_SCHEDULE_S:
                record.frames_behind += 1
            frame = audio[start : start + frame_samples]
            await session.send_audio(frame)
            record.sent.append(((start + frame.size) / self.sample_rate, time.monotonic()))


# ----------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class FileResult:
    """One file played by one stream; `reference` is None for a file the manifest does not have."""

    stream: int
    audio: Path
    reference: str | None
    record: StreamRecord

    def to_json(self) -> Json:
        return {"stream": self.stream, "audio": str(self.audio), "reference": self.reference, **self.record.to_json()}


def assign(items: Sequence[T], streams: int) -> list[list[T]]:
    """Deal items round-robin over the streams; with fewer items than streams, stream i plays item
    i mod len(items), so one file and N streams gives N sessions of that file."""
    total = max(len(items), streams) if items else 0
    return [[items[j % len(items)] for j in range(i, total, streams)] for i in range(streams)]


def _pct(values: Sequence[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if math.isnan(value) else value


def summarize(results: Sequence[FileResult], *, streams: int, wall_s: float) -> Json:
    records = [r.record for r in results]
    scored = [r for r in results if r.reference is not None]
    first_partials = [lat for rec in records if (lat := rec.first_partial_latency_s) is not None]
    intervals = [lat for rec in records for lat in rec.partial_intervals_s]
    finals = [lat for rec in records for lat in rec.final_latencies_s]
    last_finals = [lat for rec in records if (lat := rec.last_final_latency_s) is not None]
    errors = [e for rec in records for e in rec.error_events]

    def close_key(rec: StreamRecord) -> str:
        if rec.handshake_status is not None:
            return f"HTTP {rec.handshake_status}"
        return "no connection" if rec.close_code is None else str(rec.close_code)

    return {
        "files": len(results),
        "streams": streams,
        "audio_s": sum(rec.sent[-1][0] for rec in records if rec.sent),
        "wall_s": wall_s,
        "wer": word_error_rate([r.reference or "" for r in scored], [r.record.hypothesis for r in scored])
        if scored
        else None,
        "wer_files": len(scored),
        "first_partial_p50_s": _pct(first_partials, 50),
        "first_partial_p95_s": _pct(first_partials, 95),
        "partial_interval_p50_s": _pct(intervals, 50),
        "partial_interval_p95_s": _pct(intervals, 95),
        "final_latency_p50_s": _pct(finals, 50),
        "final_latency_p95_s": _pct(finals, 95),
        "last_final_latency_p50_s": _pct(last_finals, 50),
        "last_final_latency_p95_s": _pct(last_finals, 95),
        "error_events": dict(Counter(str(e.data.get("code", "?")) for e in errors)),
        "close_codes": dict(Counter(close_key(rec) for rec in records)),
        "failed_sessions": sum(rec.error is not None for rec in records),
        "frames_sent": sum(len(rec.sent) for rec in records),
        "frames_behind": sum(rec.frames_behind for rec in records),
    }


def format_summary(summary: Json) -> str:
    def secs(key: str) -> str:
        p50, p95 = summary[f"{key}_p50_s"], summary[f"{key}_p95_s"]
        return " / ".join("n/a" if v is None else f"{v:.2f}" for v in (p50, p95))

    def counts(key: str) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(summary[key].items())) or "none"

    wer = "n/a" if summary["wer"] is None else f"{100 * summary['wer']:.2f}"
    return "\n".join(
        [
            f"files                     {summary['files']} over {summary['streams']} streams",
            f"audio s                   {summary['audio_s']:.1f}",
            f"wall s                    {summary['wall_s']:.1f}",
            f"WER %                     {wer} ({summary['wer_files']} files with a reference)",
            f"first partial p50/p95 s   {secs('first_partial')}",
            f"partial interval p50/p95  {secs('partial_interval')}",
            f"final latency p50/p95 s   {secs('final_latency')}",
            f"last final p50/p95 s      {secs('last_final_latency')} (after the last audio and close)",
            f"error events              {sum(summary['error_events'].values())} ({counts('error_events')})",
            f"close codes               {counts('close_codes')}",
            f"failed sessions           {summary['failed_sessions']}",
            f"frames behind schedule    {summary['frames_behind']} of {summary['frames_sent']}",
        ]
    )


def format_event(stream: int, name: str, record: StreamRecord, index: int) -> str:
    """One line per event: stream, file, type, latency (see the module docstring), text."""
    data = record.events[index].data
    latency = record.latency(index)
    kind = str(data.get("type", ""))
    if kind == "final":
        text = f"({data.get('reason', '?')}) {data.get('text', '')}"
    elif kind == "error":
        text = f"{data.get('code', '?')}: {data.get('message', '')}"
    else:
        text = str(data.get("text", data.get("session_id", data.get("reason", data.get("message", "")))))
    lat = "" if latency is None else f"{latency:.2f}s"
    return f"[{stream}] {name}  {kind:<7} {lat:>7}  {text}"


async def run_streams(
    client: StreamClient,
    plan: Sequence[Sequence[tuple[Path, str | None]]],
    audio: dict[Path, np.ndarray],
    *,
    quiet: bool,
) -> list[FileResult]:
    """Run one coroutine per stream, each playing its (file, reference) list one file after another."""
    results: list[FileResult] = []
    total = sum(len(files) for files in plan)

    async def stream(sid: int, files: Sequence[tuple[Path, str | None]]) -> None:
        for path, reference in files:

            def show(record: StreamRecord, index: int) -> None:
                print(format_event(sid, path.name, record, index), file=sys.stderr)

            record = await client.run_file(audio[path], on_event=None if quiet else show)
            results.append(FileResult(sid, path, reference, record))
            outcome = record.error or f"close {record.close_code} {record.close_reason}".rstrip()
            print(f"[{len(results):>{len(str(total))}}/{total}] stream {sid} {path.name}: {outcome}", file=sys.stderr)

    await asyncio.gather(*(stream(sid, files) for sid, files in enumerate(plan)))
    return sorted(results, key=lambda r: r.stream)


def decode_file(path: Path) -> np.ndarray:
    """The file as float32 mono 16 kHz, decoded as the server decodes uploads."""
    from app.audio import decode_audio  # imported here: it pulls in torch, which the client itself does not need

    return decode_audio(path.read_bytes(), MAX_FILE_S)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE", help="audio files to play (any ffmpeg format)")
    parser.add_argument("--url", default=DEFAULT_URL, help="stream endpoint (default: %(default)s)")
    parser.add_argument(
        "--speed",
        type=non_negative_float,
        default=1.0,
        help="pace as a multiple of real time; 0 = as fast as possible (default: %(default)s)",
    )
    parser.add_argument(
        "--streams", metavar="N", type=positive_int, default=1, help="concurrent sessions (default: %(default)s)"
    )
    parser.add_argument(
        "--frame-ms", metavar="MS", type=positive_int, default=100, help="audio per frame (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="SOURCE_SET",
        help="also play the manifest's WER rows of this source_set; repeat for several",
    )
    parser.add_argument("--limit", metavar="K", type=positive_int, help="only the first K rows of the --set rows")
    parser.add_argument(
        "--manifest",
        metavar="PATH",
        type=Path,
        default=DEFAULT_MANIFEST,
        help="eval manifest.jsonl, also the source of references for FILEs (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="longest wait on the server at each step of a session (default: %(default)s)",
    )
    parser.add_argument("--json-out", metavar="PATH", type=Path, help="also write the summary and per-file records")
    parser.add_argument("--quiet", action="store_true", help="print only per-file progress and the summary")
    args = parser.parse_args(argv)
    if not args.files and not args.sets:
        parser.error("give audio files, --set SOURCE_SET, or both")

    try:
        rows = load_rows(args.manifest, sets=args.sets, limit=args.limit) if args.sets else []
        known = load_rows(args.manifest) if args.files and args.manifest.exists() else []
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    references = {row.audio: row.text for row in known}
    files = [(path.resolve(), references.get(path.resolve())) for path in args.files]
    files += [(row.audio, row.text) for row in rows]
    if not files:
        parser.error("no rows match")

    audio: dict[Path, np.ndarray] = {}
    for path, _ in files:
        try:
            if path not in audio:
                audio[path] = decode_file(path)
        except OSError as exc:
            parser.error(f"{path}: {exc}")
        except APIError as exc:
            parser.error(f"{path}: {exc.message}")

    plan = assign(files, args.streams)
    sessions = sum(map(len, plan))
    print(f"playing {sessions} files on {args.streams} streams to {args.url} at speed {args.speed:g}", file=sys.stderr)
    client = StreamClient(args.url, frame_ms=args.frame_ms, speed=args.speed, timeout_s=args.timeout)
    start = time.monotonic()
    results = asyncio.run(run_streams(client, plan, audio, quiet=args.quiet))
    summary = summarize(results, streams=args.streams, wall_s=time.monotonic() - start)
    print(format_summary(summary))
    if args.json_out:
        body = {"summary": summary, "files": [r.to_json() for r in results]}
        args.json_out.write_text(json.dumps(body, indent=2) + "\n")


if __name__ == "__main__":
    main()
