"""Abuse test: re-run the findings of the security review against a real server, and show that slow and
idle clients by the thousand no longer slow down good requests and streams.

Part 1, one finding at a time, each with what the server answers now and how fast (a server with default
settings but ASR_CORS_ORIGINS=https://app.example, run in a temporary folder that holds speech.flac, the
file a nested open would find):
1. an ffconcat list naming speech.flac: 415, no transcript.
2. an SDP file pointing ffmpeg's RTP demuxer at a UDP port bound here: 415; nothing arrives on the port,
   and the server holds no UDP socket afterwards (its socket descriptors against /proc/PID/net/udp).
3. 8 SDP files at once beside a good 11 s file (jfk.flac): the good file's latency (19.7 s before the fix)
   against its latency on the idle server ("normal").
4. 200 connections that send a header line every 5 s and never end their headers: how long each was
   open until the server closed it, what it answered (408), and a good request meanwhile.
5. an upload trickled at 1 KB/s (complete headers, a large Content-Length): when it was cut, what it got.
6. a stream handshake from a foreign Origin (403), and one from the listed origin (101).
7. idle streams (no audio): closed after ASR_STREAM_FIRST_AUDIO_TIMEOUT_S with error no_audio, close 1008.

Part 2, on a fresh server with ASR_STREAM_MAX_SESSIONS_PER_CLIENT=4: the good REST request and real-time
stream (jfk.flac, from 127.0.0.2) on the idle server, then 1,000 slow-header connections and 50 idle
streams from 127.0.0.1 and the same good request and stream meanwhile; and the same stream from 127.0.0.1,
first while the idle streams hold that address's slots (429 expected), then once they are closed.

A good stream's latency is that of its last final as loadtest.stream defines it (after `finalize`: from
the last audio frame). A deadline counts as kept when the cut comes within DEADLINE_SLACK_S of it, a good
request or stream as unhurt within SLOWDOWN_ALLOWED x its normal time + SLOWDOWN_GRACE_S. Exit code 1
when a check fails. With --url the server's settings and folder are its own: the report says what it did.

Run: python -m loadtest.abuse --start-server --plot loadtest/results/abuse.png --json loadtest/results/abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from websockets.exceptions import InvalidHandshake, InvalidStatus

from configs import Settings
from loadtest.bad_inputs import JFK_FLAC, JFK_REFERENCE, http_outcome, read_http_answer
from loadtest.bench_rest import log
from loadtest.evalset import EvalRow, percentile, word_error_rate
from loadtest.harness import Json, RestLog, Target, TimedRecord, progress_lines, seconds, stream_url, target_server, write_json
from loadtest.plotting import new_figure, save_figure
from loadtest.stream import StreamClient, StreamRecord, decode_file, open_stream, refusal_text

ATTACKER, GOOD_CLIENT = "127.0.0.1", "127.0.0.2"  # two loopback addresses: two clients to per-client limits
ALLOWED_ORIGIN, FOREIGN_ORIGIN = "https://app.example", "https://evil.example"
PER_CLIENT_STREAMS = 4
CONCAT_LIST = b"ffconcat version 1.0\nfile 'speech.flac'\n"
SDP_AT_ONCE = 8
PART1_SLOW, PART1_IDLE = 200, 3
PART2_SLOW, PART2_IDLE = 1000, 50
HEADER_LINE_EVERY_S = 5.0
TRICKLE_PIECE_BYTES, TRICKLE_EVERY_S = 1024, 1.0  # 1 KB/s
TRICKLE_CONTENT_LENGTH = 10_000_000
UDP_LISTEN_S = 1.0  # how long the UDP port is watched after the SDP answer (ffmpeg's RTP sends at once)
BEFORE_FIX_S = 19.7  # the good file's latency beside 8 SDP uploads, as the review measured it
DEADLINE_SLACK_S = 2.0  # a 2-core machine accepting 1,000 connections at once starts some timers late
GIVE_UP_AFTER_S = 20.0  # past its deadline, a client stops waiting for the server to close it
SLOWDOWN_ALLOWED, SLOWDOWN_GRACE_S = 2.0, 1.0
REQUEST_TIMEOUT_S = 60.0
PROGRESS_S = 2.0
FD_HEADROOM = 256  # descriptors this process needs besides its client sockets


@dataclass(frozen=True)
class Deadlines:
    """The server's timeouts that the findings run into (its settings of the same names)."""

    header_timeout_s: float
    body_grace_s: float
    first_audio_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Deadlines:
        return cls(settings.header_timeout_s, settings.body_grace_s, settings.stream_first_audio_timeout_s)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"[{'PASS' if self.ok else 'FAIL'}] {self.name:<28} {self.detail}"


# ----------------------------------------------------------------------------- small figures


def on_time(value: float | None, deadline_s: float) -> bool:
    """Cut at its deadline: not before it (less the client's own clock lag), nor past the slack."""
    return value is not None and deadline_s - 0.1 <= value <= deadline_s + DEADLINE_SLACK_S


