"""The four stages: asyncio worker pools, each fed by a DynamicBatchScheduler, each with its own executor.

A worker takes a batch from its scheduler, runs the blocking compute in the stage's executor (never on
the event loop), and hands each job to the next stage's scheduler, waiting while that queue is full.

Every worker is supervised: whatever it raises, anywhere, fails exactly the jobs it held at that moment
(never a job it already handed on), is counted, and the worker starts again. A failure inside a batch's
compute fails only that batch. A batch that runs out of GPU memory is split in two and each half retried
once the failed attempt's memory is freed, down to single jobs; a single job that still does not fit fails
alone. Stopping a stage answers every job still queued or in a worker's hands.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from workers.decoding import BatchDecoder, DecodeRow, audio_frames, token_budget
from workers.jobs import Job, WindowOptions
from workers.scheduler import BatchPolicy, DynamicBatchScheduler, LiveWindows, Packer, Priority

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.05, 5.0)  # a worker that keeps failing is restarted ever more slowly, up to 5 s apart
HEALTHY_AFTER_S = 10.0  # a worker that ran this long before it failed starts again at once
IDLE_RELEASE_S = 5.0  # a decoder idle this long gives back the memory of its cache


class StageObserver(Protocol):
    """What a stage reports, as plain numbers; the metrics and the profiler implement it."""

    def batch_done(self, stage: str, size: int, busy_s: float) -> None: ...

    def window_done(self, stage: str, waited_s: float, worked_s: float, audio_s: float) -> None: ...

    def windows_failed(self, stage: str, count: int) -> None: ...

    def windows_abandoned(self, stage: str, count: int) -> None: ...

    def worker_restarted(self, stage: str) -> None: ...


class ObserverGroup:
    """Several observers as one: the metrics and the profiler both watch the stages."""

    def __init__(self, *observers: StageObserver):
        self.observers = list(observers)

    def batch_done(self, stage: str, size: int, busy_s: float) -> None:
        for observer in self.observers:
            observer.batch_done(stage, size, busy_s)

    def window_done(self, stage: str, waited_s: float, worked_s: float, audio_s: float) -> None:
        for observer in self.observers:
            observer.window_done(stage, waited_s, worked_s, audio_s)

    def windows_failed(self, stage: str, count: int) -> None:
        for observer in self.observers:
            observer.windows_failed(stage, count)

    def windows_abandoned(self, stage: str, count: int) -> None:
        for observer in self.observers:
            observer.windows_abandoned(stage, count)

    def worker_restarted(self, stage: str) -> None:
        for observer in self.observers:
            observer.worker_restarted(stage)


class StageError(RuntimeError):
    """Model work on a batch failed; the request's audio was fine as far as the service can tell."""

    def __init__(self, stage: str, cause: str):
        super().__init__(f"the {stage} stage failed on this request's batch: {cause}")
        self.stage = stage


class StageStopped(RuntimeError):
    """The engine stopped before this window was done."""

    def __init__(self, stage: str):
        super().__init__(f"the {stage} stage stopped before this window was done")
        self.stage = stage


@dataclass(frozen=True)
class StageSnapshot:
    name: str
    device: str  # cpu | gpu: whose budget the allocator spends on it
    workers: int
    min_workers: int
    max_workers: int
    busy_workers: int
    queue_depth: int
    queue_capacity: int
    queue_oldest_s: float
    restarts: int  # workers restarted after a failure outside a batch's compute


