"""Resizable stage pools, the stage profiler and the greedy allocator; /v1/pipeline and its metrics."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from allocator.greedy import AllocatorPolicy, GreedyAllocator
from allocator.profiler import PressureWeights, StageProfiler
from tests.conftest import JFK, Quiet, Server
from workers.engine import EngineSnapshot
from workers.jobs import Job, WindowOptions
from workers.scheduler import BatchPolicy, Priority
from workers.stages import Stage


def two_stages(observer, wait_s: float) -> list[Stage]:
    """A fast CPU stage feeding one whose work is mostly waiting (``wait_s`` per job, off the event loop as
    every stage's work is), so that more workers get more done."""
    def compute(jobs: list[Job]) -> list[float]:
        return [float(np.sum(job.audio)) for job in jobs]

    def wait(jobs: list[Job]) -> list[float]:
        time.sleep(wait_s * random.uniform(0.5, 1.5))
        return compute(jobs)

    first = Stage("features", "cpu", BatchPolicy(1, 0, 10_000), 1, 4, compute, observer)
    second = Stage("post", "cpu", BatchPolicy(1, 0, 10_000), 1, 4, wait, observer)
    first.next, second.upstream = second, [first]
    return [first, second]


class Snapshots:
    """The engine's snapshot() of two bare stages, for the profiler."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages

    def __call__(self) -> EngineSnapshot:
        return EngineSnapshot(tuple(s.snapshot() for s in self.stages), 0, 1.0, 0, 0, 0, 0.0, 0, {})


def new_job() -> Job:
    return Job(audio=np.ones(160, np.float32), offset_s=0.0, priority=Priority.BULK, options=WindowOptions("en", ()))


def test_pools_resize_under_load_and_lose_or_repeat_nothing() -> None:
    finished: Counter[int] = Counter()

    async def main() -> tuple[int, int]:
        stages = two_stages(Quiet(), wait_s=0.004)
        for stage in stages:
            stage.start()
        jobs = [new_job() for _ in range(400)]
        for job in jobs:
            job.future.add_done_callback(lambda f, job=job: finished.update([job.id]))
            await stages[0].put(job)
        sizes = []
        while not all(job.future.done() for job in jobs):  # resize both pools at random while they work
            for stage in stages:
                sizes.append(stage.resize(random.randint(1, 4)))
            await asyncio.sleep(0.01)
        for stage in stages:
            stage.resize(1)
        await asyncio.sleep(0.05)
        workers = [len(stage._held) for stage in stages]
        for stage in stages:
            await stage.stop()
        return len(set(sizes)), max(workers)

    distinct_sizes, workers_left = asyncio.run(main())
    assert distinct_sizes >= 3
    assert len(finished) == 400 and set(finished.values()) == {1}  # every job done, none twice
    assert workers_left == 1  # the workers told to leave have left


def test_allocator_grows_the_waiting_stage_then_gives_back() -> None:
    async def main():
        stages: list[Stage] = []
        profiler = StageProfiler(Snapshots(stages), window_s=1.0, weights=PressureWeights())
        stages += two_stages(profiler, wait_s=0.05)
        by_name = {s.name: s for s in stages}
        allocator = GreedyAllocator(lambda name, workers: by_name[name].resize(workers), profiler, AllocatorPolicy(interval_s=0.2, cooldown_s=0.3, cpu_slots=2,
                                                                      shrink_after_s=0.5), on_decision=lambda d: None)
        for stage in stages:
            stage.start()
        jobs = [new_job() for _ in range(120)]
        for job in jobs:
            await stages[0].put(job)
        loaded = []
        for _ in range(10):
            await asyncio.sleep(0.2)
            profile = allocator.step()
            loaded.append((profile.bottleneck, stages[1].workers))
        await asyncio.gather(*(job.future for job in jobs))
        for _ in range(20):  # idle now: the grown pool must come back to its configured size
            await asyncio.sleep(0.2)
            allocator.step()
        workers_after, budgets = stages[1].workers, allocator.budgets()
        for stage in stages:
            await stage.stop()
        return loaded, workers_after, [(d.stage, d.action) for d in allocator.decisions], budgets

    loaded, workers_after, decisions, budgets = asyncio.run(main())
    assert ("post", 3) in loaded, loaded  # grown to the whole budget of 2 extra workers
    assert decisions[:2] == [("post", "grow"), ("post", "grow")]
    assert ("post", "hold") in decisions  # then it said the budget was spent, once
    assert decisions.count(("post", "shrink")) == 2 and workers_after == 1
    assert budgets["cpu"] == {"total": 2, "used": 0}


def test_pipeline_view_and_allocator_metrics(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v1/transcribe", files={"file": ("jfk.flac", JFK.read_bytes())}).status_code == 200
        view = client.get("/v1/pipeline").json()
        text = client.get("/metrics").text
    assert [s["name"] for s in view["stages"]] == ["features", "acoustic", "decoder", "post"]
    for stage in view["stages"]:
        assert {"workers", "queue_depth", "queue_capacity", "latency_p95_s", "utilization", "pressure",
                "batch_avg", "cost_ms_per_100ms"} <= set(stage)
        assert stage["min_workers"] <= stage["workers"] <= stage["max_workers"]
    acoustic = view["stages"][1]
    assert acoustic["latency_avg_s"] > 0 and acoustic["cost_ms_per_100ms"] > 0
    assert set(view["budgets"]) == {"cpu", "gpu"} and view["allocator"]["enabled"] is True
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"asr_allocator_decisions", "asr_stage_workers", "asr_stage_queue_depth", "asr_stage_latency_seconds",
            "asr_stage_batch_size", "asr_stage_utilization_ratio", "asr_stage_pressure", "asr_streams_active",
            "asr_webhook_deliveries"} <= set(families)
    workers = {s.labels["stage"]: s.value for s in families["asr_stage_workers"].samples}
    assert workers == {s["name"]: s["workers"] for s in view["stages"]}
