"""Overload test: offer the REST endpoint a spike well past its capacity, and check that the server refuses
what it cannot take (429/503 only), still answers what it admits in time and correctly, and recovers.

1. baseline: the probe (the set's shortest row) sent 5 times, one at a time, to the idle server.
2. capacity: `--clients` closed-loop REST clients over the rows for CAPACITY_WARMUP_S + `--capacity-s`
   s: requests/s and audio s/s are those answered in the last `--capacity-s` s, over that time (the
   first seconds, before the pipeline is full and answers flow, would read as missing capacity).
3. burst: an open loop at `--factor` x that request rate for `--burst-s` s: request i leaves at
   start + i / rate whatever the answers, as a real spike does.
4. recovery: from the end of the burst, the probe every 0.5 s (one at a time) with GET /readyz beside
   it, until a probe is answered 200 within 2x its baseline latency (the median of step 1) and /readyz
   is 200. The recovery time runs from the end of the burst to that answer.

Exit code 1 when a request got a status other than 200, 429 or 503 or no answer at all (in any step),
an admitted request took longer than `--latency-bound-s`, or the server did not recover within
`--recovery-timeout-s`. A request is given up (no answer) after loadtest.rest's timeout of 300 s, so
that a request over the bound still shows its real latency.

Run: python -m loadtest.overload --start-server --plot loadtest/results/overload.png --json overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from loadtest.bench_rest import log
from loadtest.evalset import EvalRow, word_error_rate
from loadtest.harness import (
    Json,
    Outcome,
    RestLog,
    TimedRecord,
    add_common_arguments,
    binned,
    closed_loop,
    progress_lines,
    record_json,
    rest_client,
    rows_or_exit,
    seconds,
    spread,
    spread_text,
    target_server,
    write_json,
)
from loadtest.plotting import new_figure, save_figure
from loadtest.rest import DEFAULT_TIMEOUT_S, positive_int

# ASR_ADMISSION_MAX_WAIT_S default (the longest an admitted request should wait for the work ahead of it) + 20 s of work
DEFAULT_LATENCY_BOUND_S = 10.0 + 20.0
PROBE_INTERVAL_S = 0.5
PROBE_SLOWDOWN_ALLOWED = 2.0  # recovered: a probe answered within this multiple of its baseline latency
BASELINE_PROBES = 5
CAPACITY_WARMUP_S = 5.0


def wer_of(records: Sequence[TimedRecord]) -> float | None:
    if not records:
        return None
    return word_error_rate([r.record.reference for r in records], [r.record.hypothesis for r in records])


@dataclass(frozen=True)
class OverloadPlan:
    clients: int = 4
    capacity_s: float = 30.0
    factor: float = 3.0
    burst_s: float = 30.0
    latency_bound_s: float = DEFAULT_LATENCY_BOUND_S
    recovery_timeout_s: float = 120.0
    progress_s: float = 5.0


@dataclass
class OverloadRun:
    """Everything one run did; times are seconds since `origin` (time.monotonic)."""

    plan: OverloadPlan
    probe: EvalRow
    origin: float = field(default_factory=time.monotonic)
    baseline: RestLog = field(init=False)
    capacity: RestLog = field(init=False)
    burst: RestLog = field(init=False)
    probes: RestLog = field(init=False)
    capacity_window: tuple[float, float] = (0.0, 0.0)
    burst_window: tuple[float, float] = (0.0, 0.0)
    burst_rate: float = 0.0
    recovered_at: float | None = None

    def __post_init__(self) -> None:
        self.baseline, self.capacity, self.burst, self.probes = (RestLog(self.origin) for _ in range(4))

    def now(self) -> float:
        return time.monotonic() - self.origin

    def phases(self) -> dict[str, RestLog]:
        return {"baseline": self.baseline, "capacity": self.capacity, "burst": self.burst, "recovery": self.probes}

    @property
    def baseline_probe_s(self) -> float:
        return statistics.median(r.record.latency_s for r in self.baseline.with_outcome(Outcome.ADMITTED))

    @property
    def capacity_served(self) -> list[TimedRecord]:
        start, end = self.capacity_window
        return [r for r in self.capacity.with_outcome(Outcome.ADMITTED) if start < r.answered_at <= end]

    @property
    def capacity_requests_per_s(self) -> float:
        return len(self.capacity_served) / self.plan.capacity_s

    @property
    def capacity_audio_s_per_s(self) -> float:
        return sum(r.record.duration_s for r in self.capacity_served) / self.plan.capacity_s

    @property
    def admitted(self) -> list[TimedRecord]:
        return self.burst.with_outcome(Outcome.ADMITTED)

    @property
    def refusal_rate(self) -> float:
        return len(self.burst.with_outcome(Outcome.REFUSED)) / self.burst.sent if self.burst.sent else 0.0

    def over_bound(self) -> list[TimedRecord]:
        """Admitted requests of any phase answered later than the bound."""
        return [r for rest_log in self.phases().values() for r in rest_log.with_outcome(Outcome.ADMITTED)
                if r.record.latency_s > self.plan.latency_bound_s]

    def failures(self) -> dict[str, dict[str, int]]:
        """Per phase, requests that got neither an answer nor a refusal, by kind; only phases with some."""
        return {name: kinds for name, rest_log in self.phases().items() if (kinds := rest_log.failures_by_kind())}

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.burst_window[1]

    def problems(self) -> list[str]:
        """Why the run fails; empty when it passes."""
        problems = [f"{phase}: {kind} x{n}" for phase, kinds in self.failures().items() for kind, n in kinds.items()]
        if late := self.over_bound():
            problems.append(f"{len(late)} admitted requests over the {self.plan.latency_bound_s:g} s bound")
        if self.recovered_at is None:
            problems.append(f"not recovered within {self.plan.recovery_timeout_s:g} s")
        return problems

    def summary(self) -> Json:
        refused = self.burst.with_outcome(Outcome.REFUSED)
        return {
            "plan": asdict(self.plan),
            "capacity": {
                "requests": len(self.capacity_served),
                "requests_per_s": self.capacity_requests_per_s,
                "audio_s_per_s": self.capacity_audio_s_per_s,
                "wer": wer_of(self.capacity_served),
                "latency": spread([r.record.latency_s for r in self.capacity_served]),
            },
            "probe": {"audio": self.probe.audio.name, "duration_s": self.probe.duration_s, "baseline_s": self.baseline_probe_s},
            "burst": {
                "requests_per_s": self.burst_rate,
                "offered": self.burst.sent,
                "admitted": len(self.admitted),
                "refused": len(refused),
                "refused_by_status": self.burst.refused_by_status(),
                "refusal_rate": self.refusal_rate,
                "admitted_latency": spread([r.record.latency_s for r in self.admitted]),
                "refusal_latency": spread([r.record.latency_s for r in refused]),
                "admitted_wer": wer_of(self.admitted),
            },
            "failures": self.failures(),
            "over_bound": len(self.over_bound()),
            "recovery_s": self.recovery_s,
            "probes_sent": self.probes.sent,
            "problems": self.problems(),
        }


async def readyz_ok(client: httpx.AsyncClient, url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await client.get(f"{url}/readyz")).status_code == 200
    return False


async def measure_baseline(client: httpx.AsyncClient, url: str, run: OverloadRun) -> None:
    for index in range(BASELINE_PROBES):
        await run.baseline.send(client, url, index, run.probe)
    if not run.baseline.with_outcome(Outcome.ADMITTED):
        raise RuntimeError(f"the idle server answered none of {BASELINE_PROBES} probes: {run.baseline.failures_by_kind()}")


async def offer_burst(client: httpx.AsyncClient, url: str, rows: Sequence[EvalRow], run: OverloadRun) -> list[asyncio.Task[TimedRecord]]:
    """Send row i at start + i / rate, each request in its own task whatever became of the others (an open
    loop), until the burst's end; returns the requests, which may still be in flight."""
    start = time.monotonic()
    requests = []
    for index in range(round(run.burst_rate * run.plan.burst_s)):
        await asyncio.sleep(max(0.0, start + index / run.burst_rate - time.monotonic()))
        requests.append(asyncio.create_task(run.burst.send(client, url, index, rows[index % len(rows)])))
    await asyncio.sleep(max(0.0, start + run.plan.burst_s - time.monotonic()))
    return requests


