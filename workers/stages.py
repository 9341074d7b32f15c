"""The four stages: asyncio worker pools, each fed by a DynamicBatchScheduler, each with its own executor.

A worker takes a batch from its scheduler, runs the blocking compute in the stage's executor (never on
the event loop), and hands each job to the next stage's scheduler, waiting while that queue is full.
A failure fails only the jobs of that batch; the worker carries on. A batch that runs out of GPU memory
is split in two and each half retried, down to single jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol
from concurrent.futures import ThreadPoolExecutor

import torch

from workers.decoding import DecodeRow, GreedyDecoder, token_budget
from workers.jobs import Job
from workers.postprocess import PostProcessor
from workers.runner import ModelRunner
from workers.scheduler import BatchPolicy, DynamicBatchScheduler

log = logging.getLogger(__name__)


class StageObserver(Protocol):
    """What a stage reports; the metrics layer implements it, the stages do not know Prometheus."""

    def batch_done(self, stage: str, size: int, busy_s: float) -> None: ...

    def jobs_done(self, stage: str, jobs: list[Job]) -> None: ...

    def batch_failed(self, stage: str, jobs: list[Job], error: BaseException) -> None: ...


class ObserverGroup:
    """Several observers as one: the metrics and the profiler both watch the stages."""

    def __init__(self, *observers: StageObserver):
        self.observers = list(observers)

    def batch_done(self, stage: str, size: int, busy_s: float) -> None:
        for observer in self.observers:
            observer.batch_done(stage, size, busy_s)

    def jobs_done(self, stage: str, jobs: list[Job]) -> None:
        for observer in self.observers:
            observer.jobs_done(stage, jobs)

    def batch_failed(self, stage: str, jobs: list[Job], error: BaseException) -> None:
        for observer in self.observers:
            observer.batch_failed(stage, jobs, error)


class Stage:
    """A pool of asyncio workers in front of one scheduler. The pool can grow and shrink while work
    flows: a new worker simply starts taking batches; a worker told to leave that is waiting for work
    is cancelled at once (it holds nothing), one that is busy leaves after the batch in its hands."""

    def __init__(self, name: str, policy: BatchPolicy, workers: int, max_workers: int,
                 process: Callable[[list[Job]], None] | None, observer: StageObserver,
                 after: Callable[[Job], Awaitable[None]] | None = None):
        self.name = name
        self.scheduler: DynamicBatchScheduler[Job] = DynamicBatchScheduler(policy)
        self.min_workers, self.max_workers = workers, max(workers, max_workers)
        self.process = process
        self.after = after  # awaited for each job once its batch is done (I/O such as a webhook)
        self.observer = observer
        self.next: Stage | None = None
        self.upstream: list[Stage] = []  # the stages before this one, whose work will arrive here
        self.busy_workers = 0
        # threads start on demand, so room for the largest pool costs nothing until it is used
        self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=f"stage-{name}")
        self._tasks: set[asyncio.Task] = set()
        self._waiting: set[asyncio.Task] = set()  # workers waiting in the scheduler, holding no work
        self._leaving = 0  # busy workers told to leave after their batch

    @property
    def workers(self) -> int:
        return len(self._tasks) - self._leaving

    def start(self) -> None:
        self.resize(self.min_workers)

    def resize(self, workers: int) -> int:
        """Grow or shrink the pool to ``workers`` (kept within min..max); returns the new size."""
        workers = min(max(workers, self.min_workers), self.max_workers)
        while self.workers < workers:
            if self._leaving:
                self._leaving -= 1
            else:
                task = asyncio.create_task(self._work(), name=f"{self.name}-worker")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        while self.workers > workers:
            if self._waiting:
                task = self._waiting.pop()
                self._tasks.discard(task)
                task.cancel()
            else:
                self._leaving += 1
        return workers

    def _should_leave(self) -> bool:
        if self._leaving:
            self._leaving -= 1
            return True
        return False

    async def _wait_for_work(self, take: Callable[[], Awaitable[list[Job]]]) -> list[Job]:
        task = asyncio.current_task()
        self._waiting.add(task)
        try:
            return await take()
        finally:
            self._waiting.discard(task)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def put(self, job: Job) -> None:
        job.mark(self.name, "enqueued")
        await self.scheduler.put(job, job.priority)

    def more_coming(self) -> bool:
        return any(len(stage.scheduler) or stage.busy_workers for stage in self.upstream)

    async def run_blocking(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _work(self) -> None:
        while not self._should_leave():
            batch = await self._wait_for_work(lambda: self.scheduler.next_batch(more_coming=self.more_coming))
            batch = [job for job in batch if not job.abandoned]
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        for job in batch:
            job.mark(self.name, "started")
        started = time.monotonic()
        self.busy_workers += 1
        try:
            await self._compute(batch)
            if self.after is not None:  # part of the stage's work: the profiler must see its time
                for job in batch:
                    await self.after(job)
        except Exception as error:  # noqa: BLE001 - a failed batch fails its jobs, not the worker
            log.exception("stage %s: batch of %d failed", self.name, len(batch))
            self.observer.batch_failed(self.name, batch, error)
            for job in batch:
                job.fail(StageError(self.name, error))
            return
        finally:
            self.busy_workers -= 1
        self.observer.batch_done(self.name, len(batch), time.monotonic() - started)
        await self._hand_on(batch)

    async def _compute(self, batch: list[Job]) -> None:
        try:
            await self.run_blocking(self.process, batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            free_cached_memory()
            half = len(batch) // 2
            log.warning("stage %s: out of memory on a batch of %d; retrying as %d + %d", self.name, len(batch), half,
                        len(batch) - half)
            await self._compute(batch[:half])
            await self._compute(batch[half:])

    async def _hand_on(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.mark(self.name, "finished")
        self.observer.jobs_done(self.name, jobs)
        for job in jobs:
            if self.next is None:
                job.finish(job.result)
            else:
                await self.next.put(job)


def free_cached_memory() -> None:
    """After an out-of-memory error: hand the allocator's cached blocks back before the retry."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StageError(RuntimeError):
    """Model work on a batch failed; the request's audio was fine as far as the service can tell."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"the {stage} stage failed on this request's batch: {type(cause).__name__}")
        self.stage = stage


class DecoderStage(Stage):
    """The decoder runs iteration-level batching: between two tokens its running batch takes in the
    rows waiting in the queue and hands on the rows that finished, so nobody waits for the longest row.

    An idle decoder starts a new batch only once the encoder has nothing more for it, or the batch is
    full, or ``max_wait_ms`` has passed. On the CPU a step costs 11 ms for one row and 25 ms for eight
    (tiny.en, 2 cores), and steps taken for one row at a time slow the encoder they share the cores with.
    """

    def __init__(self, policy: BatchPolicy, workers: int, max_workers: int, runner: ModelRunner, observer: StageObserver):
        super().__init__("decoder", policy, workers, max_workers, None, observer)
        self.runner = runner

    async def _work(self) -> None:
        decoder = self.runner.new_decoder()
        full = capacity = self.scheduler.policy.max_batch_size
        while True:
            if decoder.running:
                joining = self.scheduler.take_ready(capacity - decoder.running)
            elif self._should_leave():  # only with an empty batch: its rows are finished first
                return
            else:
                joining = await self._wait_for_work(lambda: self.scheduler.next_batch(capacity, self.more_coming))
            joining = [job for job in joining if not job.abandoned]
            for job in joining:
                job.mark(self.name, "started")
            started, size = time.monotonic(), decoder.running + len(joining)
            self.busy_workers += 1
            try:
                finished = await self.run_blocking(self._advance, decoder, joining)
            except Exception as error:  # noqa: BLE001 - fail (or retry) the running batch, start a fresh one
                rows = list(dict.fromkeys(joining + [row.owner for row in decoder.rows]))
                decoder = self.runner.new_decoder()
                if isinstance(error, torch.OutOfMemoryError) and size > 1:
                    # the cache of the whole batch is gone: its rows start again, at most half as many at a time
                    capacity = max(1, size // 2)
                    free_cached_memory()
                    log.warning("stage decoder: out of memory with %d rows; restarting them %d at a time", size, capacity)
                    for job in reversed(rows):
                        job.mark(self.name, "enqueued")
                        self.scheduler.requeue(job, job.priority)
                    continue
                log.exception("stage decoder: running batch of %d failed", len(rows))
                self.observer.batch_failed(self.name, rows, error)
                for job in rows:
                    job.fail(StageError(self.name, error))
                continue
            finally:
                self.busy_workers -= 1
            self.observer.batch_done(self.name, size, time.monotonic() - started)
            if not decoder.running:
                capacity = full  # the smaller batch after running out of memory lasts until its rows are done
            if finished:
                await self._hand_on(finished)

    def _advance(self, decoder: GreedyDecoder, joining: list[Job]) -> list[Job]:
        """One iteration: take in the joining rows, then sample one token for every row."""
        finished = []
        if joining:
            rows = [DecodeRow(prompt=decoder.build_prompt(job.prompt_tokens, job.language), owner=job,
                              max_tokens=token_budget(job.duration_s)) for job in joining]
            finished += decoder.add(rows, torch.stack([job.encoded for job in joining]))
        finished += decoder.step()
        for row in finished:
            row.owner.decoded = row
        return [row.owner for row in finished]


def build_stages(runner: ModelRunner, post: PostProcessor, settings, observer: StageObserver,
                 deliver: Callable[[Job], Awaitable[None]] | None = None) -> list[Stage]:
    """features -> acoustic -> decoder -> post, with each stage's batching policy and pool bounds from
    the settings; ``deliver`` (e.g. a webhook) is awaited for each window once it is post-processed."""
    on_gpu = runner.device.type == "cuda"
    # on the CPU one encoder or decoder batch already keeps every core busy: a second worker only competes
    model_max = settings.model_max_workers or (4 if on_gpu else 1)
    capacity = settings.queue_capacity
    acoustic_batch = settings.acoustic_max_batch_size or (16 if on_gpu else 1)
    decoder_batch = settings.decoder_max_batch_size or (64 if on_gpu else 16)

    def features(jobs: list[Job]) -> None:
        for job in jobs:
            job.mel = runner.features(job.audio)

    def acoustic(jobs: list[Job]) -> None:
        encoded = runner.encode([job.mel for job in jobs])
        for job, row in zip(jobs, encoded):
            job.encoded, job.mel = row, None

    def postprocess(jobs: list[Job]) -> None:
        for job in jobs:
            job.result = post.window_result(job.decoded, job.duration_s, job.offset_s)
            job.encoded = None

    def policy(batch: int, wait_ms: float) -> BatchPolicy:
        return BatchPolicy(batch, wait_ms, max(capacity, batch), settings.bulk_share)

    stages = [
        Stage("features", policy(1, 0.0), settings.features_workers, settings.cpu_stage_max_workers, features, observer),
        Stage("acoustic", policy(acoustic_batch, settings.acoustic_max_wait_ms), settings.acoustic_workers, model_max,
              acoustic, observer),
        DecoderStage(policy(decoder_batch, settings.decoder_max_wait_ms), settings.decoder_workers, model_max, runner, observer),
        Stage("post", policy(1, 0.0), settings.post_workers, settings.cpu_stage_max_workers, postprocess, observer,
              after=deliver),
    ]
    for i, stage in enumerate(stages):
        stage.upstream = stages[:i]
        stage.next = stages[i + 1] if i + 1 < len(stages) else None
    return stages
