"""StageProfiler: per stage, over a rolling window, how slow, how busy and how backed up it is.

It is fed by the stages themselves (it is one of the engine's stage observers): each batch's busy time
and size, each window's time in the stage and its audio length; the pools and queues it reads from the
engine's snapshot. Records older than the window are dropped as new ones come, so its memory is bounded
by the load of one window whether or not anybody asks for a profile. From those it scores each stage's
pressure = w_latency * latency / slowest stage's latency + w_utilization * utilization
+ w_queue * queue depth / deepest queue, and names the bottleneck: the stage of highest pressure, when
that pressure passes the threshold.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from workers.engine import EngineSnapshot, StageSnapshot


@dataclass(frozen=True)
class PressureWeights:
    latency: float = 0.4
    utilization: float = 0.3
    queue: float = 0.3
    threshold: float = 0.6


@dataclass(frozen=True)
class StageStats(StageSnapshot):
    """A stage as the engine's snapshot shows it, and its load over the profiler's window."""

    latency_avg_s: float  # a job's time in the stage's work, over the window
    latency_p95_s: float
    latency_p99_s: float
    utilization: float  # busy time / wall time / workers
    throughput_per_s: float  # jobs finished per second
    batch_avg: float
    batch_max: int
    cost_ms_per_100ms: float  # busy ms per 100 ms of audio: what the offline planner needs
    pressure: float = 0.0


@dataclass(frozen=True)
class Profile:
    window_s: float
    stages: list[StageStats]
    bottleneck: str | None

    def to_json(self) -> dict:
        return {"window_s": self.window_s, "bottleneck": self.bottleneck, "stages": [asdict(s) for s in self.stages]}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1)]


class StageProfiler:
    def __init__(self, snapshot: Callable[[], EngineSnapshot], window_s: float, weights: PressureWeights):
        self.snapshot = snapshot
        self.window_s = window_s
        self.weights = weights
        self.started = time.monotonic()
        # per stage: (time, busy seconds, batch size) per batch, and (time, seconds in stage, audio seconds) per window
        self._batches: defaultdict[str, deque[tuple[float, float, int]]] = defaultdict(deque)
        self._windows: defaultdict[str, deque[tuple[float, float, float]]] = defaultdict(deque)

    # the engine's stage observer: the stages call these
    def batch_done(self, stage: str, size: int, busy_s: float) -> None:
        now = time.monotonic()
        self._record(self._batches[stage], (now, busy_s, size), now)

    def window_done(self, stage: str, waited_s: float, worked_s: float, audio_s: float) -> None:
        now = time.monotonic()
        self._record(self._windows[stage], (now, worked_s, audio_s), now)

    def windows_failed(self, stage: str, count: int) -> None:
        pass  # failures, abandoned work and restarts are the metrics' business; the profile is about load

    def windows_abandoned(self, stage: str, count: int) -> None:
        pass

    def worker_restarted(self, stage: str) -> None:
        pass

    def _record(self, records: deque, record: tuple, now: float) -> None:
        records.append(record)
        horizon = now - self.window_s
        while records[0][0] < horizon:
            records.popleft()

    def profile(self) -> Profile:
        now = time.monotonic()
        horizon = now - self.window_s
        for records in (*self._batches.values(), *self._windows.values()):
            while records and records[0][0] < horizon:
                records.popleft()
        wall = max(min(self.window_s, now - self.started), 1e-6)
        raw = []
        for stage in self.snapshot().stages:
            batches, windows = self._batches[stage.name], self._windows[stage.name]
            latencies = sorted(seconds for _, seconds, _ in windows)
            busy = sum(b for _, b, _ in batches)
            audio = sum(a for _, _, a in windows)
            raw.append(StageStats(
                **asdict(stage),
                latency_avg_s=sum(latencies) / len(latencies) if latencies else 0.0,
                latency_p95_s=_percentile(latencies, 95), latency_p99_s=_percentile(latencies, 99),
                utilization=min(1.0, busy / (wall * max(stage.workers, 1))),
                throughput_per_s=len(windows) / wall,
                batch_avg=sum(size for _, _, size in batches) / len(batches) if batches else 0.0,
                batch_max=max((size for _, _, size in batches), default=0),
                cost_ms_per_100ms=100 * busy / audio if audio else 0.0,
            ))
        slowest = max((s.latency_avg_s for s in raw), default=0.0)
        deepest = max((s.queue_depth for s in raw), default=0)
        w = self.weights
        stats = [StageStats(**{**asdict(s), "pressure": round(
            w.latency * (s.latency_avg_s / slowest if slowest else 0.0)
            + w.utilization * s.utilization
            + w.queue * (s.queue_depth / deepest if deepest else 0.0), 3)}) for s in raw]
        top = max(stats, key=lambda s: s.pressure, default=None)
        bottleneck = top.name if top is not None and top.pressure >= w.threshold else None
        return Profile(window_s=round(wall, 3), stages=stats, bottleneck=bottleneck)
