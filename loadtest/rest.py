"""Load test for the REST endpoint: send the eval set with N requests in flight and report accuracy,
throughput and latency together, since a speed-up that costs WER (or fails requests) is no speed-up.

Run: python -m loadtest.rest --url http://127.0.0.1:8000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, percentile, word_error_rate

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RequestRecord:
    """The outcome of one request. `status` is None when no HTTP response came back (refused, timed
    out); `hypothesis` is "" unless the request succeeded, so a failure scores as deletions."""

    index: int
    audio: Path
    reference: str
    duration_s: float
    status: int | None
    latency_s: float
    hypothesis: str
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RestLoadResult:
    """Per-request records (in manifest order) and the figures derived from them."""

    records: list[RequestRecord]
    concurrency: int
    wall_s: float

    @property
    def audio_s(self) -> float:
        """Seconds of audio transcribed successfully: failed requests add no throughput."""
        return sum(r.duration_s for r in self.records if r.ok)

    @property
    def rtfx(self) -> float:
        """Aggregate inverse real-time factor: audio seconds transcribed per wall-clock second."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def wer(self) -> float:
        return word_error_rate([r.reference for r in self.records], [r.hypothesis for r in self.records])

    @property
    def latency_p50_s(self) -> float:
        return percentile([r.latency_s for r in self.records if r.ok], 50)

    @property
    def latency_p95_s(self) -> float:
        return percentile([r.latency_s for r in self.records if r.ok], 95)

    @property
    def errors_by_status(self) -> dict[str, int]:
        """Failed requests keyed by HTTP status, or "no response" for transport failures."""
        failed = (r for r in self.records if not r.ok)
        return dict(Counter("no response" if r.status is None else str(r.status) for r in failed))

    def summary(self) -> dict[str, object]:
        return {
            "rows": len(self.records),
            "concurrency": self.concurrency,
            "audio_s": self.audio_s,
            "wall_s": self.wall_s,
            "wer": self.wer,
            "rtfx": self.rtfx,
            "latency_p50_s": self.latency_p50_s,
            "latency_p95_s": self.latency_p95_s,
            "errors_by_status": self.errors_by_status,
        }


ProgressFn = Callable[[int, int, RequestRecord], None]


def print_progress(done: int, total: int, record: RequestRecord) -> None:
    """One stderr line per finished request, so a long run shows it is moving and where it fails."""
    status = "---" if record.status is None else str(record.status)
    tail = f"  {record.error}" if record.error else ""
    counter = f"[{done:>{len(str(total))}}/{total}]"
    print(f"{counter} {record.latency_s:7.2f}s {status} {record.audio.name}{tail}", file=sys.stderr)


def _error_text(response: httpx.Response) -> str:
    """The service's `{"error": {"code", "message"}}` body as one line, or the raw body if it is not that."""
    try:
        err = response.json()["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


async def transcribe_one(client: httpx.AsyncClient, url: str, index: int, row: EvalRow, params: dict | None = None) -> RequestRecord:
    """Send one file (with query ``params``: beam_size, temperature, ...); every failure becomes a record
    rather than an exception, so one bad request cannot end the run. Latency covers the HTTP exchange only,
    not reading the file from disk."""
    data = await asyncio.to_thread(row.audio.read_bytes)
    mime = mimetypes.guess_type(row.audio.name)[0] or "application/octet-stream"
    status: int | None = None
    hypothesis, error = "", None
    start = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/transcribe", files={"file": (row.audio.name, data, mime)}, params=params)
        status = response.status_code
        if status == 200:
            hypothesis = response.json()["text"]
        else:
            error = _error_text(response)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, TypeError) as exc:
        error = f"bad response body: {exc!r}"
    latency = time.perf_counter() - start
    return RequestRecord(index, row.audio, row.text, row.duration_s, status, latency, hypothesis, error)


async def run_rest_load(
    url: str,
    rows: Sequence[EvalRow],
    concurrency: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    progress: ProgressFn | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    params: dict | None = None,
) -> RestLoadResult:
    """Transcribe `rows` through `POST {url}/v1/transcribe`, keeping `concurrency` requests in flight.

    `concurrency` workers pull from one queue, so a new request starts as soon as one finishes and the
    server sees a steady load. Requests are not retried (not even on 429/503 with Retry-After): a
    rejection is what the server does under this load, and it shows in `errors_by_status`.
    `progress` is called after each request; `transport` lets tests substitute a mock server; `params` go
    with every request (the decoding options of /v1/transcribe).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    url = url.rstrip("/")
    queue: asyncio.Queue[tuple[int, EvalRow]] = asyncio.Queue()
    for item in enumerate(rows):
        queue.put_nowait(item)
    records: list[RequestRecord] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, row = queue.get_nowait()
            record = await transcribe_one(client, url, index, row, params)
            records.append(record)
            if progress is not None:
                progress(len(records), len(rows), record)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(min(concurrency, len(rows)))))
        wall = time.perf_counter() - start
    return RestLoadResult(sorted(records, key=lambda r: r.index), concurrency, wall)


def format_summary(result: RestLoadResult) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(result.errors_by_status.items())) or "none"
    return "\n".join(
        [
            f"rows             {len(result.records)}",
            f"concurrency      {result.concurrency}",
            f"audio s          {result.audio_s:.1f}",
            f"wall s           {result.wall_s:.1f}",
            f"WER %            {100 * result.wer:.2f}",
            f"RTFx             {result.rtfx:.2f}",
            f"latency p50 s    {result.latency_p50_s:.2f}",
            f"latency p95 s    {result.latency_p95_s:.2f}",
            f"failed requests  {errors}",
        ]
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--manifest",
        metavar="PATH",
        type=Path,
        default=DEFAULT_MANIFEST,
        help="eval manifest.jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=8,
        help="requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="SOURCE_SET",
        help="only rows of this source_set; repeat for several (default: every WER row)",
    )
    parser.add_argument(
        "--limit",
        metavar="K",
        type=positive_int,
        help="send only the first K rows, for a quick smoke run",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="per-request timeout in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--json-out", type=Path, metavar="FILE", help="also write the summary and per-request records to FILE as JSON"
    )
    args = parser.parse_args(argv)

    try:
        rows = load_rows(args.manifest, sets=args.sets, limit=args.limit)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not rows:
        parser.error("no WER rows match")
    print(f"sending {len(rows)} rows to {args.url} with concurrency {args.concurrency}", file=sys.stderr)
    result = asyncio.run(run_rest_load(args.url, rows, args.concurrency, args.timeout, progress=print_progress))
    print(format_summary(result))
    if args.json_out:
        records = [{**asdict(r), "audio": str(r.audio)} for r in result.records]
        args.json_out.write_text(json.dumps({"summary": result.summary(), "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
