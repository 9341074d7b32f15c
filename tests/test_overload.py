"""Overload and soak against real servers, through loadtest.overload and loadtest.soak: past its capacity
the server refuses cleanly, answers what it admits in time and right, and recovers; under a steady mix
of REST and live streams it makes no errors and its memory stays flat."""

from __future__ import annotations

import asyncio

import httpx

from loadtest.bench_rest import DEFAULT_SET
from loadtest.evalset import DEFAULT_MANIFEST, load_rows, normalize
from loadtest.harness import Outcome
from loadtest.overload import OverloadPlan, format_report as overload_report, run_overload
from loadtest.soak import SoakPlan, decode_rows, format_report as soak_report, run_soak
from tests.conftest import JFK, JFK_TEXT, running_server

ROWS = load_rows(DEFAULT_MANIFEST, sets=[DEFAULT_SET])


def test_three_times_capacity_is_refused_cleanly_and_the_server_recovers() -> None:
    plan = OverloadPlan(capacity_s=15.0, factor=3.0, burst_s=30.0, recovery_timeout_s=30.0)
    with running_server() as server:
        run = asyncio.run(run_overload(server.url, ROWS, plan))
        print(overload_report(run))
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        jfk = httpx.post(f"{server.url}/v1/transcribe", files={"file": (JFK.name, JFK.read_bytes())}, timeout=60)
    summary = run.summary()
    # anything but 200, 429 and 503 (another status, or no answer) is a failure
    assert run.failures() == {}, run.failures()
    assert summary["burst"]["refused"] > 0, "the burst was not refused at all: it did not overload the server"
    late = [(r.record.audio.name, round(r.record.latency_s, 1)) for r in run.over_bound()]
    assert not late, f"admitted requests over the {plan.latency_bound_s:g} s bound: {late}"
    assert summary["burst"]["admitted_wer"] <= 0.35, summary["burst"]
    assert run.recovery_s is not None and run.recovery_s <= 30.0, f"recovery: {run.recovery_s}"
    assert ready.status_code == 200, ready.text
    assert jfk.status_code == 200 and normalize(jfk.json()["text"]) == JFK_TEXT, jfk.text


def test_short_soak_makes_no_errors_and_memory_stays_flat() -> None:
    plan = SoakPlan(rest_clients=2, streams=1, duration_s=60.0)
    audio = decode_rows(ROWS)
    with running_server() as server:
        run = asyncio.run(run_soak(server.url, server.process.pid, ROWS, audio, plan))
    print(soak_report(run))
    assert run.problems() == [], run.problems()
    assert run.rest.with_outcome(Outcome.ADMITTED) and run.sessions, "the soak served nothing"
    assert run.rss_growth_pct is not None and run.rss_growth_pct < 25.0, (run.rss_start, run.rss_end)