def unhurt(latency_s: float | None, normal_s: float | None) -> bool:
    return latency_s is not None and normal_s is not None and latency_s <= SLOWDOWN_ALLOWED * normal_s + SLOWDOWN_GRACE_S


def min_p50_max(values: Sequence[float]) -> Json:
    if not values:
        return {"n": 0, "min_s": None, "p50_s": None, "max_s": None}
    return {"n": len(values), "min_s": min(values), "p50_s": percentile(values, 50), "max_s": max(values)}


def spread_line(figures: Json) -> str:
    return "/".join(seconds(figures[k]) for k in ("min_s", "p50_s", "max_s")) + " s"


def tally(labels: Sequence[str]) -> str:
    """`408 request_timeout x200, closed, no answer x3`, the most common first."""
    return ", ".join(f"{label} x{n}" for label, n in Counter(labels).most_common()) or "none"


def text_ok(reference: str, hypothesis: str) -> tuple[bool, float]:
    wer = word_error_rate([reference], [hypothesis])
    return wer == 0, wer


# ----------------------------------------------------------------------------- REST uploads


@dataclass(frozen=True)
class Answer:
    """An HTTP answer to a hostile upload: status (None: no answer), error code, transcript, latency."""

    status: int | None
    code: str | None
    text: str | None
    latency_s: float
    note: str = ""

    def describe(self) -> str:
        if self.status is None:
            return f"no answer ({self.note}) after {self.latency_s:.2f} s"
        what = self.code or (f"transcript {self.text[:40]!r}" if self.text else "")
        return f"{self.status} {what} in {self.latency_s:.3f} s".replace("  ", " ")


def error_code(status: int, body: bytes) -> str | None:
    """The code of the service's JSON error body (`not-json` for another body); None for a success."""
    codes = http_outcome(status, body).codes
    return codes[0] if codes else None


