"""What the overload test (loadtest.overload) and the soak (loadtest.soak) share: the server they aim at
(a running one, or one started here), how a REST answer under load is judged, the log of every request
sent, closed-loop REST clients, progress lines, the server's RSS, and small figure helpers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import socket
import time
import wave
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.bench_rest import DEFAULT_SET, log, start_server, stop_server
from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, percentile
from loadtest.rest import RequestRecord, transcribe_one

# the answers a server may give to say "not now": 429 overloaded (admission or full queue), 503 loading or full
REFUSAL_STATUSES = frozenset({429, 503})
# quiet server logs (no access line per request), so that the tools' progress lines stay readable
SERVER_ENV = {"ASR_LOG_LEVEL": "warning"}

Json = dict[str, Any]


class Outcome(StrEnum):
    ADMITTED = "admitted"  # 200 with a transcript
    REFUSED = "refused"  # a refusal the service documents for load: REFUSAL_STATUSES
    FAILED = "failed"  # anything else: another status, or no HTTP answer at all


def outcome_of(record: RequestRecord) -> Outcome:
    if record.status == 200 and record.ok:
        return Outcome.ADMITTED
    if record.status in REFUSAL_STATUSES:
        return Outcome.REFUSED
    return Outcome.FAILED


def failure_kind(record: RequestRecord) -> str:
    """What went wrong, to count failures by: the status ("HTTP 500"), or the transport error when no
    answer came ("no response (ReadTimeout)")."""
    if record.status == 200:
        return "HTTP 200 with a bad body"
    if record.status is not None:
        return f"HTTP {record.status}"
    return f"no response ({(record.error or '?').split(':', 1)[0]})"


@dataclass(frozen=True)
class TimedRecord:
    """A request and when it was sent, in seconds since the run's origin."""

    sent_at: float
    record: RequestRecord

    @property
    def answered_at(self) -> float:
        return self.sent_at + self.record.latency_s

    @property
    def outcome(self) -> Outcome:
        return outcome_of(self.record)


@dataclass
class RestLog:
    """Every REST request of one phase of a run, recorded as it is answered: the source of the progress
    lines, the figures and the plots. `origin` is the run's t = 0 (time.monotonic)."""

    origin: float
    records: list[TimedRecord] = field(default_factory=list)
    sent: int = 0

    async def send(self, client: httpx.AsyncClient, url: str, index: int, row: EvalRow) -> TimedRecord:
        sent_at = time.monotonic() - self.origin
        self.sent += 1
        timed = TimedRecord(sent_at, await transcribe_one(client, url, index, row))
        self.records.append(timed)
        return timed

    def with_outcome(self, outcome: Outcome) -> list[TimedRecord]:
        return [r for r in self.records if r.outcome is outcome]

    @property
    def in_flight(self) -> int:
        return self.sent - len(self.records)

    def refused_by_status(self) -> dict[int, int]:
        return dict(Counter(r.record.status for r in self.with_outcome(Outcome.REFUSED) if r.record.status is not None))

    def failures_by_kind(self) -> dict[str, int]:
        return dict(Counter(failure_kind(r.record) for r in self.with_outcome(Outcome.FAILED)))

    def progress(self) -> str:
        counts = Counter(r.outcome for r in self.records)
        return (f"sent {self.sent}, answered {counts[Outcome.ADMITTED]}, refused {counts[Outcome.REFUSED]}, "
                f"errors {counts[Outcome.FAILED]}, in flight {self.in_flight}")


async def closed_loop(client: httpx.AsyncClient, url: str, rows: Sequence[EvalRow], clients: int, duration_s: float,
                      rest_log: RestLog) -> None:
    """`clients` clients, each sending its next row as soon as its last answer came, for `duration_s`;
    client k sends rows k, k + clients, ... cycling. Returns once the requests in flight at the end are
    answered, so that whatever runs next starts on a server no longer busy with them."""
    deadline = time.monotonic() + duration_s

    async def client_loop(first: int) -> None:
        index = first
        while time.monotonic() < deadline:
            await rest_log.send(client, url, index, rows[index % len(rows)])
            index += clients

    await asyncio.gather(*(client_loop(k) for k in range(clients)))


