"""JobWebhooks: a job's end, POSTed to its ``webhook_url``, signed, retried, its delivery recorded on the job.

The body is the job's summary (GET /v1/jobs/{id} without the result), in JSON. The header
``ASR-Signature: t=<unix seconds>,v1=<hex>`` carries HMAC-SHA256, under ``ASR_JOB_WEBHOOK_SECRET``, of
``<t>.<body>`` (Stripe's scheme): a receiver recomputes it, compares in constant time, and refuses a
timestamp too old, so a captured delivery cannot be replayed later. :func:`verify_signature` is that check.

A delivery that fails (no answer in ``ASR_JOB_WEBHOOK_TIMEOUT_S``, a refused connection, a status other than
2xx) is tried again after 1, 2, 4 ... s (at most ``MAX_BACKOFF_S``), up to ``ASR_JOB_WEBHOOK_MAX_ATTEMPTS``
times; each attempt's outcome is stored on the job (``webhook``: status, attempts, last_error,
delivered_at). Deliveries are tasks of their own, so a slow or dead receiver never holds up a job. One still
pending at a restart is sent again then.

Which hosts a job may name is the operator's to say (``ASR_JOB_WEBHOOK_ALLOWED_HOSTS``): a URL from a
client must not make the server open a socket to anything on its network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable

import httpx

from app.jobs.store import JobRecord, JobStore, StorageFull

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "ASR-Signature"
MAX_BACKOFF_S = 300.0
TOLERANCE_S = 300.0  # a receiver refuses a signature older than this


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, now: float | None = None, tolerance_s: float = TOLERANCE_S) -> bool:
    """A receiver's check of ``ASR-Signature``: the HMAC matches and the timestamp is recent."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), f"t={timestamp},v1={fields.get('v1', '')}")


def webhook_refusal(url: str, secret: str, allowed_hosts: list[str]) -> str | None:
    """Why a job may not name ``url`` (a message for a 400), or None."""
    if not secret or not allowed_hosts:
        return "job webhooks are off on this server: the operator sets ASR_JOB_WEBHOOK_SECRET and ASR_JOB_WEBHOOK_ALLOWED_HOSTS"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"webhook_url is not a valid URL ({exc})"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "webhook_url must be an http or https URL with a host"
    if parsed.host not in allowed_hosts:
        return f"webhook_url's host {parsed.host!r} is not one this server delivers to (ASR_JOB_WEBHOOK_ALLOWED_HOSTS)"
    return None


class JobWebhooks:
    def __init__(self, store: JobStore, secret: str, timeout_s: float, max_attempts: int,
                 summary: Callable[[JobRecord, bool], dict], on_outcome: Callable[[str], None] = lambda outcome: None,
                 first_backoff_s: float = 1.0):
        self.store, self.secret, self.max_attempts = store, secret, max_attempts
        self.summary = summary
        self.on_outcome = on_outcome  # delivered | retried | failed, for the metrics
        self.first_backoff_s = first_backoff_s
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._deliveries: set[asyncio.Task] = set()

    def offer(self, job: JobRecord) -> None:
        """Deliver the job's end in the background; returns at once."""
        task = asyncio.create_task(self._deliver(job), name=f"webhook-{job.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def resume(self) -> None:
        """Deliveries a restart cut short."""
        for job in await self.store.pending_webhooks():
            self.offer(job)

    async def close(self) -> None:
        for task in self._deliveries:
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self._client.aclose()

    async def _record(self, job_id: str, state: dict) -> None:
        """A delivery's state on its job; one that cannot be stored (the disk is full) is logged, and the delivery goes
        on: at worst a restart sends a delivered one again, and receivers must take a delivery twice anyway."""
        try:
            await self.store.update(job_id, webhook=state)
        except StorageFull as exc:
            log.error("job %s: its webhook's delivery could not be recorded (%s)", job_id, exc)

    async def _deliver(self, job: JobRecord) -> None:
        summary = {key: value for key, value in self.summary(job, False).items() if key != "webhook"}
        body = json.dumps(summary).encode()
        state = dict(job.webhook or {"status": "pending", "attempts": 0})
        while state["attempts"] < self.max_attempts:
            state["attempts"] += 1
            try:
                response = await self._client.post(job.webhook_url, content=body, headers={
                    "Content-Type": "application/json", SIGNATURE_HEADER: signature(self.secret, int(time.time()), body)})
                error = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if error is None:
                state.update(status="delivered", delivered_at=time.time(), last_error=None)
                await self._record(job.id, state)
                self.on_outcome("delivered")
                return
            last = state["attempts"] >= self.max_attempts
            state.update(status="failed" if last else "pending", last_error=error)
            await self._record(job.id, state)
            self.on_outcome("failed" if last else "retried")
            if not last:
                await asyncio.sleep(min(MAX_BACKOFF_S, self.first_backoff_s * 2 ** (state["attempts"] - 1)))
        log.warning("job %s: webhook not delivered after %d attempts (%s)", job.id, state["attempts"], state.get("last_error"))
