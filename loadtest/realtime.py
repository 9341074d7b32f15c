"""Load test of OpenAI's Realtime transcription on `/v1/realtime`, through the official `openai` SDK used
unchanged: play audio files at real-time pace, one session per file, and report accuracy and latency
against the same files sent to `/v1/audio/transcriptions`.

Run: python -m loadtest.realtime --start-server --set librispeech_test_other_resemblyzer

Each file is played in its own session. The SDK's client (`client.realtime`, the GA dialect, or with
`--dialect beta` `client.beta.realtime`) connects with `?intent=transcription` and sends one session update:
24 kHz `pcm` audio, and server VAD at OpenAI's defaults (threshold 0.5, prefix padding 300 ms, silence
500 ms), or with `--manual` no turn detection. Then `input_audio_buffer.append` events of `--chunk-ms` of
audio, each due at t0 + k * chunk / speed (an absolute schedule), then 1 s of silence; with `--manual`, one
`input_audio_buffer.commit` at the end. The client reads until every item it heard of has completed or failed.

Definitions (client clock, `time.monotonic()`):
- completion latency: from receiving an item's `speech_stopped` (server VAD) or sending the commit
  (`--manual`) to receiving its `conversation.item.input_audio_transcription.completed`.
- first delta: from an item's `speech_started` to its first `delta` (server VAD).
- hypothesis: a file's completed transcripts joined in order; WER over all files (a failed session
  scores as all deletions), against the REST answer's WER on the same files in the same run.
- revised: items whose completed transcript does not begin with their deltas joined.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.evalset import DEFAULT_MANIFEST, load_rows, word_error_rate
from loadtest.harness import free_port, seconds, spread, target_server, wav_bytes, write_json
from loadtest.rest import positive_int
from loadtest.stream import decode_file, non_negative_float, to_pcm

REALTIME_RATE = 24000  # OpenAI's pcm format
OPENAI_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
TRAILING_SILENCE_S = 1.0
DEFAULT_SET = "librispeech_test_other_resemblyzer"

Json = dict[str, Any]


def resampled(audio: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz float samples at ``rate``, through swresample as the server's own PCM path."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(np.asarray(audio, dtype=np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    frames = resampler.resample(frame) + resampler.resample(None)
    return np.clip(np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), -1.0, 1.0)


@dataclass
class ItemRecord:
    id: str
    speech_started_at: float | None = None
    speech_stopped_at: float | None = None
    committed_at: float | None = None
    completed_at: float | None = None
    first_delta_at: float | None = None
    audio_start_ms: int | None = None
    audio_end_ms: int | None = None
    previous_item_id: str | None = None
    deltas: list[str] = field(default_factory=list)
    transcript: str | None = None
    failure: Json | None = None

    @property
    def done(self) -> bool:
        return self.transcript is not None or self.failure is not None


@dataclass
class RealtimeRecord:
    """What one session heard, in order."""

    started_at: float
    events: list[tuple[float, Json]] = field(default_factory=list)
    items: dict[str, ItemRecord] = field(default_factory=dict)  # in the order the client heard of them
    errors: list[Json] = field(default_factory=list)
    commit_sent_at: float | None = None
    failure: str | None = None  # the session broke (connection, timeout)

    @property
    def types(self) -> list[str]:
        return [event["type"] for _, event in self.events]

    @property
    def hypothesis(self) -> str:
        return " ".join(item.transcript for item in self.items.values() if item.transcript)

    def item(self, item_id: str) -> ItemRecord:
        return self.items.setdefault(item_id, ItemRecord(item_id))

    def heard(self, at: float, event: Json) -> None:
        self.events.append((at, event))
        kind = event["type"]
        if kind == "error":
            self.errors.append(event["error"])
            return
        if "item_id" not in event:
            return
        item = self.item(event["item_id"])
        if kind == "input_audio_buffer.speech_started":
            item.speech_started_at, item.audio_start_ms = at, event["audio_start_ms"]
        elif kind == "input_audio_buffer.speech_stopped":
            item.speech_stopped_at, item.audio_end_ms = at, event["audio_end_ms"]
        elif kind == "input_audio_buffer.committed":
            item.committed_at, item.previous_item_id = at, event.get("previous_item_id")
        elif kind.endswith("input_audio_transcription.delta"):
            item.first_delta_at = item.first_delta_at or at
            item.deltas.append(event["delta"])
        elif kind.endswith("input_audio_transcription.completed"):
            item.completed_at, item.transcript = at, event["transcript"]
        elif kind.endswith("input_audio_transcription.failed"):
            item.completed_at, item.failure = at, event["error"]

    def settled(self) -> bool:
        """Every item heard of is committed and done (no utterance is still open)."""
        return all(item.committed_at is not None and item.done for item in self.items.values())

    def completion_latencies(self) -> list[float]:
        latencies = []
        for item in self.items.values():
            since = item.speech_stopped_at if item.speech_stopped_at is not None else self.commit_sent_at
            if item.completed_at is not None and item.transcript is not None and since is not None:
                latencies.append(item.completed_at - since)
        return latencies

    def first_delta_latencies(self) -> list[float]:
        return [i.first_delta_at - i.speech_started_at for i in self.items.values()
                if i.first_delta_at is not None and i.speech_started_at is not None]

    def revised(self) -> int:
        return sum(1 for i in self.items.values() if i.transcript is not None and not i.transcript.startswith("".join(i.deltas)))


def client_for(url: str, api_key: str | None) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", websocket_base_url=url.replace("http", "ws", 1) + "/v1",
                              api_key=api_key or "unused", max_retries=0)


def session_update(dialect: str, manual: bool, language: str | None = "en", model: str = "gpt-4o-transcribe") -> Json:
    turn = None if manual else OPENAI_VAD
    transcription = {"model": model, **({"language": language} if language else {})}
    if dialect == "beta":
        return {"type": "transcription_session.update",
                "session": {"input_audio_format": "pcm16", "input_audio_transcription": transcription, "turn_detection": turn}}
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": REALTIME_RATE}, "transcription": transcription, "turn_detection": turn}}}}


async def play(url: str, audio: np.ndarray, *, dialect: str = "ga", manual: bool = False, speed: float = 1.0,
               chunk_ms: int = 100, api_key: str | None = None, timeout_s: float = 30.0) -> RealtimeRecord:
    """One session: the file (16 kHz float) played through the SDK's Realtime client at ``speed`` x real time."""
    pcm = to_pcm(resampled(np.concatenate([audio, np.zeros(int(TRAILING_SILENCE_S * 16000), np.float32)]), REALTIME_RATE), "pcm_s16le")
    client = client_for(url, api_key)
    realtime = client.beta.realtime if dialect == "beta" else client.realtime
    # the beta client insists on a model in the URL; a transcription session's model is the session's
    connect = realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"})
    record = RealtimeRecord(time.monotonic())
    async with connect as connection:

        async def send() -> None:
            await connection.send(session_update(dialect, manual))
            step = REALTIME_RATE * 2 * chunk_ms // 1000
            t0 = time.monotonic()
            for k, offset in enumerate(range(0, len(pcm), step)):
                if speed > 0 and (wait := t0 + k * chunk_ms / 1000 / speed - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await connection.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[offset : offset + step]).decode()})
            if manual:
                await connection.send({"type": "input_audio_buffer.commit"})
                record.commit_sent_at = time.monotonic()

        async def receive() -> None:
            async for event in connection:  # the SDK's own parsing of each server event
                record.heard(time.monotonic(), event.to_dict())

        async def settled(sender: asyncio.Task, receiver: asyncio.Task) -> None:
            await sender
            while not (record.items and record.settled()):
                if receiver.done():
                    receiver.result()  # the connection ended: why
                    raise ConnectionError("the server closed the session before every item completed")
                await asyncio.sleep(0.02)

        sender, receiver = asyncio.create_task(send()), asyncio.create_task(receive())
        try:
            await asyncio.wait_for(settled(sender, receiver), timeout=len(audio) / 16000 / (speed or 1e9) + TRAILING_SILENCE_S + timeout_s)
        except Exception as exc:  # noqa: BLE001 - a broken session is reported, not raised
            record.failure = f"{type(exc).__name__}: {exc}"
        finally:
            sender.cancel()
            receiver.cancel()
    return record