def rest_client(timeout_s: float) -> httpx.AsyncClient:
    """No cap on connections: an open-loop burst must reach the server, not wait in the client's pool."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    return httpx.AsyncClient(timeout=timeout_s, limits=limits)


@contextlib.asynccontextmanager
async def progress_lines(every_s: float, line: Callable[[], str]) -> AsyncIterator[None]:
    """Log `line()` every `every_s` seconds while the body runs, so a long run shows it is moving."""

    async def report() -> None:
        while True:
            await asyncio.sleep(every_s)
            log(line())

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


class RssSampled:
    """For a run that keeps ``rss`` samples (seconds since its start, MiB) and a ``plan`` with ``duration_s``
    and ``warmup_fraction``: growth is counted from the first sample after the warm-up."""

    rss: list[tuple[float, float]]
    plan: Any

    @property
    def rss_start(self) -> tuple[float, float] | None:
        """The first sample after the warm-up."""
        return next((s for s in self.rss if s[0] >= self.plan.warmup_fraction * self.plan.duration_s), None)

    @property
    def rss_end(self) -> tuple[float, float] | None:
        return self.rss[-1] if self.rss else None

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_start is None or self.rss_end is None:
            return None
        return self.rss_end[1] - self.rss_start[1]


def free_port() -> int:
    """A loopback TCP port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """Float samples as a 16-bit mono WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def rss_mib(pid: int) -> float:
    """The resident set size of process `pid` in MiB, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"process {pid} has no VmRSS (a zombie?)")


def stream_url(url: str) -> str:
    """The WebSocket stream endpoint of the server at the http(s) base `url`."""
    return url.replace("http", "ws", 1).rstrip("/") + "/v1/stream"


@dataclass(frozen=True)
class Target:
    """The server under test: its base URL, and its process id when known (for RSS)."""

    url: str
    pid: int | None


@contextlib.contextmanager
def target_server(url: str | None, port: int, pid: int | None = None, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> Iterator[Target]:
    """The running server at `url`, or, without `url`, one started here on `port` (with `env` on top of
    SERVER_ENV, in `cwd`) and stopped on exit."""
    if url is not None:
        yield Target(url.rstrip("/"), pid)
        return
    proc = start_server(port, {**SERVER_ENV, **(env or {})}, cwd)
    try:
        yield Target(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        stop_server(proc)


def add_common_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """The options both tools take: which server, which rows, where the plot and the JSON go."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--start-server", action="store_true", help="start `python -m app` here on --port and stop it after")
    parser.add_argument("--port", type=int, default=default_port, help="port of the server started here (default: %(default)s)")
    parser.add_argument("--manifest", type=Path, metavar="PATH", default=DEFAULT_MANIFEST, help="eval manifest.jsonl (default: %(default)s)")
    parser.add_argument("--set", dest="source_set", metavar="SOURCE_SET", default=DEFAULT_SET, help="rows to send (default: %(default)s)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save a figure of the run (needs matplotlib)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summary and per-request records as JSON")


def rows_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[EvalRow]:
    try:
        rows = load_rows(args.manifest, sets=[args.source_set])
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not rows:
        parser.error(f"no WER rows in {args.source_set}")
    return rows


def write_json(path: Path, data: Json) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    log(f"JSON written to {path}")


def record_json(timed: TimedRecord) -> Json:
    r = timed.record
    return {"sent_at": round(timed.sent_at, 3), "audio": r.audio.name, "status": r.status, "latency_s": round(r.latency_s, 3),
            "outcome": timed.outcome.value, "error": r.error, "hypothesis": r.hypothesis}


def spread(values: Sequence[float]) -> Json:
    """p50, p95 and max of `values`, None for each when there are none (JSON has no NaN)."""
    if not values:
        return {"p50_s": None, "p95_s": None, "max_s": None}
    return {"p50_s": percentile(values, 50), "p95_s": percentile(values, 95), "max_s": max(values)}


def seconds(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def spread_text(figures: Json) -> str:
    return " / ".join(seconds(figures[k]) for k in ("p50_s", "p95_s", "max_s"))


def binned(times: Sequence[float], bin_s: float, weights: Sequence[float] | None = None,
           until: float = 0.0) -> tuple[list[float], list[float]]:
    """Sums of `weights` (1 each by default) over `bin_s`-wide bins of `times`, from 0 to the last time or
    `until` if later, empty bins included: (the n + 1 bin edges, the n sums), as matplotlib takes them."""
    count = math.floor(max([*times, until]) / bin_s) + 1
    sums = [0.0] * count
    for t, w in zip(times, weights if weights is not None else [1.0] * len(times)):
        sums[math.floor(t / bin_s)] += w
    return [k * bin_s for k in range(count + 1)], sums
