"""JobRunner: the durable lane. It takes stored jobs oldest first, ``ASR_JOB_CONCURRENCY`` at a time, and runs
each through its model's engine at the lowest priority (``Priority.JOB``, a few windows in the stages at a
time), writing each window as it is final. A job that was running when the server stopped (a drain, a crash,
``kill -9``) is resumed from its last finished window: the engine is given the windows done and transcribes
only the rest, with the same context the uninterrupted run would have had.

A job ends succeeded (its result stored, its audio removed), failed (an error saying why) or cancelled (by
DELETE); each end is offered to the job's webhook (:mod:`app.jobs.webhooks`), which never blocks the lane.
Finished jobs are removed ``ASR_JOB_RETENTION_S`` after they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict

from app.formats import service_json
from app.jobs.store import JobRecord, JobStore
from app.jobs.webhooks import JobWebhooks
from workers.engine import Engine, FileWindow, OptionError, Overloaded, Priority, Segment, StageError, StageStopped, WordTiming

log = logging.getLogger(__name__)

RETRY_OVERLOADED_S = 2.0  # a job refused for want of room in the stages tries again after this
RETENTION_SWEEP_S = 60.0


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
                 on_audio: Callable[[str, float], None] = lambda model, seconds: None):
        self.store = store
        self.engine_for = engine_for  # a served model's engine; None while it loads, KeyError if it is not served
        self.webhooks = webhooks
        self.concurrency, self.lookahead, self.retention_s = concurrency, lookahead, retention_s
        self.on_window = on_window  # each window stored, and each job's audio (model, seconds) once it succeeds: for the metrics
        self.on_audio = on_audio
        self.running: dict[str, asyncio.Task] = {}
        self._cancelled: set[str] = set()  # by DELETE, not by a shutdown
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
            while len(self.running) < self.concurrency and (job := await self.store.next_queued(set(self.running))) is not None:
                try:
                    if self.engine_for(job.model) is None:
                        break  # its model is still loading
                except KeyError as exc:
                    await self._end(job, "failed", error={"code": "model_not_served", "message": str(exc.args[0])})
                    continue
                self.running[job.id] = task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
                task.add_done_callback(lambda _, job_id=job.id: (self.running.pop(job_id, None), self._wake.set()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_OVERLOADED_S)

    async def _run(self, job: JobRecord) -> None:
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
                writes.append(asyncio.ensure_future(self.store.add_window(job.id, index, run, window_json(window))))
                self.on_window()

            while True:
                try:
                    transcript = await engine.transcribe(audio, options, Priority.JOB, finished, done=done, lookahead=self.lookahead)
                    break
                except Overloaded:  # the stages have no room even for its first windows: it waits, it is not refused
                    await asyncio.sleep(RETRY_OVERLOADED_S)
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