async def await_recovery(client: httpx.AsyncClient, url: str, run: OverloadRun) -> float | None:
    """Send the probe, with GET /readyz beside it, every PROBE_INTERVAL_S (or as soon as the last probe is
    answered, when that took longer: one probe at a time, so that the probes add no backlog of their own)
    until one is answered 200 within PROBE_SLOWDOWN_ALLOWED x its baseline while /readyz says 200.
    Returns when that answer came (seconds since the origin), or None after the recovery timeout."""
    latency_limit_s = PROBE_SLOWDOWN_ALLOWED * run.baseline_probe_s
    start = time.monotonic()
    index = 0
    while time.monotonic() - start < run.plan.recovery_timeout_s:
        sent = time.monotonic()
        ready, timed = await asyncio.gather(readyz_ok(client, url), run.probes.send(client, url, index, run.probe))
        if ready and timed.outcome is Outcome.ADMITTED and timed.record.latency_s <= latency_limit_s:
            return timed.answered_at
        await asyncio.sleep(max(0.0, sent + PROBE_INTERVAL_S - time.monotonic()))
        index += 1
    return None


async def run_overload(url: str, rows: Sequence[EvalRow], plan: OverloadPlan) -> OverloadRun:
    """The four steps of the module docstring against the server at `url`, with progress lines on stderr."""
    url = url.rstrip("/")
    run = OverloadRun(plan, probe=min(rows, key=lambda row: row.duration_s))
    async with rest_client(DEFAULT_TIMEOUT_S) as client:
        await measure_baseline(client, url, run)
        log(f"baseline: probe {run.probe.audio.name} ({run.probe.duration_s:.1f} s of audio) answered in {run.baseline_probe_s:.2f} s")

        capacity_start = run.now()
        async with progress_lines(plan.progress_s, lambda: f"capacity {run.now() - capacity_start:5.0f} s: {run.capacity.progress()}"):
            await closed_loop(client, url, rows, plan.clients, CAPACITY_WARMUP_S + plan.capacity_s, run.capacity)
        run.capacity_window = (capacity_start + CAPACITY_WARMUP_S, capacity_start + CAPACITY_WARMUP_S + plan.capacity_s)
        if not run.capacity_served:
            raise RuntimeError(f"no request answered in the capacity phase: {run.capacity.failures_by_kind()}")
        run.burst_rate = plan.factor * run.capacity_requests_per_s
        log(f"capacity: {run.capacity_requests_per_s:.2f} requests/s, {run.capacity_audio_s_per_s:.1f} audio s/s; "
            f"burst: {run.burst_rate:.2f} requests/s for {plan.burst_s:g} s")

        burst_start = run.now()
        async with progress_lines(plan.progress_s, lambda: f"burst {run.now() - burst_start:5.0f} s: {run.burst.progress()}"):
            burst = await offer_burst(client, url, rows, run)
        run.burst_window = (burst_start, run.now())

        def recovery_line() -> str:
            return f"recovery {run.now() - run.burst_window[1]:5.0f} s: burst {run.burst.progress()}; probes {run.probes.progress()}"

        async with progress_lines(plan.progress_s, recovery_line):
            run.recovered_at = await await_recovery(client, url, run)
            await asyncio.gather(*burst)
    return run


