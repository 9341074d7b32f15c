"""Does the allocator move compute to the bottleneck? The same load with it off, then on.

What it measures. On a CPU machine the compute the allocator hands out is cores. With ``ASR_CPU_THREADS=1``
each stage worker runs torch on one thread, so a pool's size is the number of cores it can use and the
allocator's CPU budget (``ASR_ALLOCATOR_CPU_SLOTS``, one slot per core) means just that. Under 8 REST
clients looping over the LibriSpeech rows, the encoder (acoustic stage: one padded 30 s window per row,
whatever its length) is the bottleneck; one encoder worker keeps one core busy and leaves the other
half idle. ``ASR_MODEL_MAX_WORKERS=2`` lets the allocator give the encoder a second worker. The load runs
against a server with ``ASR_ALLOCATOR_ENABLED=false``, then against one with it on. ``/v1/pipeline`` is
sampled every second in both (pools, pressure, the bottleneck named); the report gives throughput (audio
s/s, requests/s), request latency p50/p95 and WER, on against off; when the bottleneck's pool grew, whether
any pool changed once settled (oscillation), how long the pools took to shrink back after the load; and
every decision.

Why this setting. The post stage used to be made the bottleneck by a slow webhook awaited inside it;
webhooks now go through an outbox of their own, and no other real setting makes a cheap stage the
bottleneck. Measured on 2 cores (``--scenario``; "others" is the CPU other work on the machine took):
features and post cost 1-4 % of a window (16 streams at 2x: pressure 0.04, acoustic 0.99);
a decoder running batch of 1 or 2 rows with up to 3 workers (``decoder``, ``decoder-long``,
``decoder-batch2``) is the real bottleneck on long files (pressure 0.99), but on 2 cores its workers
only share the same cores with the encoder: 0.88-1.13x, inside the noise; with the default 2 torch
threads the server already uses 1.8 of 2 cores, and a second encoder worker gives 1.01x (``encoder``).
With one thread per worker it gives 1.36-1.43x (quiet machine): the allocator fills the idle core. That matches, not beats,
a hand-set ``ASR_ACOUSTIC_WORKERS=2``; what it shows is that the allocator finds that pool by itself
and gives the core back when the load stops.

The machine is measured too: the server's cores, the cores other processes took and the hypervisor's
steal over each run. Other work on a shared machine moves throughput by up to 2x (the same settings
measured 9.9 and 19.8 audio s/s); the report says NOISY when it saw any, and ``--scenario default``
(where the allocator can change nothing on the CPU) is the A/A check of that noise: 1.02x when quiet.

Run (about 4 minutes): python -m loadtest.bench_allocator --plot loadtest/results/bench_allocator.png
Other loads: --scenario NAME (see --help), --clients N, --env ASR_NAME=VALUE, --rounds R (off, on, off, on).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import wave
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np

from loadtest.bench_rest import DEFAULT_SET, log, start_server, stop_server
from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, percentile, word_error_rate
from loadtest.plotting import new_figure, save_figure
from loadtest.rest import positive_int, transcribe_one

STAGES = ("features", "acoustic", "decoder", "post")
NOISY_CORES = 0.2  # other processes using more CPU than this during a run make its figures unreliable
LONG_FILE_S = 28.0  # "long" files: consecutive rows joined, 0.3 s apart, up to this long: one dense window each
REFUSED = (429, 503)  # admission said no: the client waits a second instead of spinning, and the refusal is counted


@dataclass(frozen=True)
class Scenario:
    """A load and the server settings that give it a bottleneck; the allocator is switched on and off on top."""

    stage: str  # the stage the settings are meant to make the bottleneck (the report checks that the profiler agrees)
    workload: str  # rest | streams
    env: dict[str, str]
    clients: int  # REST clients in a closed loop, or concurrent streams
    what: str  # one line for the report
    files: str = "rows"  # REST: the LibriSpeech rows as they are, or "long": joined into files of up to LONG_FILE_S


SCENARIOS = {
    # the decoder keeps a running batch of one row: a worker decodes one window at a time, token by token, and
    # the allocator may give it up to two more workers (each its own running batch: GPU in-flight batches)
    "decoder": Scenario("decoder", "rest", {"ASR_DECODER_MAX_BATCH_SIZE": "1", "ASR_MODEL_MAX_WORKERS": "3"}, 6,
                        "decoder running batch of 1 row, up to 3 decoder workers; 6 REST clients"),
    "decoder-long": Scenario("decoder", "rest", {"ASR_DECODER_MAX_BATCH_SIZE": "1", "ASR_MODEL_MAX_WORKERS": "3"}, 6,
                             "decoder running batch of 1 row, up to 3 decoder workers; 6 REST clients sending ~28 s files", files="long"),
    "decoder-batch2": Scenario("decoder", "rest", {"ASR_DECODER_MAX_BATCH_SIZE": "2", "ASR_MODEL_MAX_WORKERS": "3"}, 6,
                               "decoder running batch of 2 rows, up to 3 decoder workers; 6 REST clients sending ~28 s files", files="long"),
    "encoder": Scenario("acoustic", "rest", {"ASR_MODEL_MAX_WORKERS": "2"}, 8,
                        "the default settings, but up to 2 encoder (and decoder) workers; 8 REST clients"),
    # one torch thread per stage worker: a pool's size is the cores it gets
    "encoder-1-thread": Scenario("acoustic", "rest", {"ASR_CPU_THREADS": "1", "ASR_MODEL_MAX_WORKERS": "2"}, 8,
                                 "one torch thread per worker, up to 2 encoder workers; 8 REST clients"),
    "features-streams": Scenario("features", "streams", {"ASR_STREAM_MAX_SESSIONS": "32"}, 16,
                                 "16 concurrent streams at 2x real time, features pool up to ASR_CPU_STAGE_MAX_WORKERS"),
    "default": Scenario("acoustic", "rest", {}, 8, "the default settings; 8 REST clients"),
}
DEFAULT_SCENARIO = "encoder-1-thread"


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy (all cores), and stolen by the hypervisor."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9])
    return (user + nice + system + irq + softirq) * TICK_S, steal * TICK_S


@dataclass(frozen=True)
class CpuUse:
    """Cores used over the load window: by the server, by everything else on the machine (other work
    sharing it), and stolen by the hypervisor. The server's share is what the allocator changes; the
    others say how noisy the run was."""

    server_cores: float
    other_cores: float
    steal_cores: float


class CpuMeter:
    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.started = (time.monotonic(), process_cpu_s(server_pid), process_cpu_s(os.getpid()), *machine_cpu_s())

    def stop(self) -> CpuUse:
        t0, server0, client0, busy0, steal0 = self.started
        wall = time.monotonic() - t0
        server, client = process_cpu_s(self.pid) - server0, process_cpu_s(os.getpid()) - client0
        busy, steal = (b - a for a, b in zip((busy0, steal0), machine_cpu_s()))
        return CpuUse(server / wall, max(0.0, busy - server - client) / wall, steal / wall)


@dataclass
class Sample:
    t: float  # seconds since the load started
    workers: dict[str, int]
    pressure: dict[str, float]
    utilization: dict[str, float]
    queue: dict[str, int]
    bottleneck: str | None


@dataclass
class Run:
    allocator: bool
    load_s: float
    audio_done_s: float = 0.0
    requests: int = 0  # REST requests, or stream sessions, finished inside the load window
    errors: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)  # REST: per request; streams: per final
    refs: list[str] = field(default_factory=list)
    hyps: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    min_workers: dict[str, int] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)  # oldest first
    back_to_min_s: float | None = None  # after the load stopped
    started_unix: float = 0.0  # when the load started, on the clock of the decisions' "at"
    cpu: CpuUse | None = None  # over the load window


    @property
    def throughput(self) -> float:
        """Audio seconds transcribed per second of load."""
        return self.audio_done_s / self.load_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.load_s

    def latency(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def wer(self) -> float:
        return word_error_rate(self.refs, self.hyps) if self.refs else float("nan")

    def loaded(self, start_s: float = 0.0) -> list[Sample]:
        return [s for s in self.samples if start_s <= s.t <= self.load_s]

    def bottlenecks(self, start_s: float = 0.0) -> Counter:
        return Counter(s.bottleneck for s in self.loaded(start_s))


async def sample_pipeline(client: httpx.AsyncClient, url: str, run: Run, started: float, tail_s: float) -> None:
    """GET /v1/pipeline every second while the load runs, and after it (allocator on) until every pool is
    back at its configured size or ``tail_s`` has passed."""
    deadline = started + run.load_s
    while True:
        try:
            view = (await client.get(f"{url}/v1/pipeline", timeout=10)).json()
        except httpx.HTTPError as exc:
            log(f"sampling /v1/pipeline failed: {exc!r}")
            await asyncio.sleep(1.0)
            continue
        now = time.monotonic()
        stages = {s["name"]: s for s in view["stages"]}
        run.min_workers = {name: s["min_workers"] for name, s in stages.items()}
        run.samples.append(Sample(now - started, {n: s["workers"] for n, s in stages.items()}, {n: s["pressure"] for n, s in stages.items()},
                                  {n: s["utilization"] for n, s in stages.items()}, {n: s["queue_depth"] for n, s in stages.items()},
                                  view["bottleneck"]))
        run.decisions = list(reversed(view["allocator"]["decisions"]))
        if now > deadline:
            at_min = all(s["workers"] <= s["min_workers"] for s in stages.values())
            if at_min and run.back_to_min_s is None and any(s.workers != run.samples[0].workers for s in run.samples):
                run.back_to_min_s = now - deadline
            if at_min or now > deadline + tail_s:
                return
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - now)))


async def rest_load(client: httpx.AsyncClient, url: str, rows: list[EvalRow], clients: int, run: Run, deadline: float) -> None:
    """``clients`` closed loops over the rows: each sends its next file as soon as the last one is answered."""

    async def loop(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            row = rows[i % len(rows)]
            record = await transcribe_one(client, url, i, row)
            i += clients
            if record.status in REFUSED:
                run.refused += 1
                await asyncio.sleep(1.0)
                continue
            if time.monotonic() > deadline:
                break  # finished after the window: not counted, as it was partly served outside it
            run.requests += 1
            run.errors += not record.ok
            if record.ok:
                run.audio_done_s += record.duration_s
                run.latencies.append(record.latency_s)
                run.refs.append(row.text)
                run.hyps.append(record.hypothesis)

    await asyncio.gather(*(loop(k) for k in range(clients)))


async def stream_load(url: str, rows: list[EvalRow], audio: dict[Path, np.ndarray], streams: int, speed: float, run: Run, deadline: float) -> None:
    """``streams`` concurrent sessions, each playing the rows one after another at ``speed`` x real time."""
    from loadtest.stream import StreamClient

    client = StreamClient(url.replace("http://", "ws://") + "/v1/stream", speed=speed, timeout_s=120)

    async def loop(offset: int) -> None:
        i = offset * 7  # each stream starts at another file
        while time.monotonic() < deadline:
            row = rows[i % len(rows)]
            i += 1
            record = await client.run_file(audio[row.audio])
            if record.handshake_status in REFUSED:
                run.refused += 1
                await asyncio.sleep(1.0)
                continue
            if time.monotonic() > deadline:
                break
            run.requests += 1
            run.errors += record.error is not None
            if record.error is None:
                run.audio_done_s += record.audio_s
                run.latencies += record.final_latencies_s
                run.refs.append(row.text)
                run.hyps.append(record.hypothesis)

    await asyncio.gather(*(loop(k) for k in range(streams)))


async def run_load(url: str, rows: list[EvalRow], audio: dict[Path, np.ndarray], scenario: Scenario, clients: int, speed: float, run: Run,
                   tail_s: float, server_pid: int) -> None:
    meter = CpuMeter(server_pid)
    started, run.started_unix = time.monotonic(), time.time()
    deadline = started + run.load_s
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        sampling = asyncio.create_task(sample_pipeline(client, url, run, started, tail_s))
        if scenario.workload == "rest":
            await rest_load(client, url, rows, clients, run, deadline)
        else:
            await stream_load(url, rows, audio, clients, speed, run, deadline)
        run.cpu = meter.stop()
        log(f"load done: {run.requests} finished, {run.audio_done_s:.0f} s of audio in {run.load_s:.0f} s")
        await sampling


def pool_changes(run: Run, stage: str, start_s: float) -> int:
    sizes = [s.workers[stage] for s in run.loaded(start_s)]
    return sum(a != b for a, b in zip(sizes, sizes[1:]))


def first_grown(run: Run, stage: str) -> float | None:
    base = run.min_workers.get(stage, 1)
    return next((s.t for s in run.samples if s.workers[stage] > base), None)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def pooled_throughput(runs: list[Run]) -> float:
    return sum(r.audio_done_s for r in runs) / sum(r.load_s for r in runs)


def pooled_latency(runs: list[Run], q: float) -> float:
    return percentile([x for r in runs for x in r.latencies], q)


def describe_bottlenecks(counts: Counter) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{name or 'none'} {100 * n / total:.0f}%" for name, n in counts.most_common())


def report(runs: list[Run], name: str, scenario: Scenario, clients: int, settle_s: float) -> str:
    offs, ons = [r for r in runs if not r.allocator], [r for r in runs if r.allocator]
    stage = scenario.stage
    unit = "requests" if scenario.workload == "rest" else "final latency"
    lines = [f"scenario {name}: {scenario.what}",
             f"server settings: {' '.join(f'{k}={v}' for k, v in scenario.env.items()) or '(defaults)'}; "
             f"{clients} {'REST clients' if scenario.workload == 'rest' else 'streams'}; latency: {unit}",
             "",
             f"{'allocator':<9} {'round':>5} {'done':>5} {'errors':>6} {'refused':>7} {'audio s':>7} {'audio s/s':>9} {'req/s':>5} "
             f"{'p50 s':>6} {'p95 s':>6} {'WER %':>6} {stage + ' pool':>13} {'server cores':>12} {'others':>6} {'steal':>5}"]
    for i, r in enumerate(runs):
        sizes = [s.workers[stage] for s in r.loaded(settle_s)] or [0]
        cpu = r.cpu or CpuUse(float("nan"), float("nan"), float("nan"))
        lines.append(f"{'on' if r.allocator else 'off':<9} {i // 2 + 1:>5} {r.requests:>5} {r.errors:>6} {r.refused:>7} {r.audio_done_s:>7.0f} "
                     f"{r.throughput:>9.2f} {r.requests_per_s:>5.2f} {r.latency(50):>6.2f} {r.latency(95):>6.2f} {100 * r.wer:>6.2f} "
                     f"{f'{min(sizes)}-{max(sizes)}':>13} {cpu.server_cores:>12.2f} {cpu.other_cores:>6.2f} {cpu.steal_cores:>5.2f}")
    others = [r.cpu.other_cores for r in runs if r.cpu]
    if others and (max(others) > NOISY_CORES or max(others) - min(others) > NOISY_CORES):
        lines.append(f"NOISY: other processes used {min(others):.2f}-{max(others):.2f} cores during the runs; on a shared machine that alone "
                     "moves throughput by up to 2x: repeat the benchmark when the machine is quiet")
    off_tput, on_tput = pooled_throughput(offs), pooled_throughput(ons)
    (off_p50, on_p50), (off_p95, on_p95) = ((pooled_latency(offs, q), pooled_latency(ons, q)) for q in (50, 95))
    off_named = sum((r.bottlenecks(5.0) for r in offs), Counter())
    lines += ["",
              f"throughput on/off: {on_tput:.2f} / {off_tput:.2f} audio s/s = {on_tput / off_tput:.2f}x"
              + (f" (per round: {', '.join(f'{b.throughput / a.throughput:.2f}x' for a, b in zip(offs, ons))})" if len(ons) > 1 else ""),
              f"latency p50 on/off: {on_p50:.2f} / {off_p50:.2f} s = {on_p50 / off_p50:.2f}x; p95: {on_p95:.2f} / {off_p95:.2f} s = {on_p95 / off_p95:.2f}x",
              f"server CPU per audio second, on/off: {mean([r.cpu.server_cores / r.throughput for r in ons]):.3f} / "
              f"{mean([r.cpu.server_cores / r.throughput for r in offs]):.3f} s",
              f"bottleneck named while loaded, allocator off: {describe_bottlenecks(off_named)}"
              + ("" if off_named.most_common(1)[0][0] == stage else f"  (NOT the {stage} stage this scenario is built around)"),
              f"bottleneck named after settling ({settle_s:.0f} s), allocator on: {describe_bottlenecks(sum((r.bottlenecks(settle_s) for r in ons), Counter()))}",
              "mean pressure while loaded, off: " + ", ".join(f"{n} {mean([s.pressure[n] for r in offs for s in r.loaded(5.0)]):.2f}" for n in STAGES),
              "mean pressure after settling, on: " + ", ".join(f"{n} {mean([s.pressure[n] for r in ons for s in r.loaded(settle_s)]):.2f}" for n in STAGES)]
    for i, on in enumerate(ons, 1):
        grown = first_grown(on, stage)
        others = {n: sorted({s.workers[n] for s in on.loaded()}) for n in STAGES if n != stage}
        lines += [f"round {i}: the {stage} pool first grew {grown:.0f} s after the load started" if grown is not None
                  else f"round {i}: the {stage} pool never grew",
                  f"  {stage} pool sizes after settling: {sorted({s.workers[stage] for s in on.loaded(settle_s)})}, "
                  f"changes after settling while loaded: {pool_changes(on, stage, settle_s)} "
                  f"(all pools: {sum(pool_changes(on, n, settle_s) for n in STAGES)}); "
                  f"other pools while loaded: {', '.join(f'{n} {v}' for n, v in others.items())}",
                  f"  every pool back to its configured size {on.back_to_min_s:.0f} s after the load stopped" if on.back_to_min_s is not None
                  else "  no pool grew" if all(s.workers == on.samples[0].workers for s in on.samples)
                  else "  pools not back to their configured sizes in the time sampled"]
    lines.append("decisions of the last allocator-on run (oldest first; t: seconds since its load started):")
    for d in ons[-1].decisions:
        lines.append(f"  t={d['at'] - ons[-1].started_unix:>6.1f}  {d['stage']:<9} {d['action']:<6} {d['workers_before']} -> {d['workers_after']}  "
                     f"pressure {d['pressure']:.2f}  {d['reason']}")
    return "\n".join(lines)


def save_plot(runs: list[Run], stage: str, path: Path) -> None:
    figure = new_figure(ncols=3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [2.4, 1, 1]})
    if figure is None:
        return
    fig, (ax_pool, ax_tput, ax_lat) = figure
    on = [r for r in runs if r.allocator][-1]
    off = [r for r in runs if not r.allocator][-1]
    ts = [s.t for s in on.samples]
    colors = {"features": "tab:green", "acoustic": "tab:blue", "decoder": "tab:purple", "post": "tab:brown"}
    ax_pool.step(ts, [s.workers[stage] for s in on.samples], where="post", color=colors[stage], linewidth=2.5, label=f"{stage} workers (on)")
    for k, name in enumerate(n for n in STAGES if n != stage and len({s.workers[n] for s in on.samples}) > 1):
        offset = 0.06 * (k + 1)  # drawn a little above, so a pool of the same size stays visible
        ax_pool.step(ts, [s.workers[name] + offset for s in on.samples], where="post", color=colors[name], linewidth=1,
                     label=f"{name} workers (on)")
    ax_pool.axvline(on.load_s, color="grey", linestyle="--", label="load stops")
    ax_pool.set_xlabel("seconds since the load started")
    ax_pool.set_ylabel("workers")
    ax_pool.set_ylim(0, max(s.workers[n] for s in on.samples for n in STAGES) + 1)
    ax_pressure = ax_pool.twinx()
    ax_pressure.plot(ts, [s.pressure[stage] for s in on.samples], color="tab:red", linewidth=1, label=f"{stage} pressure (on)")
    ax_pressure.plot([s.t for s in off.samples], [s.pressure[stage] for s in off.samples], color="tab:red", linewidth=1, linestyle=":",
                     label=f"{stage} pressure (off)")
    ax_pressure.set_ylabel("pressure")
    ax_pressure.set_ylim(0, 1.05)
    handles = ax_pool.get_legend_handles_labels()[0] + ax_pressure.get_legend_handles_labels()[0]
    ax_pool.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax_pool.set_title(f"allocator on: the {stage} pool and its pressure")
    offs, ons = [r for r in runs if not r.allocator], [r for r in runs if r.allocator]
    off_tput, on_tput = pooled_throughput(offs), pooled_throughput(ons)
    ax_tput.bar(["allocator off", "allocator on"], [off_tput, on_tput], color=["tab:orange", "tab:blue"])
    ax_tput.set_ylabel("audio s transcribed per s")
    ax_tput.set_title(f"throughput x{on_tput / off_tput:.2f}")
    for x, group in enumerate((offs, ons)):
        cores = mean([r.cpu.server_cores for r in group if r.cpu])
        ax_tput.text(x, 0.02 * max(off_tput, on_tput), f"server used\n{cores:.2f} cores", ha="center", va="bottom", color="white", fontsize=9)
    width = 0.38
    for k, (label, q) in enumerate((("p50", 50), ("p95", 95))):
        values = [pooled_latency(offs, q), pooled_latency(ons, q)]
        ax_lat.bar([x + (k - 0.5) * width for x in (0, 1)], values, width, label=label, color=["tab:orange", "tab:blue"], alpha=0.6 + 0.4 * k)
    ax_lat.set_xticks([0, 1], ["allocator off", "allocator on"])
    ax_lat.set_ylabel("latency s (p50 light, p95 dark)")
    ax_lat.set_title("latency")
    save_figure(fig, path)


def long_files(rows: list[EvalRow], folder: Path) -> list[EvalRow]:
    """Consecutive rows joined (0.3 s of silence between them) into 16 kHz WAV files of up to LONG_FILE_S,
    written to ``folder``: each is one window full of speech, so its decoding takes ~4x the tokens of a row."""
    from loadtest.stream import decode_file

    gap = np.zeros(int(0.3 * 16000), np.float32)
    groups: list[list[tuple[EvalRow, np.ndarray]]] = [[]]
    for row in rows:
        audio = decode_file(row.audio)
        if groups[-1] and sum(len(a) + len(gap) for _, a in groups[-1]) + len(audio) > LONG_FILE_S * 16000:
            groups.append([])
        groups[-1].append((row, audio))
    out = []
    for k, group in enumerate(groups):
        audio = np.concatenate([part for _, a in group for part in (a, gap)])
        path = folder / f"long{k:02d}.wav"
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(16000)
            f.writeframes(np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes())
        out.append(EvalRow(path, " ".join(r.text for r, _ in group), "long", len(audio) / 16000))
    return out


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("ASR_"):
        raise argparse.ArgumentTypeError(f"expected ASR_NAME=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_allocator", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="scenarios:\n" + "\n".join(f"  {k:<17} {v.what}" for k, v in SCENARIOS.items()))
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=DEFAULT_SCENARIO, help="the load and settings (default: %(default)s)")
    parser.add_argument("--clients", type=positive_int, help="REST clients or streams (default: the scenario's)")
    parser.add_argument("--files", choices=("rows", "long"), help="REST: the rows as they are, or joined into ~28 s files (default: the scenario's)")
    parser.add_argument("--env", type=env_pair, action="append", default=[], metavar="ASR_NAME=VALUE", help="another server setting; repeat for several")
    parser.add_argument("--speed", type=float, default=2.0, help="streams: times real time (default: %(default)s)")
    parser.add_argument("--load-s", type=float, default=90.0, help="seconds of load per run (default: %(default)s)")
    parser.add_argument("--settle-s", type=float, default=30.0, help="the allocator's time to settle; pool changes after it count as oscillation (default: %(default)s)")
    parser.add_argument("--tail-s", type=float, default=60.0, help="allocator on: longest to watch the pools shrink back after the load (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=1, help="off, on, off, on, ...: spreads a shared machine's drift over both (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--plot", type=Path, metavar="FILE.png")
    args = parser.parse_args(argv)

    scenario = SCENARIOS[args.scenario]
    scenario = replace(scenario, env={**scenario.env, **dict(args.env)}, files=args.files or scenario.files)
    clients = args.clients or scenario.clients
    rows = load_rows(DEFAULT_MANIFEST, sets=[DEFAULT_SET])
    tmp = tempfile.TemporaryDirectory(prefix="bench_allocator_")
    if scenario.workload == "rest" and scenario.files == "long":
        rows = long_files(rows, Path(tmp.name))
        log(f"{len(rows)} long files, {sum(r.duration_s for r in rows) / len(rows):.1f} s each on average")
    url = f"http://127.0.0.1:{args.port}"
    audio = {}
    if scenario.workload == "streams":
        from loadtest.stream import decode_file

        audio = {row.audio: decode_file(row.audio) for row in rows}
    runs: list[Run] = []
    for _ in range(args.rounds):
        for enabled in (False, True):
            proc = start_server(args.port, {**scenario.env, "ASR_ALLOCATOR_ENABLED": str(enabled).lower(), "ASR_LOG_LEVEL": "warning"})
            run = Run(allocator=enabled, load_s=args.load_s)
            try:
                asyncio.run(run_load(url, rows, audio, scenario, clients, args.speed, run, args.tail_s if enabled else 0.0, proc.pid))
            finally:
                stop_server(proc)
            runs.append(run)
    tmp.cleanup()
    print(report(runs, args.scenario, scenario, clients, args.settle_s))
    if args.plot:
        save_plot(runs, scenario.stage, args.plot)


if __name__ == "__main__":
    main()
