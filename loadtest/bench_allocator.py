"""Does the allocator move compute to the bottleneck? Benchmark with an I/O-bound post stage.

The server delivers every transcribed segment to a webhook (``ASR_POST_WEBHOOK_URL``); the receiver
started here answers each delivery after a random ``--delay-ms`` wait, like a slow CRM endpoint, so the
post stage waits on I/O and becomes the bottleneck. The same REST load (``--concurrency`` clients
looping over the LibriSpeech rows) runs against a server with the allocator off, then against one with
it on. With it on, ``/v1/pipeline`` is sampled every second: when the post pool grows, whether it
changes again once settled (oscillation), and how long it takes to shrink back once the load stops.

Run: python -m loadtest.bench_allocator --plot loadtest/results/bench_allocator.png
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from loadtest.bench_rest import DEFAULT_SET, log, start_server, stop_server
from loadtest.plotting import new_figure, save_figure
from loadtest.evalset import DEFAULT_MANIFEST, load_rows
from loadtest.rest import transcribe_one, positive_int


class SlowReceiver:
    """A webhook receiver on 127.0.0.1:port that answers 204 after a random delay."""

    def __init__(self, port: int, delay_ms: tuple[float, float]):
        self.delay_s = (delay_ms[0] / 1000, delay_ms[1] / 1000)
        self.deliveries = 0
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(random.uniform(*self.delay_s))
        self.deliveries += 1
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def __enter__(self) -> SlowReceiver:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()


@dataclass
class Run:
    allocator: bool
    load_s: float
    audio_done_s: float = 0.0
    requests: int = 0
    errors: int = 0
    samples: list[tuple[float, int, str | None]] = field(default_factory=list)  # (t, post workers, bottleneck)
    decisions: list[dict] = field(default_factory=list)
    back_to_min_s: float | None = None  # after the load stopped

    @property
    def throughput(self) -> float:
        return self.audio_done_s / self.load_s


async def run_load(url: str, rows, concurrency: int, load_s: float, run: Run, min_workers: int, settle_s: float) -> None:
    started = time.monotonic()
    deadline = started + load_s

    async def client_loop(client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            record = await transcribe_one(client, url, i, rows[i % len(rows)])
            i += concurrency
            if time.monotonic() > deadline:
                break  # finished after the window: not counted, as it was partly served outside it
            run.requests += 1
            run.errors += not record.ok
            run.audio_done_s += record.duration_s if record.ok else 0.0

    async def sampler(client: httpx.AsyncClient) -> None:
        while True:
            view = (await client.get(f"{url}/v1/pipeline")).json()
            post = next(s for s in view["stages"] if s["name"] == "post")
            run.samples.append((time.monotonic() - started, post["workers"], view["bottleneck"]))
            run.decisions = view["allocator"]["decisions"]
            if time.monotonic() > deadline and post["workers"] <= min_workers and run.back_to_min_s is None:
                run.back_to_min_s = time.monotonic() - deadline
                return
            if time.monotonic() > deadline + settle_s:
                return
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=300) as client:
        sampling = asyncio.create_task(sampler(client))
        await asyncio.gather(*(client_loop(client, k) for k in range(concurrency)))
        log(f"load done: {run.requests} requests, {run.audio_done_s:.0f} s of audio in {load_s:.0f} s")
        await sampling


def pool_changes(run: Run, start_s: float, stop_s: float) -> int:
    sizes = [w for t, w, _ in run.samples if start_s <= t <= stop_s]
    return sum(a != b for a, b in zip(sizes, sizes[1:]))


def save_plot(runs: list[Run], path: Path) -> None:
    figure = new_figure(ncols=2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    if figure is None:
        return
    fig, (ax_workers, ax_tput) = figure
    on = next(r for r in runs if r.allocator)
    ax_workers.step([t for t, _, _ in on.samples], [w for _, w, _ in on.samples], where="post")
    ax_workers.axvline(on.load_s, color="grey", linestyle="--", label="load stops")
    ax_workers.set_xlabel("seconds since the load started")
    ax_workers.set_ylabel("post stage workers")
    ax_workers.set_title("allocator on: the post pool over time")
    ax_workers.legend()
    ax_tput.bar(["allocator off", "allocator on"], [r.throughput for r in runs], color=["tab:orange", "tab:blue"])
    ax_tput.set_ylabel("audio s transcribed per s")
    ax_tput.set_title(f"throughput x{runs[1].throughput / runs[0].throughput:.2f}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=positive_int, default=8, help="REST clients (default: %(default)s)")
    parser.add_argument("--load-s", type=float, default=90.0, help="seconds of load per run (default: %(default)s)")
    parser.add_argument("--settle-s", type=float, default=30.0, help="the allocator's time to settle; changes after it count as oscillation (default: %(default)s)")
    parser.add_argument("--delay-ms", type=float, nargs=2, default=(500.0, 1000.0), metavar=("MIN", "MAX"),
                        help="the receiver's delay per delivery, uniform (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--webhook-port", type=int, default=8767)
    parser.add_argument("--plot", type=Path, metavar="FILE.png")
    args = parser.parse_args(argv)

    rows = load_rows(DEFAULT_MANIFEST, sets=[DEFAULT_SET])
    webhook = f"http://127.0.0.1:{args.webhook_port}/deliveries"
    runs = []
    with SlowReceiver(args.webhook_port, tuple(args.delay_ms)) as receiver:
        for enabled in (False, True):
            env = {"ASR_POST_WEBHOOK_URL": webhook, "ASR_ALLOCATOR_ENABLED": str(enabled).lower()}
            proc = start_server(args.port, env)
            run = Run(allocator=enabled, load_s=args.load_s)
            try:
                asyncio.run(run_load(f"http://127.0.0.1:{args.port}", rows, args.concurrency, args.load_s, run,
                                     min_workers=1, settle_s=60.0 if enabled else 0.0))
            finally:
                stop_server(proc)
            runs.append(run)
        log(f"receiver took {receiver.deliveries} deliveries")

    off, on = runs
    grown = next((t for t, w, _ in on.samples if w > 1), None)
    print(f"{'allocator':<10} {'requests':>8} {'errors':>6} {'audio s':>8} {'throughput':>10}")
    for r in runs:
        print(f"{'on' if r.allocator else 'off':<10} {r.requests:>8} {r.errors:>6} {r.audio_done_s:>8.0f} {r.throughput:>10.2f}")
    print(f"throughput ratio on/off: {on.throughput / off.throughput:.2f}x")
    print(f"post pool first grew {grown:.0f} s after the load started" if grown is not None else "post pool never grew")
    print(f"post pool sizes after settling ({args.settle_s:.0f} s): {sorted({w for t, w, _ in on.samples if args.settle_s <= t <= args.load_s})}, "
          f"changes after settling while loaded: {pool_changes(on, args.settle_s, args.load_s)}")
    print(f"back to the minimum {on.back_to_min_s:.0f} s after the load stopped" if on.back_to_min_s is not None
          else "did not shrink back to the minimum in the time sampled")
    print("decisions (newest first):")
    for d in on.decisions:
        print(f"  {d['stage']:<9} {d['action']:<6} {d['workers_before']} -> {d['workers_after']}  pressure {d['pressure']:.2f}  {d['reason']}")
    if args.plot:
        save_plot(runs, args.plot)


if __name__ == "__main__":
    main()