async def upload(client: httpx.AsyncClient, url: str, name: str, data: bytes) -> Answer:
    """POST `data` as the multipart file `name`, as any client uploads a file."""
    start = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/transcribe", files={"file": (name, data, "application/octet-stream")})
    except httpx.HTTPError as exc:
        return Answer(None, None, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    latency, text = time.perf_counter() - start, http_outcome(response.status_code, response.content).text
    return Answer(response.status_code, error_code(response.status_code, response.content), text, latency)


def sdp_file(udp_port: int) -> bytes:
    """A session description whose audio arrives over RTP on `udp_port`: ffmpeg's sdp demuxer would open it."""
    return (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=abuse\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {udp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


@contextlib.contextmanager
def udp_trap() -> Iterator[socket.socket]:
    """A UDP socket on a loopback port, where the SDP files point: whatever the server sends there lands here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as trap:
        trap.bind((ATTACKER, 0))
        trap.setblocking(False)
        yield trap


def datagrams_in(trap: socket.socket) -> int:
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            trap.recv(65536)
            count += 1
    return count


def udp_sockets_of(pid: int) -> int:
    """UDP sockets process `pid` holds: /proc/PID/net/udp lists its network namespace's, /proc/PID/fd
    tells which of them are its own (by inode)."""
    inodes: set[str] = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(FileNotFoundError):
            inodes |= {line.split()[9] for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]}
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            held.add(str(fd.readlink()))
    return sum(f"socket:[{inode}]" in held for inode in inodes)


def bound_client(address: str) -> httpx.AsyncClient:
    """An HTTP client whose connections come from `address`."""
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, transport=httpx.AsyncHTTPTransport(local_address=address))


# ----------------------------------------------------------------------------- clients that send a piece at a time


@dataclass
class Held:
    """When a client connection opened and when the server closed it, in seconds since the phase's origin."""

    opened_at: float | None = None
    closed_at: float | None = None

    @property
    def held_s(self) -> float | None:
        return None if self.opened_at is None or self.closed_at is None else self.closed_at - self.opened_at


@dataclass
class Drip(Held):
    """A connection that sends its request a piece at a time: when it opened and when the server closed
    it (seconds since the phase's origin), what it sent and what the server answered. `opened_at` is when
    the connect began, set once it succeeded: the server's deadline cannot have started before it, and
    this process, busy opening a thousand connections, may resume a connect's coroutine much later."""

    sent_bytes: int = 0
    status: int | None = None
    code: str | None = None
    answer: str = ""  # the answer's error, as `code: message`
    error: str | None = None  # no connection, a reset, or still open when the client gave up

    def got(self) -> str:
        if self.closed_at is None:
            return self.error or "still open"
        if self.status is None:
            return "closed, no answer" + (f" ({self.error})" if self.error else "")
        return f"{self.status} {self.code or ''}".strip()


def header_pieces(host: str) -> Iterator[bytes]:
    """A request line, then header lines for ever: headers that never end."""
    yield f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode()
    for k in itertools.count(1):
        yield f"X-Slow-{k}: {k}\r\n".encode()


def trickle_pieces(host: str, body: bytes) -> Iterator[bytes]:
    """Complete headers announcing a large body, then the body TRICKLE_PIECE_BYTES at a time (cycling `body`)."""
    yield (f"POST /v1/transcribe HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
           f"Content-Length: {TRICKLE_CONTENT_LENGTH}\r\n\r\n").encode()
    yield from itertools.cycle(body[i : i + TRICKLE_PIECE_BYTES] for i in range(0, len(body), TRICKLE_PIECE_BYTES))


async def open_drip(drip: Drip, target: Target, address: str, origin: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    url, started = urlsplit(target.url), time.monotonic() - origin
    try:
        reader, writer = await asyncio.open_connection(url.hostname, url.port, local_addr=(address, 0))
    except OSError as exc:
        drip.error = f"no connection ({type(exc).__name__})"
        return None
    drip.opened_at = started
    return reader, writer


async def first_bytes_while_sending(drip: Drip, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                    pieces: Iterator[bytes], every_s: float) -> bytes:
    """Send the next piece every `every_s` until the server sends something (or b"" when it closes).
    Reading all along means an answer is taken in as it comes, before a late write could reset it."""
    while True:
        piece = next(pieces)
        writer.write(piece)
        drip.sent_bytes += len(piece)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(reader.read(1 << 16), every_s)


async def run_drip(drip: Drip, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: Iterator[bytes],
                   every_s: float, give_up_s: float, origin: float) -> None:
    """Drip `pieces` until the server answers and closes, or `give_up_s` has passed."""
    try:
        async with asyncio.timeout(give_up_s):
            if first := await first_bytes_while_sending(drip, reader, writer, pieces, every_s):
                drip.status, body = await read_http_answer(reader, first)
                drip.code, drip.answer = error_code(drip.status, body), refusal_text(body)
                await reader.read()  # the server closes after such an answer
        drip.closed_at = time.monotonic() - origin
    except TimeoutError:
        drip.error = f"still open after {give_up_s:g} s"
    except (OSError, EOFError, ValueError, IndexError) as exc:  # a reset, or no HTTP answer
        drip.closed_at, drip.error = time.monotonic() - origin, type(exc).__name__
    finally:
        writer.close()


async def slow_header_flood(drips: Sequence[Drip], target: Target, origin: float, give_up_s: float, opened: asyncio.Event) -> None:
    """One connection per drip from ATTACKER, all opened first (then `opened` is set), each then sending
    a header line every HEADER_LINE_EVERY_S until the server closes it."""
    host = urlsplit(target.url).netloc
    pairs = await asyncio.gather(*(open_drip(d, target, ATTACKER, origin) for d in drips))
    opened.set()
    await asyncio.gather(*(run_drip(d, *pair, header_pieces(host), HEADER_LINE_EVERY_S, give_up_s, origin)
                           for d, pair in zip(drips, pairs) if pair is not None))


def flood_progress(drips: Sequence[Drip]) -> str:
    opened = sum(d.opened_at is not None for d in drips)
    closed = [d for d in drips if d.closed_at is not None]
    return (f"slow connections open {opened - len(closed)} of {len(drips)}, closed {len(closed)} "
            f"(408: {sum(d.status == 408 for d in closed)})")


def flood_figures(drips: Sequence[Drip]) -> Json:
    return {"connections": len(drips), "held": min_p50_max([h for d in drips if (h := d.held_s) is not None]),
            "got": dict(Counter(d.got() for d in drips))}


# ----------------------------------------------------------------------------- streams


@dataclass
class IdleStream(Held):
    """A stream that sends nothing: its handshake's answer, and what the server sent and did after."""

    status: int | None = None  # 101 when accepted
    refusal: str = ""  # a refused handshake's `code: message`; opened_at: when the handshake began (see Drip)
    errors: list[str] = field(default_factory=list)  # codes of the error events
    close_code: int | None = None
    note: str = ""

    def got(self) -> str:
        if self.status is None:
            return self.note or "no handshake answer"
        if self.status != 101:
            return f"HTTP {self.status} {self.refusal.split(':', 1)[0]}"
        if self.closed_at is None:
            return self.note or "still open"
        return f"101, error {','.join(self.errors) or 'none'}, close {self.close_code}"


async def idle_stream(idle: IdleStream, url: str, origin: float, give_up_s: float) -> None:
    """Open a stream from ATTACKER and send nothing; record what the server does, for `give_up_s` at most."""
    started = time.monotonic() - origin
    try:
        async with open_stream(url, timeout_s=REQUEST_TIMEOUT_S, connect_options={"local_addr": (ATTACKER, 0)}) as session:
            idle.status, idle.opened_at = 101, started
            async with asyncio.timeout(give_up_s):
                idle.errors = [str(e.data.get("code")) async for e in session.events() if e.type == "error"]
            idle.closed_at, idle.close_code = time.monotonic() - origin, session.close_code
    except InvalidStatus as exc:
        idle.status, idle.refusal = exc.response.status_code, refusal_text(exc.response.body)
    except TimeoutError:
        idle.note = f"still open after {give_up_s:g} s" if idle.status == 101 else "no handshake answer in time"
    except (OSError, InvalidHandshake) as exc:
        idle.note = f"{type(exc).__name__}: {exc}"


async def handshake(url: str, origin: str) -> tuple[int | None, str]:
    """The answer to a stream handshake sent with this Origin: 101, or the refusal's status and `code: message`."""
    try:
        async with open_stream(url, timeout_s=REQUEST_TIMEOUT_S, connect_options={"origin": origin}):
            return 101, ""
    except InvalidStatus as exc:
        return exc.response.status_code, refusal_text(exc.response.body)
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def idle_progress(idles: Sequence[IdleStream]) -> str:
    accepted = [i for i in idles if i.status == 101]
    refused = sum(i.status is not None and i.status != 101 for i in idles)
    return f"idle streams open {sum(i.closed_at is None for i in accepted)}, refused {refused}, closed {sum(i.closed_at is not None for i in accepted)}"


def idle_figures(idles: Sequence[IdleStream]) -> Json:
    return {"streams": len(idles), "got": dict(Counter(i.got() for i in idles)),
            "held": min_p50_max([h for i in idles if (h := i.held_s) is not None])}


def idle_ok(idles: Sequence[IdleStream], deadlines: Deadlines) -> bool:
    """Every accepted idle stream got no_audio and 1008 at the deadline; every other one was refused at once."""
    accepted = [i for i in idles if i.status == 101]
    return bool(accepted) and all(i.errors == ["no_audio"] and i.close_code == 1008 and on_time(i.held_s, deadlines.first_audio_timeout_s)
                                  for i in accepted) and all(i.status in (429, 503) for i in idles if i.status != 101)


class LiveRecord:
    """The record of a stream as it runs (StreamClient's `on_event`), for the progress lines."""

    def __init__(self) -> None:
        self.record: StreamRecord | None = None

    def __call__(self, record: StreamRecord, index: int) -> None:
        self.record = record

    def progress(self) -> str:
        if self.record is None:
            return "not started"
        return f"{self.record.sent[-1][0] if self.record.sent else 0:.1f} s of audio sent"


def final_latency(record: StreamRecord) -> float | None:
    """The latency of the stream's last final (after `finalize`: from its last audio frame)."""
    finals = [i for i, e in enumerate(record.events) if e.type == "final"]
    return record.latency(finals[-1]) if finals else None


def stream_figures(record: StreamRecord, reference: str, origin: float) -> Json:
    ok, wer = text_ok(reference, record.hypothesis)
    return {"handshake_status": record.handshake_status, "error": record.error, "close_code": record.close_code,
            "final_latency_s": final_latency(record), "text_ok": ok, "wer": wer, "hypothesis": record.hypothesis,
            "started_at": record.started_at - origin, "last_audio_at": record.sent[-1][1] - origin if record.sent else None,
            "error_events": [str(e.data.get("code")) for e in record.error_events]}


def stream_line(figures: Json) -> str:
    if figures["handshake_status"] is not None or figures["error"]:
        return f"refused or failed: {figures['error']}"
    text = "text ok" if figures["text_ok"] else f"WER {100 * figures['wer']:.1f} %: {figures['hypothesis']!r}"
    return f"final {seconds(figures['final_latency_s'])} s after the last audio, {text}, close {figures['close_code']}"


def stream_unhurt(figures: Json, normal: Json) -> bool:
    return figures["close_code"] == 1000 and figures["text_ok"] and unhurt(figures["final_latency_s"], normal["final_latency_s"])


def rest_figures(timed: TimedRecord, reference: str) -> Json:
    r = timed.record
    ok, wer = text_ok(reference, r.hypothesis)
    return {"status": r.status, "latency_s": r.latency_s, "text_ok": ok, "wer": wer, "error": r.error,
            "sent_at": timed.sent_at, "answered_at": timed.answered_at}


def rest_line(figures: Json) -> str:
    if figures["status"] != 200:
        return f"{figures['status']} after {figures['latency_s']:.2f} s: {figures['error']}"
    return f"200 in {figures['latency_s']:.2f} s, {'text ok' if figures['text_ok'] else 'WER %.1f %%' % (100 * figures['wer'])}"


def rest_unhurt(figures: Json, normal: Json) -> bool:
    return figures["status"] == 200 and figures["text_ok"] and unhurt(figures["latency_s"], normal["latency_s"])


# ----------------------------------------------------------------------------- the run


@dataclass
class Good:
    """The good traffic: jfk.flac as a REST upload and as a real-time stream, and its reference."""

    row: EvalRow
    audio: np.ndarray

    @classmethod
    def load(cls) -> Good:
        audio = decode_file(JFK_FLAC)
        return cls(EvalRow(JFK_FLAC, JFK_REFERENCE, "faster_whisper_tests", audio.size / 16000), audio)

    async def request(self, client: httpx.AsyncClient, target: Target, rest_log: RestLog) -> Json:
        return rest_figures(await rest_log.send(client, target.url, len(rest_log.records), self.row), self.row.text)

    async def stream(self, target: Target, origin: float, address: str = GOOD_CLIENT, live: LiveRecord | None = None) -> Json:
        client = StreamClient(stream_url(target.url), speed=1.0, connect_options={"local_addr": (address, 0)})
        return stream_figures(await client.run_file(self.audio, on_event=live), self.row.text, origin)


@dataclass
class Run:
    """The checks and figures of a whole run, in the order they were made."""

    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # report lines that are figures, not checks
    figures: Json = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))
        self.notes.append(self.checks[-1].line())
        log(self.notes[-1])

    def note(self, line: str) -> None:
        self.notes.append(line)
        log(line)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


async def with_progress(label: str, every_s: float, line: Callable[[], str], work: Awaitable[object]) -> None:
    origin = time.monotonic()
    async with progress_lines(every_s, lambda: f"{label} {time.monotonic() - origin:5.1f} s: {line()}"):
        await work


async def concat_finding(client: httpx.AsyncClient, target: Target, run: Run, speech_placed: bool) -> Json:
    concat = await upload(client, target.url, "playlist.ffconcat", CONCAT_LIST)
    where = "speech.flac in the server's folder" if speech_placed else "the server's folder unknown (--url): speech.flac not placed"
    run.check("1 ffconcat list", concat.status == 415 and not concat.text, f"{concat.describe()} ({where})")
    return asdict(concat)


async def sdp_finding(client: httpx.AsyncClient, target: Target, run: Run) -> Json:
    with udp_trap() as trap:
        sdp = await upload(client, target.url, "session.sdp", sdp_file(trap.getsockname()[1]))
        await asyncio.sleep(UDP_LISTEN_S)
        datagrams = datagrams_in(trap)
    held = None if target.pid is None else udp_sockets_of(target.pid)
    run.check("2 SDP upload", sdp.status == 415 and datagrams == 0 and held in (0, None),
              f"{sdp.describe()}; the UDP port got {datagrams} datagrams in {UDP_LISTEN_S:g} s; server holds "
              f"{'? (pid unknown)' if held is None else held} UDP sockets")
    return {**asdict(sdp), "datagrams_received": datagrams, "server_udp_sockets": held}


async def sdp_crowd_finding(client: httpx.AsyncClient, target: Target, good: Good, normal: Json, run: Run) -> Json:
    with udp_trap() as trap:
        crowd = [asyncio.create_task(upload(client, target.url, f"s{k}.sdp", sdp_file(trap.getsockname()[1]))) for k in range(SDP_AT_ONCE)]
        beside = await good.request(client, target, RestLog(time.monotonic()))
        answers = await asyncio.gather(*crowd)
        datagrams = datagrams_in(trap)
    run.check(f"3 {SDP_AT_ONCE} SDP + good file", rest_unhurt(beside, normal) and all(a.status == 415 for a in answers) and datagrams == 0,
              f"good {rest_line(beside)} (normal {normal['latency_s']:.2f} s, before the fix {BEFORE_FIX_S} s); SDP: "
              f"{tally([f'{a.status} {a.code}' for a in answers])}, latency max {max(a.latency_s for a in answers):.3f} s")
    return {"good": beside, "sdp": [asdict(a) for a in answers], "datagrams_received": datagrams}


async def slow_header_finding(client: httpx.AsyncClient, target: Target, good: Good, normal: Json, deadlines: Deadlines, run: Run) -> Json:
    origin, opened = time.monotonic(), asyncio.Event()
    drips = [Drip() for _ in range(PART1_SLOW)]
    flood = asyncio.create_task(slow_header_flood(drips, target, origin, deadlines.header_timeout_s + GIVE_UP_AFTER_S, opened))
    meanwhile: list[Json] = []

    async def good_meanwhile() -> None:
        await opened.wait()
        meanwhile.append(await good.request(client, target, RestLog(origin)))
        await flood

    await with_progress("finding 4", PROGRESS_S, lambda: f"{flood_progress(drips)}; good request "
                        f"{rest_line(meanwhile[0]) if meanwhile else 'in flight'}", good_meanwhile())
    figures = {**flood_figures(drips), "good": meanwhile[0]}
    cut_right = all(d.status == 408 and d.code == "request_timeout" and on_time(d.held_s, deadlines.header_timeout_s) for d in drips)
    run.check(f"4 {PART1_SLOW} slow headers", cut_right and rest_unhurt(meanwhile[0], normal),
              f"closed after min/p50/max {spread_line(figures['held'])} (deadline {deadlines.header_timeout_s:g} s); got "
              f"{tally([d.got() for d in drips])}; good request meanwhile {rest_line(meanwhile[0])}")
    return figures


async def trickle_finding(target: Target, deadlines: Deadlines, run: Run) -> Json:
    origin, trickle = time.monotonic(), Drip()
    if (pair := await open_drip(trickle, target, ATTACKER, origin)) is not None:
        pieces = trickle_pieces(urlsplit(target.url).netloc, JFK_FLAC.read_bytes())
        await with_progress("finding 5", PROGRESS_S, lambda: f"trickle: {trickle.sent_bytes} bytes sent, {trickle.got()}",
                            run_drip(trickle, *pair, pieces, TRICKLE_EVERY_S, deadlines.body_grace_s + GIVE_UP_AFTER_S, origin))
    run.check("5 trickle at 1 KB/s", trickle.status == 408 and trickle.code == "request_timeout" and on_time(trickle.held_s, deadlines.body_grace_s),
              f"cut after {seconds(trickle.held_s)} s (grace {deadlines.body_grace_s:g} s), {trickle.sent_bytes} bytes sent; got "
              f"{trickle.got()}: {trickle.answer!r}")
    return {**asdict(trickle), "held_s": trickle.held_s}


async def origin_finding(target: Target, run: Run) -> Json:
    url = stream_url(target.url)
    (foreign, refusal), (listed, listed_refusal) = [await handshake(url, o) for o in (FOREIGN_ORIGIN, ALLOWED_ORIGIN)]
    run.check("6 foreign Origin", foreign == 403 and refusal.startswith("origin_not_allowed:") and listed == 101,
              f"Origin {FOREIGN_ORIGIN}: {foreign} {refusal!r}; Origin {ALLOWED_ORIGIN}: {listed} {listed_refusal}".rstrip())
    return {"foreign": {"status": foreign, "refusal": refusal}, "listed": {"status": listed, "refusal": listed_refusal}}


async def idle_finding(target: Target, deadlines: Deadlines, run: Run) -> Json:
    origin, idles = time.monotonic(), [IdleStream() for _ in range(PART1_IDLE)]
    url, give_up = stream_url(target.url), deadlines.first_audio_timeout_s + GIVE_UP_AFTER_S
    await with_progress("finding 7", PROGRESS_S, lambda: idle_progress(idles),
                        asyncio.gather(*(idle_stream(i, url, origin, give_up) for i in idles)))
    figures = idle_figures(idles)
    run.check(f"7 {PART1_IDLE} idle streams", idle_ok(idles, deadlines),
              f"{tally([i.got() for i in idles])} after min/p50/max {spread_line(figures['held'])} "
              f"(deadline {deadlines.first_audio_timeout_s:g} s)")
    return figures


async def part1(target: Target, good: Good, deadlines: Deadlines, run: Run, speech_placed: bool) -> None:
    """The findings of the review, one at a time (see the module docstring), each against the good file's
    latency on the idle server."""
    figures = run.figures.setdefault("part1", {})
    async with bound_client(GOOD_CLIENT) as client:
        await good.request(client, target, RestLog(time.monotonic()))  # warm-up: the first inference is slower
        figures["normal"] = normal = await good.request(client, target, RestLog(time.monotonic()))
        run.note(f"normal: jfk.flac on the idle server: {rest_line(normal)}")
        figures["1_ffconcat"] = await concat_finding(client, target, run, speech_placed)
        figures["2_sdp"] = await sdp_finding(client, target, run)
        figures["3_sdp_crowd"] = await sdp_crowd_finding(client, target, good, normal, run)
        figures["4_slow_headers"] = await slow_header_finding(client, target, good, normal, deadlines, run)
    figures["5_trickle"] = await trickle_finding(target, deadlines, run)
    figures["6_origin"] = await origin_finding(target, run)
    figures["7_idle_streams"] = await idle_finding(target, deadlines, run)


@dataclass
class Attack:
    """Part 2's attack and the good traffic beside it; times are seconds since `origin`."""

    origin: float = field(default_factory=time.monotonic)
    drips: list[Drip] = field(default_factory=lambda: [Drip() for _ in range(PART2_SLOW)])
    idles: list[IdleStream] = field(default_factory=lambda: [IdleStream() for _ in range(PART2_IDLE)])
    live: LiveRecord = field(default_factory=LiveRecord)
    rest: Json | None = None
    stream: Json | None = None
    same_address: Json | None = None  # the good stream from ATTACKER while the idle streams hold its slots
    all_open_at: float | None = None  # when every slow-header connection was open

    def progress(self) -> str:
        rest = "in flight" if self.rest is None else rest_line(self.rest)
        stream = self.live.progress() if self.stream is None else stream_line(self.stream)
        return f"{flood_progress(self.drips)}; {idle_progress(self.idles)}; good REST {rest}; good stream {stream}"


async def all_answered(idles: Sequence[IdleStream], timeout_s: float) -> None:
    """Until every idle stream's handshake has been answered (or failed), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(i.status is None and not i.note for i in idles) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def attack(state: Attack, target: Target, good: Good, deadlines: Deadlines) -> None:
    """The slow-header connections, then the idle streams, from ATTACKER; once all are open or refused,
    the good request and stream from GOOD_CLIENT, and the same stream from ATTACKER."""
    opened = asyncio.Event()
    flood = asyncio.create_task(slow_header_flood(state.drips, target, state.origin, deadlines.header_timeout_s + GIVE_UP_AFTER_S, opened))
    await opened.wait()
    state.all_open_at = time.monotonic() - state.origin
    url, give_up = stream_url(target.url), deadlines.first_audio_timeout_s + GIVE_UP_AFTER_S
    idle = asyncio.gather(*(idle_stream(i, url, state.origin, give_up) for i in state.idles))
    await all_answered(state.idles, REQUEST_TIMEOUT_S)
    async with bound_client(GOOD_CLIENT) as client:

        async def rest() -> None:  # each figure is kept as it comes, for the progress lines
            state.rest = await good.request(client, target, RestLog(state.origin))

        async def stream() -> None:
            state.stream = await good.stream(target, state.origin, live=state.live)

        async def same_address() -> None:
            state.same_address = await good.stream(target, state.origin, address=ATTACKER)

        await asyncio.gather(rest(), stream(), same_address())
    await asyncio.gather(idle, flood)


def attack_checks(state: Attack, normal_rest: Json, normal_stream: Json, deadlines: Deadlines, run: Run) -> None:
    held = min_p50_max([h for d in state.drips if (h := d.held_s) is not None])
    cut_right = all(d.status == 408 and d.code == "request_timeout" and on_time(d.held_s, deadlines.header_timeout_s) for d in state.drips)
    run.check(f"{PART2_SLOW} slow headers", cut_right, f"closed after min/p50/max {spread_line(held)} (deadline "
              f"{deadlines.header_timeout_s:g} s); got {tally([d.got() for d in state.drips])}")
    idle_held = min_p50_max([h for i in state.idles if (h := i.held_s) is not None])
    run.check(f"{PART2_IDLE} idle streams", idle_ok(state.idles, deadlines), f"{tally([i.got() for i in state.idles])}; accepted ones "
              f"closed after min/p50/max {spread_line(idle_held)} (deadline {deadlines.first_audio_timeout_s:g} s)")
    run.check(f"good REST from {GOOD_CLIENT}", rest_unhurt(state.rest, normal_rest), f"{rest_line(state.rest)} (normal {normal_rest['latency_s']:.2f} s)")
    run.check(f"good stream from {GOOD_CLIENT}", stream_unhurt(state.stream, normal_stream),
              f"{stream_line(state.stream)} (normal {seconds(normal_stream['final_latency_s'])} s)")


async def part2(target: Target, good: Good, deadlines: Deadlines, run: Run) -> Attack:
    """The good traffic on the idle server, then beside the attack; then the good stream from the attacker's address."""
    figures = run.figures.setdefault("part2", {})
    async with bound_client(GOOD_CLIENT) as client:
        await good.request(client, target, RestLog(time.monotonic()))  # warm-up
        normal_rest = figures["normal_rest"] = await good.request(client, target, RestLog(time.monotonic()))
    normal_stream = figures["normal_stream"] = await good.stream(target, time.monotonic())
    run.note(f"normal (idle server, from {GOOD_CLIENT}): REST {rest_line(normal_rest)}; stream {stream_line(normal_stream)}")

    state = Attack()
    await with_progress("attack", PROGRESS_S, state.progress, attack(state, target, good, deadlines))
    figures.update(slow_headers=flood_figures(state.drips), idle_streams=idle_figures(state.idles), rest=state.rest,
                   stream=state.stream, same_address_while_held=state.same_address, all_open_at_s=state.all_open_at)
    run.note(f"attack: {PART2_SLOW} slow-header connections from {ATTACKER}, all open {seconds(state.all_open_at)} s after the start; "
             f"then {PART2_IDLE} idle streams from {ATTACKER}, and the good traffic")
    attack_checks(state, normal_rest, normal_stream, deadlines, run)
    run.note(f"same address {ATTACKER}, while the idle streams held it: {stream_line(state.same_address)}")
    after = figures["same_address_after"] = await good.stream(target, state.origin, address=ATTACKER)
    run.note(f"same address {ATTACKER}, once they were closed: {stream_line(after)}")
    return state


# ----------------------------------------------------------------------------- report, plot, command line


def save_plot(state: Attack, deadlines: Deadlines, path: Path) -> None:
    """Top: part 2's open slow connections and idle streams over time, with the good request and stream.
    Bottom: how long the server let each slow connection and idle stream live, against the deadlines."""
    figure = new_figure(nrows=2, figsize=(11, 7))
    if figure is None:
        return
    fig, (ax_open, ax_held) = figure
    for label, items in (("slow-header connections", state.drips), ("idle streams (accepted)", [i for i in state.idles if i.status == 101])):
        changes = sorted([(i.opened_at, 1) for i in items if i.opened_at is not None] + [(i.closed_at, -1) for i in items if i.closed_at is not None])
        times = [0.0, *(t for t, _ in changes)]
        ax_open.step(times, list(itertools.accumulate([0, *(d for _, d in changes)])), where="post", label=label)
    ax_open.set_yscale("symlog")
    if state.rest is not None:
        ax_open.axvspan(state.rest["sent_at"], state.rest["answered_at"], color="green", alpha=0.3, label=f"good REST ({state.rest['latency_s']:.2f} s)")
    if state.stream is not None and state.stream["last_audio_at"] is not None:
        ax_open.axvspan(state.stream["started_at"], state.stream["last_audio_at"], color="tab:purple", alpha=0.12, label="good stream (real time)")
        if (latency := state.stream["final_latency_s"]) is not None:
            ax_open.axvline(state.stream["last_audio_at"] + latency, color="tab:purple", linestyle="--", label=f"its final (+{latency:.2f} s)")
    ax_open.set_xlabel("seconds since the attack started")
    ax_open.set_ylabel("open (symlog)")
    ax_open.legend(loc="upper right", fontsize="small")
    held = [h for d in state.drips if (h := d.held_s) is not None]
    idle_held = [h for i in state.idles if (h := i.held_s) is not None]
    limits = [deadlines.header_timeout_s, deadlines.first_audio_timeout_s]
    bins = np.linspace(min([*held, *idle_held, *limits]) - 0.1, max([*held, *idle_held, *limits]) + DEADLINE_SLACK_S + 0.1, 80)
    ax_held.hist(held, bins=bins, label=f"{len(held)} slow-header connections (deadline ASR_HEADER_TIMEOUT_S)")
    ax_held.hist(idle_held, bins=bins, label=f"{len(idle_held)} accepted idle streams (ASR_STREAM_FIRST_AUDIO_TIMEOUT_S)")
    for limit in sorted(set(limits)):
        ax_held.axvline(limit, color="red", linestyle=":")
        ax_held.axvline(limit + DEADLINE_SLACK_S, color="red", linestyle="--", alpha=0.5)
    ax_held.set_title(f"red: the deadlines (dotted) and {DEADLINE_SLACK_S:g} s past them (dashed)", fontsize="medium")
    ax_held.set_xlabel("seconds from open to the server's close")
    ax_held.set_ylabel("connections")
    ax_held.set_yscale("symlog")
    ax_held.legend(loc="upper left", fontsize="small")
    ax_open.set_title(f"{PART2_SLOW} slow-header connections + {PART2_IDLE} idle streams from {ATTACKER}; good traffic from {GOOD_CLIENT}")
    save_figure(fig, path)


def raise_fd_limit(needed: int) -> None:
    """This process holds a socket per slow client: the common soft limit of 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard != resource.RLIM_INFINITY and hard < needed:
            log(f"only {hard} file descriptors allowed, {needed} needed: some connections will fail")


@contextlib.contextmanager
def speech_folder() -> Iterator[Path]:
    """A temporary folder holding speech.flac (jfk.flac), to run the part 1 server in."""
    with tempfile.TemporaryDirectory(prefix="abuse-") as folder:
        shutil.copy(JFK_FLAC, Path(folder) / "speech.flac")
        yield Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.abuse", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server (both parts run against it)")
    where.add_argument("--start-server", action="store_true", help="start `python -m app` here on --port for each part, and stop it after")
    parser.add_argument("--port", type=int, default=8772, help="port of the servers started here (default: %(default)s)")
    parser.add_argument("--pid", type=int, help="the --url server's process id, for the UDP socket check")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save a figure of part 2 (needs matplotlib)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    raise_fd_limit(PART2_SLOW + PART2_IDLE + FD_HEADROOM)
    deadlines = Deadlines.from_settings(Settings())
    good = Good.load()
    run = Run()
    started = time.monotonic()
    try:
        with speech_folder() as folder:
            run.note(f"part 1: {'a server at ' + args.url if args.url else f'a server with ASR_CORS_ORIGINS={ALLOWED_ORIGIN}, run in {folder}'}")
            with target_server(args.url, args.port, args.pid, {"ASR_CORS_ORIGINS": ALLOWED_ORIGIN}, folder) as target:
                asyncio.run(part1(target, good, deadlines, run, speech_placed=args.url is None))
        run.note(f"part 2: {'the same server' if args.url else f'a fresh server with ASR_STREAM_MAX_SESSIONS_PER_CLIENT={PER_CLIENT_STREAMS}'}")
        with target_server(args.url, args.port, args.pid, {"ASR_STREAM_MAX_SESSIONS_PER_CLIENT": str(PER_CLIENT_STREAMS)}) as target:
            state = asyncio.run(part2(target, good, deadlines, run))
    except RuntimeError as exc:
        sys.exit(f"abuse test failed: {exc}")
    verdict = "; ".join(c.name for c in run.failed) or "PASS"
    print("\n".join([*run.notes, f"took {time.monotonic() - started:.0f} s", f"verdict: {verdict if verdict == 'PASS' else 'FAIL: ' + verdict}"]))
    if args.plot:
        save_plot(state, deadlines, args.plot)
    if args.json:
        write_json(args.json, {"checks": [asdict(c) for c in run.checks], "figures": run.figures,
                               "part2_connections": {"slow_headers": [asdict(d) for d in state.drips], "idle_streams": [asdict(i) for i in state.idles]}})
    sys.exit(1 if run.failed else 0)


if __name__ == "__main__":
    main()
