"""Delivery of results to a webhook: the post stage awaits one POST per transcribed segment.

A delivery that fails is logged and counted (``asr_webhook_failures_total``); the transcript itself is
still returned to its caller. The wait is real I/O, which is what makes the post stage the bottleneck
when the receiver is slow, and the allocator then gives it more workers.
"""

from __future__ import annotations

import logging

import httpx

from app.metrics import Metrics
from workers.jobs import Job

log = logging.getLogger(__name__)


class WebhookDelivery:
    def __init__(self, url: str, timeout_s: float, metrics: Metrics):
        self.url = url
        self.metrics = metrics
        self.client = httpx.AsyncClient(timeout=timeout_s)

    async def __call__(self, job: Job) -> None:
        for segment in job.result.segments if job.result is not None else []:
            payload = {"window": job.id, "start": segment.start, "end": segment.end, "text": segment.text}
            try:
                response = await self.client.post(self.url, json=payload)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                self.metrics.webhook_failures.inc()
                log.warning("webhook %s: delivery failed: %r", self.url, exc)

    async def close(self) -> None:
        await self.client.aclose()