def format_report(run: OverloadRun) -> str:
    s = run.summary()
    cap, burst = s["capacity"], s["burst"]
    refused = ", ".join(f"{status}: {n}" for status, n in sorted(burst["refused_by_status"].items())) or "none"
    failures = "; ".join(f"{phase}: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()) for phase, kinds in s["failures"].items())

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    recovery = "NOT RECOVERED" if run.recovery_s is None else f"{run.recovery_s:.1f} s after the burst"
    return "\n".join([
        f"capacity           {run.plan.clients} clients x {run.plan.capacity_s:g} s: {cap['requests']} requests, "
        f"{cap['requests_per_s']:.2f} requests/s, {cap['audio_s_per_s']:.2f} audio s/s, WER {percent(cap['wer'])} %, "
        f"latency p50/p95/max {spread_text(cap['latency'])} s",
        f"probe              {run.probe.audio.name} ({run.probe.duration_s:.1f} s): baseline {run.baseline_probe_s:.2f} s, "
        f"recovered when <= {PROBE_SLOWDOWN_ALLOWED * run.baseline_probe_s:.2f} s",
        f"burst              {run.plan.factor:g} x capacity = {burst['requests_per_s']:.2f} requests/s for {run.plan.burst_s:g} s",
        f"offered            {burst['offered']}",
        f"admitted           {burst['admitted']}",
        f"refused            {burst['refused']} ({percent(burst['refusal_rate'])} %): {refused}",
        f"errors             {failures or 'none'}",
        f"admitted latency   p50/p95/max {spread_text(burst['admitted_latency'])} s "
        f"(bound {run.plan.latency_bound_s:g} s, {s['over_bound']} over)",
        f"refusal latency    p50/p95/max {spread_text(burst['refusal_latency'])} s",
        f"admitted WER %     {percent(burst['admitted_wer'])} (capacity phase: {percent(cap['wer'])})",
        f"recovery           {recovery} ({s['probes_sent']} probes)",
        f"verdict            {'; '.join(s['problems']) or 'PASS'}",
    ])


def save_plot(run: OverloadRun, path: Path) -> None:
    """Top: requests offered, admitted, refused (and failed) per second, by when they were sent. Bottom:
    each admitted request's latency at the time it was sent, against the bound."""
    figure = new_figure(nrows=2, sharex=True, figsize=(11, 7))
    if figure is None:
        return
    fig, (ax_rate, ax_latency) = figure
    sent = run.capacity.records + run.burst.records
    edges, offered = binned([r.sent_at for r in sent], 1.0)
    ax_rate.stairs(offered, edges, color="black", linewidth=3, alpha=0.25, label="offered")  # wide, under the parts
    for outcome in Outcome:
        if records := [r for r in sent if r.outcome is outcome]:
            edges, counts = binned([r.sent_at for r in records], 1.0)
            ax_rate.stairs(counts, edges, label=str(outcome))
    ax_rate.set_ylabel("requests per second")
    for name, rest_log in (("capacity", run.capacity), ("burst", run.burst), ("recovery probes", run.probes)):
        admitted = rest_log.with_outcome(Outcome.ADMITTED)
        ax_latency.scatter([r.sent_at for r in admitted], [r.record.latency_s for r in admitted], s=10, label=name)
    ax_latency.axhline(run.plan.latency_bound_s, color="red", linestyle=":", label="latency bound")
    ax_latency.set_ylabel("admitted request latency, s")
    ax_latency.set_xlabel("seconds since the start")
    for ax in (ax_rate, ax_latency):
        ax.axvspan(*run.burst_window, color="grey", alpha=0.15, label="burst")
        if run.recovered_at is not None:
            ax.axvline(run.recovered_at, color="green", linestyle="--", label="recovered")
        ax.legend(loc="upper left", fontsize="small")
    ax_rate.set_title(f"{run.plan.factor:g}x capacity for {run.plan.burst_s:g} s: {100 * run.refusal_rate:.0f} % refused, "
                      f"recovery {seconds(run.recovery_s)} s")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.overload", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_port=8768)
    parser.add_argument("--clients", type=positive_int, default=4, help="closed-loop clients measuring capacity (default: %(default)s)")
    parser.add_argument("--capacity-s", type=float, default=30.0, help="seconds of capacity measurement (default: %(default)s)")
    parser.add_argument("--factor", type=float, default=3.0, help="burst rate as a multiple of the capacity's requests/s (default: %(default)s)")
    parser.add_argument("--burst-s", type=float, default=30.0, help="seconds of burst (default: %(default)s)")
    parser.add_argument("--latency-bound-s", type=float, default=DEFAULT_LATENCY_BOUND_S,
                        help="longest an admitted request may take: ASR_ADMISSION_MAX_WAIT_S + processing (default: %(default)s)")
    parser.add_argument("--recovery-timeout-s", type=float, default=120.0, help="longest wait for recovery (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = rows_or_exit(parser, args)
    plan = OverloadPlan(clients=args.clients, capacity_s=args.capacity_s, factor=args.factor, burst_s=args.burst_s,
                        latency_bound_s=args.latency_bound_s, recovery_timeout_s=args.recovery_timeout_s)
    try:
        with target_server(args.url, args.port) as target:
            run = asyncio.run(run_overload(target.url, rows, plan))
    except RuntimeError as exc:
        sys.exit(f"overload test failed: {exc}")
    print(format_report(run))
    if args.plot:
        save_plot(run, args.plot)
    if args.json:
        write_json(args.json, {"summary": run.summary(),
                               "records": {name: [record_json(r) for r in rest_log.records] for name, rest_log in run.phases().items()}})
    sys.exit(1 if run.problems() else 0)


if __name__ == "__main__":
    main()
