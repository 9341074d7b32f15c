"""Do stream finals keep their latency while bulk work floods the server? The same live streams are played
twice: alone, then while a burst of long REST uploads arrives at once. Finals have reserved room at every
queue and go first everywhere, so none may be refused, and their latency should move little.

1. alone: ``--streams`` sessions each play their files at real-time pace (loadtest.stream's client).
2. burst: the same sessions again; ``--burst-delay-s`` after they start, ``--uploads`` files of about
   ``--upload-s`` seconds (eval speech joined end to end) are POSTed to /v1/transcribe at once.

Reported per phase: endpoint-final latency (p50, p95: from the frame carrying the final's end to the final;
it includes the endpoint silence the server waits for), all finals' latency, finals refused (error events
of a stream) and, for the burst, the uploads' outcomes. Exit code 1 when a final was refused or a session
failed.

Run: python -m loadtest.priority --start-server --plot loadtest/results/priority.png
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from loadtest.bench_rest import log
from loadtest.evalset import EvalRow, percentile
from loadtest.harness import Json, add_common_arguments, rest_client, rows_or_exit, stream_url, target_server, wav_bytes, write_json
from loadtest.plotting import new_figure, save_figure
from loadtest.rest import positive_int
from loadtest.stream import FileResult, StreamClient, assign, decode_file, run_streams

SAMPLE_RATE = 16000


def pct(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if math.isnan(value) else value


@dataclass
class Phase:
    name: str
    files: list[FileResult]
    uploads: list[int]  # HTTP status of each upload (empty when alone)

    def endpoint_latencies(self) -> list[float]:
        return [r.record.latency(i) for r in self.files for i, e in enumerate(r.record.events)
                if e.type == "final" and e.data.get("reason") == "endpoint" and r.record.latency(i) is not None]

    def final_latencies(self) -> list[float]:
        return [lat for r in self.files for lat in r.record.final_latencies_s]

    def refused(self) -> int:
        return sum(len(r.record.error_events) for r in self.files)

    def failed_sessions(self) -> int:
        return sum(r.record.error is not None for r in self.files)

    def summary(self) -> Json:
        endpoint, finals = sorted(self.endpoint_latencies()), sorted(self.final_latencies())
        return {"phase": self.name, "sessions": len(self.files), "failed_sessions": self.failed_sessions(),
                "finals": len(finals), "finals_refused": self.refused(),
                "endpoint_finals": len(endpoint), "endpoint_p50_s": pct(endpoint, 50), "endpoint_p95_s": pct(endpoint, 95),
                "final_p50_s": pct(finals, 50), "final_p95_s": pct(finals, 95),
                "uploads": {str(status): self.uploads.count(status) for status in sorted(set(self.uploads))}}


def long_uploads(rows: list[EvalRow], audio: dict[Path, np.ndarray], count: int, seconds: float) -> list[bytes]:
    """``count`` WAV files of about ``seconds`` each: the rows' speech joined end to end, each starting at a
    different row so that no two are the same."""
    files = []
    for k in range(count):
        pieces, total, i = [], 0, k
        while total < seconds * SAMPLE_RATE:
            piece = audio[rows[i % len(rows)].audio]
            pieces.append(piece)
            total += len(piece)
            i += 1
        files.append(wav_bytes(np.concatenate(pieces)))
    return files


async def run_phase(name: str, url: str, plan, audio, uploads: list[bytes], delay_s: float) -> Phase:
    client = StreamClient(stream_url(url))
    statuses: list[int] = []

    async def burst() -> None:
        await asyncio.sleep(delay_s)
        log(f"{name}: {len(uploads)} uploads at once")
        async with rest_client(600.0) as http:
            async def post(body: bytes) -> int:
                try:
                    return (await http.post(f"{url}/v1/transcribe", content=body)).status_code
                except httpx.HTTPError:
                    return 0
            statuses.extend(await asyncio.gather(*(post(body) for body in uploads)))
        log(f"{name}: uploads answered: {sorted(statuses)}")

    burst_task = asyncio.create_task(burst()) if uploads else None
    files = await run_streams(client, plan, audio, quiet=True)
    if burst_task is not None:
        await burst_task
    return Phase(name, files, statuses)


def format_report(phases: list[Phase]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["phase   sessions  finals  refused  endpoint p50  endpoint p95  all p50  all p95  uploads"]
    for phase in phases:
        s = phase.summary()
        uploads = ", ".join(f"{n}x{status}" for status, n in s["uploads"].items()) or "-"
        lines.append(f"{phase.name:<7} {s['sessions']:>8}  {s['finals']:>6}  {s['finals_refused']:>7}  {seconds(s['endpoint_p50_s']):>12}  "
                     f"{seconds(s['endpoint_p95_s']):>12}  {seconds(s['final_p50_s']):>7}  {seconds(s['final_p95_s']):>7}  {uploads}")
    alone, burst = (p.summary() for p in phases)
    if alone["endpoint_p95_s"] is not None and burst["endpoint_p95_s"] is not None:
        lines.append(f"endpoint-final p95 during the burst: {burst['endpoint_p95_s'] - alone['endpoint_p95_s']:+.2f} s against alone")
    return "\n".join(lines)


def save_plot(phases: list[Phase], path: Path) -> None:
    made = new_figure(figsize=(8, 4))
    if made is None:
        return
    fig, ax = made
    for phase in phases:
        values = sorted(phase.endpoint_latencies())
        if values:
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=f"{phase.name} ({len(values)} finals)")
    ax.set_xlabel("endpoint final latency (s)")
    ax.set_ylabel("share of finals at or below")
    ax.set_title("Stream finals alone and during a burst of long REST uploads")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.priority", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_port=8774)
    parser.add_argument("--streams", type=positive_int, default=4, help="concurrent live streams (default: %(default)s)")
    parser.add_argument("--files-per-stream", type=positive_int, default=6, help="files each stream plays (default: %(default)s)")
    parser.add_argument("--uploads", type=positive_int, default=24, help="long uploads in the burst (default: %(default)s)")
    parser.add_argument("--upload-s", type=float, default=120.0, help="seconds of audio per upload (default: %(default)s)")
    parser.add_argument("--burst-delay-s", type=float, default=3.0, help="when the burst comes after the streams start (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = rows_or_exit(parser, args)
    audio = {row.audio: decode_file(row.audio) for row in rows}
    plan = assign([(row.audio, row.text) for row in rows[: args.streams * args.files_per_stream]], args.streams)
    uploads = long_uploads(rows, audio, args.uploads, args.upload_s)

    async def run(url: str) -> list[Phase]:
        alone = await run_phase("alone", url, plan, audio, [], 0.0)
        log("alone: " + format_report([alone, Phase("burst", [], [])]).splitlines()[1])
        burst = await run_phase("burst", url, plan, audio, uploads, args.burst_delay_s)
        return [alone, burst]

    with target_server(args.url, args.port) as target:
        phases = asyncio.run(run(target.url))
    print(format_report(phases))
    if args.plot:
        save_plot(phases, args.plot)
    if args.json:
        write_json(args.json, {"phases": [p.summary() for p in phases], "files": {p.name: [f.to_json() for f in p.files] for p in phases}})
    sys.exit(1 if any(p.refused() or p.failed_sessions() for p in phases) else 0)


if __name__ == "__main__":
    main()
