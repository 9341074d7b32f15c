"""JobLane: what the service holds for durable jobs (store, runner, webhooks, the decoder of their uploads)
and its lifecycle: :meth:`JobLane.open` (a store that cannot be used raises StoreUnavailable), start, stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from app.audio import AudioDecoder
from app.errors import APIError
from app.jobs.runner import JobRunner, job_summary
from app.jobs.store import JobStore
from app.jobs.webhooks import JobWebhooks
from app.metrics import Metrics
from configs import Settings
from workers.engine import Engine

OBSERVE_EVERY_S = 2.0  # the job gauges are read from the store this often


class JobLane:
    def __init__(self, settings: Settings, metrics: Metrics, engine_for: Callable[[str], Engine | None]):
        s = settings
        self.settings, self.metrics = settings, metrics
        self.store = JobStore(Path(s.data_dir))
        # a job's upload may be hours long: its own limits, and its own thread, so it never holds a REST request's decoding
        self.decoder = AudioDecoder(1, s.decode_max_waiting, s.job_decode_timeout_s, s.job_max_audio_s)
        self.webhooks = JobWebhooks(self.store, s.job_webhook_secret, s.job_webhook_timeout_s, s.job_webhook_max_attempts, job_summary,
                                    on_outcome=lambda outcome: metrics.job_webhook_deliveries.labels(outcome).inc())
        self.runner = JobRunner(self.store, engine_for, self.webhooks, s.job_concurrency, s.job_lookahead_windows, s.job_retention_s,
                                on_window=metrics.job_windows.inc,
                                on_audio=lambda model, seconds: metrics.audio_seconds.labels(model, "job").inc(seconds),
                                on_store_failure=metrics.job_store_failures.inc)
        self._observer: asyncio.Task | None = None

    @classmethod
    async def open(cls, settings: Settings, metrics: Metrics, engine_for: Callable[[str], Engine | None]) -> JobLane:
        lane = cls(settings, metrics, engine_for)
        await lane.store.open()
        lane.runner.start()
        await lane.webhooks.resume()
        lane._observer = asyncio.create_task(lane._observe(), name="job-metrics")
        return lane

    async def admit(self) -> None:
        """429 while too many jobs wait or their audio fills the disk budget."""
        s = self.settings
        counts = await self.store.counts()
        if counts["queued"] >= s.job_max_queued:
            self.metrics.rejected.labels("jobs_full").inc()
            raise APIError(429, "jobs_full", f"{counts['queued']} jobs are queued, the most this server holds (ASR_JOB_MAX_QUEUED); retry later",
                           {"Retry-After": "60"})
        if (held := await asyncio.to_thread(self.store.stored_bytes)) >= s.job_max_disk_bytes:
            self.metrics.rejected.labels("jobs_full").inc()
            raise APIError(429, "jobs_full", f"the queued jobs' audio holds {held} bytes, the most this server keeps (ASR_JOB_MAX_DISK_BYTES); "
                           "retry once some have run", {"Retry-After": "60"})

    async def _observe(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a gauge is not worth a crash: the next round tries again
                for status, count in (await self.store.counts()).items():
                    self.metrics.jobs.labels(status).set(count)
                oldest = await self.store.oldest_queued_at()
                self.metrics.job_queue_age.set(0.0 if oldest is None else max(0.0, time.time() - oldest))
            await asyncio.sleep(OBSERVE_EVERY_S)

    async def stop(self) -> None:
        """Running jobs are cut short (they resume at the next start, from their last finished window)."""
        await self.runner.stop()

    async def close(self) -> None:
        await self.runner.stop()
        if self._observer is not None:
            self._observer.cancel()
        await self.webhooks.close()
        await self.store.close()
        self.decoder.close()
