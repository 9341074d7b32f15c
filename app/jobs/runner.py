"""JobRunner: the durable lane. It takes stored jobs oldest first, ``ASR_JOB_CONCURRENCY`` at a time, and runs
each through its model's engine at the lowest priority (``Priority.JOB``, a few windows in the stages at a
time), writing each window as it is final. A job that was running when the server stopped (a drain, a crash,
``kill -9``) is resumed from its last finished window: the engine is given the windows done and transcribes
only the rest, with the same context the uninterrupted run would have had.

A job ends succeeded (its result stored, its audio removed), failed (an error saying why) or cancelled (by
DELETE); each end is offered to the job's webhook (:mod:`app.jobs.webhooks`), which never blocks the lane.
Finished jobs are removed ``ASR_JOB_RETENTION_S`` after they end.

A job whose progress cannot be stored (the disk is full) is not failed, which would throw away what it has
stored, nor taken again at once, which would loop: it stops, keeps its stored windows, and is resumed from
them after a pause that doubles with each such failure in a row (``STORE_RETRY_S``), once space is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from app.formats import service_json
from app.jobs.store import JobRecord, JobStore, StorageFull
from app.jobs.webhooks import JobWebhooks
from workers.engine import (Engine, FileWindow, OptionError, Overloaded, Priority, Segment, StageError, StageStopped, Transcript, WindowOptions,
                            WordTiming)

log = logging.getLogger(__name__)

RETRY_OVERLOADED_S = 2.0  # a job refused for want of room in the stages tries again after this
RETENTION_SWEEP_S = 60.0
STORE_RETRY_S = (5.0, 300.0)  # a job whose progress could not be stored is resumed this long after, doubling up to 5 min


def window_json(window: FileWindow) -> dict:
    return asdict(window)


def window_from_json(data: dict) -> FileWindow:
    segments = [Segment(**{**s, "words": None if s["words"] is None else [WordTiming(**w) for w in s["words"]]}) for s in data["segments"]]
    return FileWindow(data["start_s"], data["end_s"], segments, data["language"], tuple(data["context"]))


def job_summary(job: JobRecord, result: bool = True) -> dict:
    """What GET /v1/jobs/{id} answers; without ``result``, what the list, DELETE and a webhook carry."""
    summary = {"id": job.id, "object": "transcription.job", "status": job.status, "progress": job.progress,
            "model": {"name": job.model, "sha256": job.model_sha256}, "created_at": job.created_at,
            "started_at": job.started_at, "finished_at": job.finished_at, "duration_s": job.duration_s,
            "windows": {"total": job.windows_total, "done": job.windows_done}, "runs": job.runs,
            "webhook": job.webhook, "error": job.error}
    return {**summary, "result": job.result} if result else summary


class JobRunner:
    def __init__(self, store: JobStore, engine_for: Callable[[str], Engine | None], webhooks: JobWebhooks, concurrency: int,
                 lookahead: int, retention_s: float, on_window: Callable[[], None] = lambda: None,
                 on_audio: Callable[[str, float], None] = lambda model, seconds: None, on_store_failure: Callable[[], None] = lambda: None):
        self.store = store
        self.engine_for = engine_for  # a served model's engine; None while it loads, KeyError if it is not served
        self.webhooks = webhooks
        self.concurrency, self.lookahead, self.retention_s = concurrency, lookahead, retention_s
        self.on_window = on_window  # each window stored, each job's audio (model, seconds) once it succeeds, each pause: for the metrics
        self.on_audio = on_audio
        self.on_store_failure = on_store_failure
        self.running: dict[str, asyncio.Task] = {}
        self._cancelled: set[str] = set()  # by DELETE, not by a shutdown
        self._paused: dict[str, tuple[float, int]] = {}  # jobs whose progress could not be stored: resumed at (time.monotonic(), failures in a row)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._schedule(), name="jobs"), asyncio.create_task(self._sweep(), name="job-retention")]

    def submitted(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop taking jobs and cut the running ones short: they stay 'running' in the store and are resumed at
        the next start, from their last finished window."""
        for task in self._tasks:
            task.cancel()
        running = list(self.running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)

    async def cancel(self, job_id: str) -> None:
        """Cancel a running job (DELETE) and wait until its work has stopped."""
        if (task := self.running.get(job_id)) is not None:
            self._cancelled.add(job_id)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _schedule(self) -> None:
        while True:
            while len(self.running) < self.concurrency and (job := await self.store.next_queued(self._not_now())) is not None:
                try:
                    if self.engine_for(job.model) is None:
                        break  # its model is still loading
                except KeyError as exc:
                    with self._pausing_on_storage_full(job.id):
                        await self._end(job, "failed", error={"code": "model_not_served", "message": str(exc.args[0])})
                    continue
                self.running[job.id] = task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
                task.add_done_callback(lambda _, job_id=job.id: (self.running.pop(job_id, None), self._wake.set()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_OVERLOADED_S)

    def _not_now(self) -> set[str]:
        """The jobs not to take now: those running, and those paused after their progress could not be stored."""
        now = time.monotonic()
        return set(self.running) | {job_id for job_id, (until, _) in self._paused.items() if until > now}

    @contextlib.contextmanager
    def _pausing_on_storage_full(self, job_id: str):
        try:
            yield
        except StorageFull as exc:
            failures = self._paused.get(job_id, (0.0, 0))[1] + 1
            pause = min(STORE_RETRY_S[1], STORE_RETRY_S[0] * 2 ** (failures - 1))
            self._paused[job_id] = (time.monotonic() + pause, failures)
            self.on_store_failure()
            log.error("job %s: %s; it keeps what was stored and resumes from there in %g s. Free space under ASR_DATA_DIR", job_id, exc, pause)
        else:
            self._paused.pop(job_id, None)

    async def _run(self, job: JobRecord) -> None:
        with self._pausing_on_storage_full(job.id):
            await self._transcribe(job)

    async def _transcribe(self, job: JobRecord) -> None:
        engine = self.engine_for(job.model)
        try:
            if engine.info().weights_sha256 != job.model_sha256:  # the weights changed under a stored job: start it over on these
                log.warning("job %s: model %s's weights changed since it was submitted; transcribing it again from the start", job.id, job.model)
                await self.store.reset_windows(job.id, engine.info().weights_sha256)
            run = await self.store.start_run(job.id)
            audio = await self.store.read_audio(job.id)
            done = [window_from_json(window) for _, window in await self.store.windows(job.id)]
            options = engine.options(**job.options)
            writes: list[asyncio.Future] = []

            def finished(window: FileWindow) -> None:
                index = len(done) + len(writes)
                write = asyncio.ensure_future(self.store.add_window(job.id, index, run, window_json(window)))
                write.add_done_callback(stored)
                writes.append(write)

            def stored(write: asyncio.Future) -> None:
                if write.cancelled():
                    return
                if write.exception() is None:
                    self.on_window()
                else:
                    transcribing.cancel()  # the windows after it could not be stored either: stop now, resume later

            transcribing = asyncio.ensure_future(self._windows(engine, audio, options, finished, done))
            try:
                transcript = await transcribing
            except asyncio.CancelledError:
                if not asyncio.current_task().cancelling():  # not cancelled itself: a window could not be stored, stopping the rest
                    await asyncio.gather(*writes)  # raises that write's StorageFull
                raise
            await asyncio.gather(*writes)
            await self._end(job, "succeeded", result=service_json(transcript, job.model))
            self.on_audio(job.model, transcript.duration_s)
        except asyncio.CancelledError:
            if job.id in self._cancelled:
                self._cancelled.discard(job.id)
                await self._end(job, "cancelled")
            raise  # else the server is stopping: the job stays running and resumes at the next start
        except StageStopped:
            pass  # the engine stopped first: resumed at the next start
        except (StageError, OptionError, ValueError, OSError) as exc:
            log.warning("job %s failed: %s", job.id, exc)
            code = {StageError: "model_error", OptionError: "invalid_options"}.get(type(exc), "job_error")
            await self._end(job, "failed", error={"code": getattr(exc, "code", code), "message": str(exc)})

    async def _windows(self, engine: Engine, audio: np.ndarray, options: WindowOptions, finished: Callable[[FileWindow], None],
                       done: list[FileWindow]) -> Transcript:
        while True:
            try:
                return await engine.transcribe(audio, options, Priority.JOB, finished, done=done, lookahead=self.lookahead)
            except Overloaded:  # the stages have no room even for its first windows: it waits, it is not refused
                await asyncio.sleep(RETRY_OVERLOADED_S)

    async def _end(self, job: JobRecord, status: str, result: dict | None = None, error: dict | None = None) -> None:
        await self.store.update(job.id, status=status, finished_at=time.time(), result=result, error=error)
        await self.store.drop_audio(job.id)
        ended = await self.store.get(job.id)
        if ended is not None and ended.webhook_url:
            self.webhooks.offer(ended)

    async def _sweep(self) -> None:
        """Remove finished jobs older than the retention, now and then."""
        while True:
            for job_id in await self.store.expired(time.time() - self.retention_s):
                await self.store.delete(job_id)
                log.info("job %s removed after the retention of %g s", job_id, self.retention_s)
            await asyncio.sleep(min(RETENTION_SWEEP_S, max(1.0, self.retention_s / 10)))
