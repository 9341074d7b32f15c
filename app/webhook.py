"""Delivery of final results to a webhook (``ASR_POST_WEBHOOK_URL``), out of the pipeline.

Why an outbox: the pipeline used to await one POST per segment, so every caller waited on the
receiver and a slow or dead one stalled transcription. Now a caller hands a finished result to
``WebhookOutbox.offer``, which never blocks and never raises, and one background task sends the
payloads in order, one POST at a time.

- Finals only: a REST transcript, or a stream utterance once it is final; interim stream steps are
  never sent. ``transcript_payload`` and ``stream_final_payload`` build the two shapes.
- Bounded: at most ``max_pending`` payloads wait. A full outbox drops the new payload (the older
  ones are already owed), so memory stays flat while a receiver is down; every drop is counted.
- Failures (a non-2xx answer, a timeout, a refused connection, any exception at all) are counted
  and logged at most once every few seconds; the next payload is sent regardless.

No retry: a payload is tried once. A later job-webhook issue adds signed, retried delivery.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import httpx

log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0  # a dead receiver fails every payload; one line per payload would drown the log


def validate_webhook_url(url: str) -> str:
    """Return ``url`` if the outbox can send to it; else raise ValueError saying what to change (run at start-up)."""
    where = f"ASR_POST_WEBHOOK_URL={url!r}"
    example = "e.g. https://example.com/hook"
    if any(c.isspace() for c in url):
        # httpx would percent-encode it into a host name that never resolves
        raise ValueError(f"{where}: contains whitespace; remove it or percent-encode it")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{where}: is not a valid URL ({exc}); {example}") from exc
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"{where}: the scheme must be http or https, {example}")
    if not parsed.host:
        raise ValueError(f"{where}: has no host, {example}")
    return url


def transcript_payload(request_id: str, model: str, text: str, duration_s: float, segments: list[dict]) -> dict:
    """A REST transcript; each segment keeps only start, end and text, so both callers send one shape."""
    return {"type": "transcript", "request_id": request_id, "model": model, "text": text, "duration_s": duration_s,
            "segments": [{"start": s["start"], "end": s["end"], "text": s["text"]} for s in segments]}


def stream_final_payload(stream_id: str, model: str, utterance: int, text: str, start: float, end: float, reason: str) -> dict:
    """One final utterance of a stream; ``reason`` says what ended it."""
    return {"type": "stream.final", "stream_id": stream_id, "model": model, "utterance": utterance, "text": text,
            "start": start, "end": end, "reason": reason}


class _Throttled:
    """Logs a WARNING at most once per ``LOG_EVERY_S``, saying how many were left out since the last one."""

    def __init__(self) -> None:
        self.last = -math.inf
        self.left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            self.left_out += 1
            return
        log.warning(message + " (%d left out since the last such line)", *args, self.left_out)
        self.last, self.left_out = now, 0


class WebhookOutbox:
    """A bounded queue of JSON payloads and the one task that POSTs them to ``url``, in order.

    The callbacks count outcomes (metrics); each payload ends in exactly one of them, except that
    close() counts as dropped whatever it could not deliver in time. A ``client`` given here stays
    the caller's to close; one the outbox makes, it closes.
    """

    def __init__(self, url: str, timeout_s: float, max_pending: int, *,
                 on_delivered: Callable[[], None], on_failed: Callable[[], None], on_dropped: Callable[[], None],
                 client: httpx.AsyncClient | None = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")  # asyncio reads 0 as unbounded
        self.url = url
        self.timeout_s = timeout_s
        self._on_delivered, self._on_failed, self._on_dropped = on_delivered, on_failed, on_dropped
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=timeout_s)
        self._queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=max_pending)
        self._sending: dict | None = None  # the payload being POSTed; still set if close() cancels it mid-send
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = _Throttled()
        self._drops = _Throttled()

    def start(self) -> None:
        """Start the sending task on the running loop; the reference keeps it from being garbage-collected."""
        self._task = asyncio.get_running_loop().create_task(self._send_all(), name="webhook-outbox")

    def offer(self, payload: dict) -> bool:
        """Queue ``payload`` without waiting; False (counted as dropped) when full or closed."""
        if self._closed:
            self._on_dropped()
            return False
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._on_dropped()
            self._drops.warning("webhook outbox full (%d waiting): dropped a new payload", self._queue.qsize())
            return False
        return True

    @property
    def pending(self) -> int:
        """Payloads waiting plus the one being sent."""
        return self._queue.qsize() + (self._sending is not None)

    async def close(self, timeout_s: float) -> None:
        """Deliver what is pending within ``timeout_s``, drop (and count) the rest, and close the client."""
        self._closed = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout_s)
            except TimeoutError:
                pass  # what is left is dropped below
            self._task.cancel()
            # gather absorbs the task's own CancelledError but still lets a cancellation of close() through
            await asyncio.gather(self._task, return_exceptions=True)
        dropped = self.pending
        for _ in range(dropped):
            self._on_dropped()
        if dropped:
            log.warning("webhook outbox closed: dropped %d undelivered payload(s)", dropped)
        if self._owns_client:
            await self._client.aclose()

    async def _send_all(self) -> None:
        while True:
            self._sending = await self._queue.get()
            try:
                await self._post(self._sending)
                self._on_delivered()
            except Exception as exc:  # any exception at all (httpx.InvalidURL is no HTTPError): this task must outlive every payload
                self._on_failed()
                self._failures.warning("webhook delivery failed: %r", exc)
            self._sending = None
            self._queue.task_done()

    async def _post(self, payload: dict) -> None:
        # httpx's timeout is per phase (connect, write, each read); this bounds the whole POST, so a
        # receiver that trickles its answer cannot hold the one sender for longer than timeout_s
        async with asyncio.timeout(self.timeout_s):
            response = await self._client.post(self.url, json=payload)
        response.raise_for_status()  # any non-2xx, redirects included (they are not followed)