async def rest_texts(url: str, files: list[tuple[Path, np.ndarray]], api_key: str | None) -> list[str]:
    """The same files through /v1/audio/transcriptions (the SDK's client), one at a time."""
    client = client_for(url, api_key)
    texts = []
    for path, audio in files:
        answer = await client.audio.transcriptions.create(model="whisper-1", file=(path.name, wav_bytes(audio)), language="en")
        texts.append(answer.text)
    return texts


def summarize(records: list[RealtimeRecord], references: list[str], rest: list[str] | None) -> Json:
    completion = [v for r in records for v in r.completion_latencies()]
    first_delta = [v for r in records for v in r.first_delta_latencies()]
    items = [i for r in records for i in r.items.values()]
    return {
        "files": len(records), "sessions_failed": sum(r.failure is not None for r in records),
        "items": len(items), "items_failed": sum(i.failure is not None for i in items),
        "errors": sum(len(r.errors) for r in records), "revised": sum(r.revised() for r in records),
        "wer": round(word_error_rate(references, [r.hypothesis for r in records]), 4),
        "rest_wer": None if rest is None else round(word_error_rate(references, rest), 4),
        "completion_latency": spread(completion),
        "first_delta_after_speech_started": spread(first_delta),
    }


def format_summary(summary: Json, dialect: str, manual: bool) -> str:
    c, d = summary["completion_latency"], summary["first_delta_after_speech_started"]
    mode = "manual commits" if manual else "server VAD"
    rest = "n/a" if summary["rest_wer"] is None else f"{summary['rest_wer']:.2%}"
    return "\n".join([
        f"realtime ({dialect}, {mode}): {summary['files']} files, {summary['items']} items, {summary['sessions_failed']} sessions failed, "
        f"{summary['items_failed']} items failed, {summary['errors']} error events, {summary['revised']} revised",
        f"WER {summary['wer']:.2%} (REST on the same files: {rest})",
        f"completion latency p50 {seconds(c['p50_s'])} s, p95 {seconds(c['p95_s'])} s, max {seconds(c['max_s'])} s",
        f"first delta after speech_started p50 {seconds(d['p50_s'])} s, p95 {seconds(d['p95_s'])} s",
    ])