def free_memory() -> None:
    """After an out-of-memory error, before the retry: the failed attempt's tensors (its traceback's frames)
    are collected and the allocator's cached blocks handed back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Stage:
    """A pool of supervised asyncio workers in front of one scheduler. The pool can grow and shrink while
    work flows: a new worker simply starts taking batches; a worker told to leave that is waiting for work
    is cancelled at once (it holds nothing), one that is busy leaves after the batch in its hands."""

    def __init__(self, name: str, device: str, policy: BatchPolicy, workers: int, max_workers: int,
                 process: Callable[[list[Job]], list[Any]] | None, observer: StageObserver, packer: Packer[Job] | None = None,
                 live: LiveWindows | None = None):
        self.name = name
        self.device = device
        self.scheduler: DynamicBatchScheduler[Job] = DynamicBatchScheduler(policy, packer, live)
        self.min_workers, self.max_workers = workers, max(workers, max_workers)
        self.process = process  # a batch's jobs -> their new data, one each, in the stage's executor
        self.observer = observer
        self.next: Stage | None = None
        self.upstream: list[Stage] = []  # the stages before this one, whose work will arrive here
        self.busy_workers = 0
        self.restarts = 0
        # threads start on demand, so room for the largest pool costs nothing until it is used
        self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=f"stage-{name}")
        self._held: dict[asyncio.Task, list[Job]] = {}  # per worker: the jobs it must answer if it fails
        self._waiting: set[asyncio.Task] = set()  # workers waiting in the scheduler, holding no work
        self._leaving = 0  # busy workers told to leave after their batch
        self._stopping = False

    @property
    def workers(self) -> int:
        return len(self._held) - self._leaving

    def snapshot(self) -> StageSnapshot:
        return StageSnapshot(self.name, self.device, self.workers, self.min_workers, self.max_workers, self.busy_workers,
                             len(self.scheduler), self.scheduler.policy.capacity, round(self.scheduler.oldest_wait_s(), 3),
                             self.restarts)

    def start(self) -> None:
        self.resize(self.min_workers)

    def resize(self, workers: int) -> int:
        """Grow or shrink the pool to ``workers`` (kept within min..max); returns the new size."""
        workers = min(max(workers, self.min_workers), self.max_workers)
        while self.workers < workers:
            if self._leaving:
                self._leaving -= 1
            else:
                task = asyncio.create_task(self._supervise(), name=f"{self.name}-worker")
                self._held[task] = []
        while self.workers > workers:
            if self._waiting:
                task = self._waiting.pop()
                self._held.pop(task, None)
                task.cancel()
            else:
                self._leaving += 1
        return workers

    def _should_leave(self) -> bool:
        if self._leaving:
            self._leaving -= 1
            return True
        return False

    async def _supervise(self) -> None:
        task = asyncio.current_task()
        failures = 0
        try:
            while True:
                held = self._held.setdefault(task, [])
                began = time.monotonic()
                try:
                    await self._work(held)
                    return  # told to leave
                except asyncio.CancelledError:
                    self._fail(held, StageStopped(self.name))
                    raise
                except Exception as error:  # noqa: BLE001 - supervision: answer what it held, start again
                    log.exception("stage %s: a worker failed holding %d windows; restarting it", self.name, len(held))
                    self._fail(held, StageError(self.name, type(error).__name__))
                    held.clear()
                self.restarts += 1
                self.observer.worker_restarted(self.name)
                failures = 1 if time.monotonic() - began >= HEALTHY_AFTER_S else failures + 1
                await asyncio.sleep(min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2 ** (failures - 1)))
        finally:
            self._held.pop(task, None)

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        pending = [job for job in jobs if not job.abandoned]
        if pending:
            self.observer.windows_failed(self.name, len(pending))
        for job in pending:
            job.fail(error)

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose caller still waits; the others are counted and dropped."""
        live = [job for job in jobs if not job.abandoned]
        if len(live) < len(jobs):
            self.observer.windows_abandoned(self.name, len(jobs) - len(live))
        return live

    async def _wait_for_work(self, take: Callable[[], Awaitable[list[Job]]]) -> list[Job]:
        task = asyncio.current_task()
        self._waiting.add(task)
        try:
            return await take()
        finally:
            self._waiting.discard(task)

    async def stop(self) -> None:
        """Answer what is queued, cancel the workers (each answers what it holds), release the threads."""
        self._stopping = True
        self._fail(self.scheduler.take_all(), StageStopped(self.name))
        tasks = list(self._held)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail(self.scheduler.take_all(), StageStopped(self.name))  # handed on by the stage before meanwhile
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)

    async def put(self, job: Job) -> None:
        if self._stopping:
            job.fail(StageStopped(self.name))
            return
        job.mark(self.name, "enqueued")
        if job.resumed:
            self.scheduler.requeue(job, job.priority)
        else:
            await self.scheduler.put(job, job.priority)

    def more_coming(self) -> bool:
        return any(len(stage.scheduler) or stage.busy_workers for stage in self.upstream)

    async def run_blocking(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _work(self, held: list[Job]) -> None:
        while not self._should_leave():
            batch = await self._wait_for_work(lambda: self.scheduler.next_batch(more_coming=self.more_coming))
            held[:] = self._live(batch)
            if held:
                await self._run(held)
            held.clear()

    async def _run(self, batch: list[Job]) -> None:
        for job in batch:
            job.mark(self.name, "started")
        started = time.monotonic()
        self.busy_workers += 1
        try:
            done = await self._compute(batch)
        finally:
            self.busy_workers -= 1
            self._upstream_changed()
        self.observer.batch_done(self.name, len(batch), time.monotonic() - started)
        batch[:] = done  # what the worker still holds: the failed jobs are answered
        await self._hand_on(batch, done)

    async def _compute(self, batch: list[Job]) -> list[Job]:
        """Run the batch; returns the jobs that succeeded, having failed the others."""
        done, parts = [], [batch]
        while parts:
            part = parts.pop(0)
            try:
                outputs = await self.run_blocking(self.process, part)
            except torch.OutOfMemoryError:
                failure = None  # nothing of the error is kept: its traceback holds the attempt's tensors
            except Exception as error:  # noqa: BLE001 - a failed batch fails its jobs, not the worker
                log.exception("stage %s: batch of %d failed", self.name, len(part))
                failure = type(error).__name__
            else:
                for job, output in zip(part, outputs):
                    job.data = output
                done += part
                continue
            if failure is None:
                free_memory()
                if len(part) > 1:
                    half = len(part) // 2
                    log.warning("stage %s: out of memory on a batch of %d; retrying as %d + %d", self.name, len(part), half, len(part) - half)
                    parts[:0] = [part[:half], part[half:]]
                    continue
                failure = "OutOfMemoryError"
            self._fail(part, StageError(self.name, failure))
        return done

    def _upstream_changed(self) -> None:
        """A batch of this stage ended: a later stage waiting for it to fill may now know nothing more comes."""
        stage = self.next
        while stage is not None:
            stage.scheduler.changed.notify()
            stage = stage.next

    async def _hand_on(self, held: list[Job], done: list[Job]) -> None:
        """Pass each of ``done`` on, and drop it from ``held`` (all the worker must answer for) as it goes: a
        handed-on job is the next stage's to answer."""
        done = list(done)
        for job in done:
            job.mark(self.name, "finished")
            times = job.times[self.name]
            self.observer.window_done(self.name, times.started - times.enqueued, times.finished - times.started, job.duration_s)
        for job in done:
            if self.next is None:
                job.finish(job.data)
            else:
                await self.next.put(job)
            held.remove(job)


@dataclass
class _Lane:
    """One running batch of a decoder worker. Live work (finals, interim steps, REST files) and job windows
    each have their own, so a job row never makes a final's step slower: job rows step only while no live
    row runs or waits and no stream's window is anywhere in the stages (or for their share against REST rows)."""

    decoder: BatchDecoder
    capacity: int  # rows it may hold: the stage's batch size, or fewer after running out of memory


class DecoderStage(Stage):
    """The decoder runs iteration-level batching: between two tokens its running batch takes in the
    rows waiting in the queue, hands on the rows that finished and drops the rows whose caller has gone
    (TGI's filter-batch), so nobody waits for the longest row and abandoned work stops within a token.

    An idle decoder starts a new batch only once the encoder has nothing more for it, or the batch is
    full, or ``max_wait_ms`` has passed. On the CPU a step costs 11 ms for one row and 25 ms for eight
    (tiny.en, 2 cores), and steps taken for one row at a time slow the encoder they share the cores with.
    A worker told to leave under load takes no new rows and leaves once its running rows are finished.

    Each worker keeps two running batches (:class:`_Lane`): one for live work and REST files, one for job
    windows. A step is taken for one of them: the job batch's only while no live row runs or waits and no
    stream's window is in an earlier stage (or, beside REST rows alone, for its ASR_JOB_SHARE of the steps), so
    durable jobs never make a stream's step slower.
    """

    def __init__(self, device: str, policy: BatchPolicy, workers: int, max_workers: int,
                 new_decoder: Callable[[], BatchDecoder], observer: StageObserver, decoded: Callable[[DecodeRow], None] = lambda row: None,
                 live: LiveWindows | None = None):
        super().__init__("decoder", device, policy, workers, max_workers, None, observer, live=live)
        self.new_decoder = new_decoder
        self.decoded = decoded  # told of each window decoded (its search and fallbacks are counted)
        self._parked: set[Job] = set()  # encoded windows whose prompt waits for the text of the window before

    async def put(self, job: Job) -> None:
        """A held job (see :meth:`release`) is parked, encoded, outside the queue: the encoder runs ahead of
        the decoder, which waits only for the previous window's text."""
        if job.held and not self._stopping:
            self._parked.add(job)
            job.future.add_done_callback(lambda _: self._parked.discard(job))  # answered or abandoned meanwhile
            return
        await super().put(job)

    async def release(self, job: Job, options: WindowOptions) -> None:
        """``job``'s prompt is known (``options``): queue it if it is parked, else it is queued when it arrives."""
        job.options, job.held = options, False
        if job in self._parked:
            self._parked.discard(job)
            await super().put(job)

    async def stop(self) -> None:
        self._fail(list(self._parked), StageStopped(self.name))
        await super().stop()

    async def _work(self, held: list[Job]) -> None:
        full = self.scheduler.policy.max_batch_size
        live, jobs = _Lane(self.new_decoder(), full), _Lane(self.new_decoder(), full)
        credit = 0.0  # the job lane's: earned by each step of REST rows alone while job rows wait (ASR_JOB_SHARE)
        leaving = False
        while True:
            leaving = leaving or self._should_leave()
            if leaving and not (live.decoder.running or jobs.decoder.running):
                return
            if live.decoder.running or jobs.decoder.running or leaving:
                lane, credit = self._turn(live, jobs, credit)
                if lane is None:  # job rows alone, and a live window on its way in another stage: they wait for it
                    await self.scheduler.changed.wait()
                    continue
                joining = [] if leaving else self._joining(lane, lane is jobs)
            else:
                batch = await self._wait_for_work(lambda: self._next_batch((live, jobs), full))
                urgent = [job for job in batch if job.priority is not Priority.JOB]
                for job in reversed(batch if urgent else []):
                    if job.priority is Priority.JOB:
                        self.scheduler.requeue(job, job.priority)  # job windows wait for their own batch
                lane, joining = (live, urgent) if urgent else (jobs, batch)
            gone = [row for row in lane.decoder.rows if row.owner.abandoned]
            if gone:
                self.observer.windows_abandoned(self.name, len(gone))
            joining = self._live(joining)
            other = jobs if lane is live else live
            mine = [row.owner for row in lane.decoder.rows if not row.owner.abandoned] + joining
            held[:] = mine + [row.owner for row in other.decoder.rows]
            for job in joining:
                job.mark(self.name, "started")
            started, size = time.monotonic(), lane.decoder.running - len(gone) + len(joining)
            self.busy_workers += 1
            failure: str | None = None
            try:
                finished = await self.run_blocking(self._advance, lane.decoder, joining, gone)
            except torch.OutOfMemoryError:
                failure = "OutOfMemoryError"  # nothing of the error is kept: its traceback holds the batch's tensors
            except Exception as error:  # noqa: BLE001 - fail the running batch, start a fresh one
                log.exception("stage decoder: running batch of %d failed", size)
                failure = type(error).__name__
            finally:
                self.busy_workers -= 1
                self._upstream_changed()
            if failure is not None:
                lane.decoder = None  # its cache goes before a new one is made
                if failure == "OutOfMemoryError" and size > 1:
                    # the cache of the whole batch is gone: its rows start again, at most half as many at a time
                    free_memory()
                    lane.capacity = max(1, size // 2)
                    log.warning("stage decoder: out of memory with %d rows; restarting them %d at a time", size, lane.capacity)
                    for job in reversed(mine):
                        job.mark(self.name, "enqueued")
                        self.scheduler.requeue(job, job.priority)
                else:
                    self._fail(mine, StageError(self.name, failure))
                held[:] = [row.owner for row in other.decoder.rows]
                lane.decoder = self.new_decoder()
                continue
            self.observer.batch_done(self.name, size, time.monotonic() - started)
            if not lane.decoder.running:
                lane.capacity = full  # the smaller batch after running out of memory lasts until its rows are done
            for job in finished:
                self.decoded(job.data)
            if finished:  # the worker answers for its running rows too until they are handed on
                held[:] = [row.owner for row in (*live.decoder.rows, *jobs.decoder.rows)] + finished
                await self._hand_on(held, finished)

    def _turn(self, live: _Lane, jobs: _Lane, credit: float) -> tuple[_Lane | None, float]:
        """Which running batch takes the next step: live work's whenever it has rows or some waits, but while
        its rows and what waits are REST work alone, job rows take ASR_JOB_SHARE of the steps. Job rows never
        step while a final or an interim step is anywhere in the stages: None, nothing steps."""
        waiting = {p for p in (Priority.FINAL, Priority.REALTIME, Priority.BULK) if self.scheduler.depth(p)}
        if not (live.decoder.running or waiting):
            return (None if self.scheduler.jobs_held() else jobs), credit
        if not jobs.decoder.running or waiting - {Priority.BULK} or any(row.owner.priority is not Priority.BULK for row in live.decoder.rows):
            return live, credit
        credit = min(1.0, credit + self.scheduler.policy.job_share)
        return (jobs, credit - 1.0) if credit >= 1.0 else (live, credit)

    def _joining(self, lane: _Lane, jobs: bool) -> list[Job]:
        """The rows that join ``lane``'s running batch before its step: job windows only in the job lane; in the
        live one, no row less urgent than the running ones (no interim step beside a final, no bulk row beside a
        stream's): each one would make every step of theirs slower."""
        room = lane.capacity - lane.decoder.running
        if jobs:
            return self.scheduler.take_lane(room, Priority.JOB)
        lowest = min((row.owner.priority for row in lane.decoder.rows), default=Priority.BULK)
        return self.scheduler.take_ready(room, lowest)

    async def _next_batch(self, lanes: tuple[_Lane, ...], capacity: int) -> list[Job]:
        """The next rows; a decoder idle for IDLE_RELEASE_S first gives back the cache a large batch grew
        (at once would cost a regrowth, hundreds of MB copied, between every two batches of a busy server)."""
        try:
            return await asyncio.wait_for(self.scheduler.next_batch(capacity, self.more_coming), IDLE_RELEASE_S)
        except TimeoutError:  # nothing was taken: next_batch takes its items only once it returns
            for lane in lanes:
                lane.decoder.release_memory()
            return await self.scheduler.next_batch(capacity, self.more_coming)

    @staticmethod
    def _advance(decoder: BatchDecoder, joining: list[Job], gone: list[DecodeRow]) -> list[Job]:
        """One iteration: drop the abandoned rows, take in the joining ones, then sample one token for every row."""
        decoder.remove(gone)
        finished = []
        if joining:
            rows = [DecodeRow(prompt=list(job.options.prompt), owner=job, max_tokens=token_budget(job.duration_s),
                              last_timestamp=job.data.last_timestamp, forced=job.options.forced, search=job.options.search,
                              task=job.options.task, word_timestamps=job.options.word_timestamps, frames=min(job.data.last_timestamp, audio_frames(job.duration_s)))
                    for job in joining]
            finished += decoder.add(rows, torch.stack([job.data.audio_features for job in joining]))
        finished += decoder.step()
        for row in finished:
            row.owner.data = row
        return [row.owner for row in finished]
