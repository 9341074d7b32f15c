"""Bounded soak: REST clients and real-time WebSocket streams together against one server for a fixed
time, counting every error and watching the server's memory (RSS) for growth.

- `--rest-clients` closed-loop REST clients loop over the rows (loadtest.rest's request).
- `--streams` real-time streams (loadtest.stream's StreamClient at speed 1) play the rows back to back,
  one session per file: a new WebSocket for each, so sessions keep opening and closing.
- the server's RSS (VmRSS in /proc/PID/status) every `--sample-s` s. RSS at start is the first sample
  after the warm-up (the first `--warmup-fraction` of the run), RSS at the end the sample taken when the
  run's time is up (still under load, like the start one); growth is the difference.
- errors: a REST request answered with another status than 200, 429 or 503 (refusals are counted apart)
  or not answered; a stream session that could not connect, got an error event, or was closed with
  another code than 1000.

When the time is up no new request or session starts, and those in flight finish and count. WER is
scored as loadtest.rest and loadtest.stream score it: a failed request or session counts as deletions.
Exit code 1 on any error.

Run: python -m loadtest.soak --start-server --plot loadtest/results/soak.png --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadtest.bench_rest import log
from loadtest.evalset import EvalRow
from loadtest.harness import (
    Json,
    Outcome,
    RestLog,
    RssSampled,
    add_common_arguments,
    binned,
    closed_loop,
    progress_lines,
    record_json,
    rest_client,
    rows_or_exit,
    rss_mib,
    stream_url,
    target_server,
    write_json,
)
from loadtest.plotting import new_figure, save_figure
from loadtest.rest import DEFAULT_TIMEOUT_S, RestLoadResult, positive_int
from loadtest.stream import FileResult, StreamClient, decode_file, non_negative_float, summarize

THROUGHPUT_BIN_S = 10.0


@dataclass(frozen=True)
class SoakPlan:
    rest_clients: int = 2
    streams: int = 2
    duration_s: float = 300.0
    sample_s: float = 5.0
    warmup_fraction: float = 0.2
    progress_s: float = 10.0


@dataclass(frozen=True)
class Session:
    """One file played in one stream session; times in seconds since the run's origin."""

    started_at: float
    ended_at: float
    result: FileResult

    @property
    def problem(self) -> str | None:
        """Why the session counts as an error, None when it ran clean."""
        record = self.result.record
        if record.error is not None:
            return record.error
        if record.error_events:
            return "error event " + ", ".join(str(e.data.get("code", "?")) for e in record.error_events)
        if record.close_code != 1000:
            return f"close code {record.close_code} {record.close_reason}".rstrip()
        return None


@dataclass
class SoakRun(RssSampled):
    """Everything one soak did; times are seconds since `origin` (time.monotonic)."""

    plan: SoakPlan
    origin: float = field(default_factory=time.monotonic)
    rest: RestLog = field(init=False)
    sessions: list[Session] = field(default_factory=list)
    open_sessions: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    server_gone: str | None = None

    def __post_init__(self) -> None:
        self.rest = RestLog(self.origin)

    def now(self) -> float:
        return time.monotonic() - self.origin

    def time_left(self) -> float:
        return self.plan.duration_s - self.now()

    @property
    def rss_growth_pct(self) -> float | None:
        growth = self.rss_growth_mib
        return None if growth is None or self.rss_start is None else 100 * growth / self.rss_start[1]

    def session_problems(self) -> dict[str, int]:
        return dict(Counter(p for s in self.sessions if (p := s.problem) is not None))

    def problems(self) -> list[str]:
        """Why the soak fails; empty when it passes."""
        problems = [f"REST: {kind} x{n}" for kind, n in self.rest.failures_by_kind().items()]
        problems += [f"stream: {problem} x{n}" for problem, n in self.session_problems().items()]
        if self.server_gone is not None:
            problems.append(f"server process gone: {self.server_gone}")
        return problems

    def progress(self) -> str:
        failed = sum(s.problem is not None for s in self.sessions)
        rss = f"{self.rss[-1][1]:.0f} MiB" if self.rss else "n/a"
        return (f"soak {self.now():5.0f} s: REST {self.rest.progress()}; streams: {len(self.sessions)} sessions "
                f"({failed} failed), {self.open_sessions} open; RSS {rss}")

    def summary(self) -> Json:
        rest = RestLoadResult([r.record for r in self.rest.records], self.plan.rest_clients, self.plan.duration_s)
        return {
            "plan": asdict(self.plan),
            "rest": {**rest.summary(), "served": len(self.rest.with_outcome(Outcome.ADMITTED)),
                     "refused_by_status": self.rest.refused_by_status(), "failures": self.rest.failures_by_kind()},
            "streams": {**summarize([s.result for s in self.sessions], streams=self.plan.streams, wall_s=self.plan.duration_s),
                        "served": sum(s.problem is None for s in self.sessions), "problems": self.session_problems()},
            "rss_start": self.rss_start,
            "rss_end": self.rss_end,
            "rss_peak_mib": max((mib for _, mib in self.rss), default=None),
            "rss_growth_mib": self.rss_growth_mib,
            "rss_growth_pct": self.rss_growth_pct,
            "problems": self.problems(),
        }


