"""GreedyAllocator: every ``interval_s``, one more worker for the bottleneck; workers back from idle stages.

Growth is bounded three ways: each stage's maximum, a budget shared by the stages of one device (CPU
worker slots, GPU in-flight batch slots: workers added on top of the configured pools), and a cooldown
per stage, which with the shrink delay keeps the pools from oscillating. Each decision is one
structured log line, a metric, and an entry in the recent list that ``/v1/pipeline`` shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from allocator.profiler import Profile, StageProfiler, StageStats

log = logging.getLogger(__name__)

ACTIONS = ("grow", "shrink", "hold")  # a Decision's action; hold: the bottleneck could not be given more


@dataclass(frozen=True)
class AllocatorPolicy:
    interval_s: float = 2.0
    cooldown_s: float = 6.0
    cpu_slots: int = 2
    gpu_slots: int = 4
    idle_utilization: float = 0.2
    shrink_after_s: float = 10.0


@dataclass(frozen=True)
class Decision:
    at: float  # unix time
    stage: str
    action: str  # one of ACTIONS
    workers_before: int
    workers_after: int
    pressure: float
    reason: str


class GreedyAllocator:
    def __init__(self, resize: Callable[[str, int], int], profiler: StageProfiler, policy: AllocatorPolicy,
                 on_decision: Callable[[Decision], None], enabled: bool = True):
        self.resize = resize  # (stage, workers) -> the pool's new size
        self.profiler = profiler
        self.policy = policy
        self.on_decision = on_decision
        self.enabled = enabled
        self.decisions: deque[Decision] = deque(maxlen=50)
        self._changed_at: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self._held: dict[str, str] = {}  # the reason each stage was last held for, said once

    def budgets(self) -> dict[str, dict[str, int]]:
        """Per device: slots the allocator may hand out, and how many its grown pools hold now."""
        total = {"cpu": self.policy.cpu_slots, "gpu": self.policy.gpu_slots}
        used = {"cpu": 0, "gpu": 0}
        for stage in self.profiler.snapshot().stages:
            used[stage.device] += stage.workers - stage.min_workers
        return {device: {"total": total[device], "used": used[device]} for device in total}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            if self.enabled:
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a bad tick must not end the loop
                    log.exception("allocator step failed")

    def step(self, now: float | None = None) -> Profile:
        now = time.monotonic() if now is None else now
        profile = self.profiler.profile()
        stats = {s.name: s for s in profile.stages}
        if profile.bottleneck is not None:
            self._grow(stats[profile.bottleneck], now)
        for name, s in stats.items():
            idle = s.utilization < self.policy.idle_utilization and s.queue_depth == 0 and name != profile.bottleneck
            if s.workers <= s.min_workers or not idle:
                self._idle_since.pop(name, None)
                continue
            since = self._idle_since.setdefault(name, now)
            if now - since >= self.policy.shrink_after_s and not self._cooling(name, now):
                self._resize(s, s.workers - 1, "shrink", now, f"idle for {now - since:.0f} s (utilization {s.utilization:.2f}, empty queue)")
                self._idle_since[name] = now
        return profile

    def _cooling(self, name: str, now: float) -> bool:
        return now - self._changed_at.get(name, -float("inf")) < self.policy.cooldown_s

    def _grow(self, stage: StageStats, now: float) -> None:
        if self._cooling(stage.name, now):
            return
        budget = self.budgets()[stage.device]
        if stage.workers >= stage.max_workers:
            self._hold(stage, f"bottleneck at its maximum of {stage.max_workers} workers")
        elif budget["used"] >= budget["total"]:
            self._hold(stage, f"bottleneck, but the {stage.device} budget of {budget['total']} slots is spent")
        else:
            self._resize(stage, stage.workers + 1, "grow", now, "bottleneck")

    def _hold(self, stage: StageStats, reason: str) -> None:
        if self._held.get(stage.name) != reason:  # say it once per stage, not every tick
            self._held[stage.name] = reason
            self._record(Decision(time.time(), stage.name, "hold", stage.workers, stage.workers, stage.pressure, reason))

    def _resize(self, stage: StageStats, workers: int, action: str, now: float, reason: str) -> None:
        after = self.resize(stage.name, workers)
        self._changed_at[stage.name] = now
        self._held.pop(stage.name, None)
        self._record(Decision(time.time(), stage.name, action, stage.workers, after, stage.pressure, reason))

    def _record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        log.info("allocator %s", json.dumps(asdict(decision)))
        self.on_decision(decision)