async def run(url: str, files: list[tuple[Path, np.ndarray, str]], args: argparse.Namespace) -> tuple[list[RealtimeRecord], list[str] | None]:
    records = []
    for k, (path, audio, _) in enumerate(files, 1):
        record = await play(url, audio, dialect=args.dialect, manual=args.manual, speed=args.speed, chunk_ms=args.chunk_ms,
                            api_key=args.api_key, timeout_s=args.timeout)
        records.append(record)
        latencies = record.completion_latencies()
        if record.failure is not None:
            state = record.failure
        else:
            state = f"{len(record.items)} items, the slowest completed {max(latencies):.2f} s after its end" if latencies else "no item"
        print(f"[{k}/{len(files)}] {path.name}: {state}", file=sys.stderr)
    rest = None if args.no_rest else await rest_texts(url, [(p, a) for p, a, _ in files], args.api_key)
    return records, rest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.realtime", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--start-server", action="store_true", help="start `python -m app` here and stop it after")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="eval manifest.jsonl (default: %(default)s)")
    parser.add_argument("--set", dest="source_set", default=DEFAULT_SET, help="rows to play (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, help="only the first K rows")
    parser.add_argument("--dialect", choices=["ga", "beta"], default="ga", help="the SDK's client: realtime (GA) or beta.realtime")
    parser.add_argument("--manual", action="store_true", help="no turn detection: one commit at the end of each file")
    parser.add_argument("--speed", type=non_negative_float, default=1.0, help="pace as a multiple of real time (default: %(default)s)")
    parser.add_argument("--chunk-ms", type=positive_int, default=100, help="audio per append event (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="longest wait past the audio for a session's last item (default: %(default)s)")
    parser.add_argument("--api-key", help="the server's API key, if it has ASR_API_KEYS")
    parser.add_argument("--no-rest", action="store_true", help="skip the REST comparison")
    parser.add_argument("--json", type=Path, help="also write the summary and every session's events")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.manifest, sets=[args.source_set], limit=args.limit)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not rows:
        parser.error(f"no WER rows in {args.source_set}")
    files = [(row.audio, decode_file(row.audio), row.text) for row in rows]
    print(f"playing {len(files)} files through the openai SDK's Realtime client ({args.dialect}) at speed {args.speed:g}", file=sys.stderr)
    with target_server(args.url, free_port()) as target:
        records, rest = asyncio.run(run(target.url, files, args))
    summary = summarize(records, [text for *_, text in files], rest)
    print(format_summary(summary, args.dialect, args.manual))
    if args.json:
        write_json(args.json, {"summary": summary, "sessions": [
            {"audio": str(path), "failure": r.failure, "events": [{"t": round(t - r.started_at, 3), **e} for t, e in r.events]}
            for (path, *_), r in zip(files, records)]})


if __name__ == "__main__":
    main()