async def play_stream(client: StreamClient, stream: int, rows: Sequence[EvalRow], audio: dict[Path, np.ndarray], run: SoakRun) -> None:
    """Play the rows back to back, one session each, starting at this stream's share of the rows so that
    concurrent streams play different files, until the run's time is up."""
    index = stream * len(rows) // run.plan.streams
    while run.time_left() > 0:
        row = rows[index % len(rows)]
        started = run.now()
        run.open_sessions += 1
        record = await client.run_file(audio[row.audio])
        run.open_sessions -= 1
        run.sessions.append(Session(started, run.now(), FileResult(stream, row.audio, row.text, record)))
        index += 1


async def sample_rss(pid: int, run: SoakRun) -> None:
    """An RSS sample every `sample_s` until the time is up, and one then."""
    while True:
        try:
            run.rss.append((run.now(), rss_mib(pid)))
        except OSError as exc:
            run.server_gone = str(exc)
            return
        if run.time_left() <= 0:
            return
        await asyncio.sleep(min(run.plan.sample_s, run.time_left()))


async def run_soak(url: str, pid: int, rows: Sequence[EvalRow], audio: dict[Path, np.ndarray], plan: SoakPlan) -> SoakRun:
    """The soak of the module docstring against the server at `url` (process `pid`); `audio` holds the
    decoded rows the streams play. Progress lines go to stderr."""
    url = url.rstrip("/")
    run = SoakRun(plan)
    streams = StreamClient(stream_url(url), speed=1.0)
    async with rest_client(DEFAULT_TIMEOUT_S) as client, progress_lines(plan.progress_s, run.progress):
        await asyncio.gather(
            closed_loop(client, url, rows, plan.rest_clients, plan.duration_s, run.rest),
            *(play_stream(streams, k, rows, audio, run) for k in range(plan.streams)),
            sample_rss(pid, run),
        )
    return run


def decode_rows(rows: Sequence[EvalRow]) -> dict[Path, np.ndarray]:
    """The rows as the streams send them: float32 mono 16 kHz."""
    return {row.audio: decode_file(row.audio) for row in rows}


def format_report(run: SoakRun) -> str:
    s = run.summary()
    rest, streams = s["rest"], s["streams"]

    def counts(values: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in values.items()) or "none"

    def sample(point: tuple[float, float] | None) -> str:
        return "n/a" if point is None else f"{point[1]:.1f} MiB (at {point[0]:.0f} s)"

    growth = "n/a" if run.rss_growth_mib is None else f"{run.rss_growth_mib:+.1f} MiB ({run.rss_growth_pct:+.1f} %)"
    peak = "n/a" if s["rss_peak_mib"] is None else f"{s['rss_peak_mib']:.1f} MiB"
    final_latency = " / ".join("n/a" if v is None else f"{v:.2f}" for v in (streams["final_latency_p50_s"], streams["final_latency_p95_s"]))
    return "\n".join([
        f"load               {run.plan.rest_clients} REST clients + {run.plan.streams} real-time streams for {run.plan.duration_s:g} s",
        f"REST               {rest['served']} served, refused {counts(rest['refused_by_status'])}, errors {counts(rest['failures'])}; "
        f"WER {100 * rest['wer']:.2f} %, latency p50/p95 {rest['latency_p50_s']:.2f} / {rest['latency_p95_s']:.2f} s, "
        f"{rest['audio_s']:.0f} s of audio",
        f"streams            {streams['served']} sessions served, errors {counts(streams['problems'])}; "
        f"WER {100 * streams['wer']:.2f} %, final latency p50/p95 {final_latency} s, "
        f"frames behind {streams['frames_behind']} of {streams['frames_sent']}, {streams['audio_s']:.0f} s of audio",
        f"RSS start          {sample(run.rss_start)}",
        f"RSS end            {sample(run.rss_end)}",
        f"RSS growth         {growth}; peak {peak}",
        f"verdict            {'; '.join(s['problems']) or 'PASS'}",
    ])


def save_plot(run: SoakRun, path: Path) -> None:
    """Top: the server's RSS over time. Bottom: audio seconds transcribed per second, REST and streams,
    per THROUGHPUT_BIN_S, by when each request or session ended, stacked."""
    figure = new_figure(nrows=2, sharex=True, figsize=(11, 7))
    if figure is None:
        return
    fig, (ax_rss, ax_tput) = figure
    ax_rss.plot([t for t, _ in run.rss], [mib for _, mib in run.rss], marker=".")
    ax_rss.axvline(run.plan.warmup_fraction * run.plan.duration_s, color="grey", linestyle="--", label="end of warm-up")
    ax_rss.set_ylabel("server RSS, MiB")
    growth = "n/a" if run.rss_growth_mib is None else f"{run.rss_growth_mib:+.1f} MiB ({run.rss_growth_pct:+.1f} %)"
    ax_rss.set_title(f"{run.plan.rest_clients} REST clients + {run.plan.streams} streams: RSS growth {growth}")
    ax_rss.legend(loc="lower right")
    served = run.rest.with_outcome(Outcome.ADMITTED)
    clean = [s for s in run.sessions if s.problem is None]
    # both binned up to the same end, so that the stream bars stack on the REST ones
    end = max([r.answered_at for r in served] + [s.ended_at for s in clean], default=0.0)
    edges, rest = binned([r.answered_at for r in served], THROUGHPUT_BIN_S, [r.record.duration_s for r in served], until=end)
    _, streams = binned([s.ended_at for s in clean], THROUGHPUT_BIN_S, [s.result.record.audio_s for s in clean], until=end)
    rest_rate, streams_rate = ([v / THROUGHPUT_BIN_S for v in sums] for sums in (rest, streams))
    ax_tput.bar(edges[:-1], rest_rate, width=THROUGHPUT_BIN_S, align="edge", label="REST")
    ax_tput.bar(edges[:-1], streams_rate, width=THROUGHPUT_BIN_S, align="edge", bottom=rest_rate, label="streams")
    ax_tput.set_ylabel(f"audio s per s (per {THROUGHPUT_BIN_S:g} s)")
    ax_tput.set_xlabel("seconds since the start")
    ax_tput.legend(loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_port=8769)
    parser.add_argument("--pid", type=int, help="process id of the server at --url, for its RSS (required with --url)")
    parser.add_argument("--duration-s", type=float, default=300.0, help="length of the soak (default: %(default)s)")
    parser.add_argument("--rest-clients", type=positive_int, default=2, help="closed-loop REST clients (default: %(default)s)")
    parser.add_argument("--streams", type=positive_int, default=2, help="real-time streams (default: %(default)s)")
    parser.add_argument("--sample-s", type=non_negative_float, default=5.0, help="seconds between RSS samples (default: %(default)s)")
    parser.add_argument("--warmup-fraction", type=non_negative_float, default=0.2,
                        help="share of the run before the RSS start sample (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.url and args.pid is None:
        parser.error("--url needs --pid (the server's process id, for its RSS)")
    rows = rows_or_exit(parser, args)
    plan = SoakPlan(rest_clients=args.rest_clients, streams=args.streams, duration_s=args.duration_s,
                    sample_s=args.sample_s, warmup_fraction=args.warmup_fraction)
    audio = decode_rows(rows) if plan.streams else {}
    with target_server(args.url, args.port, args.pid) as target:
        log(f"soak: {plan.rest_clients} REST clients + {plan.streams} streams for {plan.duration_s:g} s against {target.url} (pid {target.pid})")
        run = asyncio.run(run_soak(target.url, target.pid, rows, audio, plan))
    print(format_report(run))
    if args.plot:
        save_plot(run, args.plot)
    if args.json:
        write_json(args.json, {"summary": run.summary(), "rest": [record_json(r) for r in run.rest.records],
                               "sessions": [{"started_at": s.started_at, "ended_at": s.ended_at, "problem": s.problem, **s.result.to_json()}
                                            for s in run.sessions]})
    sys.exit(1 if run.problems() else 0)


if __name__ == "__main__":
    main()
