"""What the app holds while it runs: the settings, the metrics, the webhook outbox and (once loaded) an
engine per served model, each with its profiler and allocator. It talks to ``workers`` through
:mod:`workers.engine` only."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from allocator.greedy import AllocatorPolicy, GreedyAllocator
from allocator.profiler import PressureWeights, StageProfiler
from app.audio import AudioDecoder
from app.errors import APIError
from app.jobs.lane import JobLane
from app.jobs.store import StoreUnavailable
from app.metrics import Metrics, StageMetrics
from app.webhook import WebhookOutbox, validate_webhook_url
from configs import Settings
from configs.policies import available_cpus
from configs.settings import ModelSpec
from workers.engine import Engine, load_engine

log = logging.getLogger(__name__)


class LiveStream(Protocol):
    """What the service needs of an open stream connection (app.routes.stream.StreamConnection)."""

    client: str
    task: asyncio.Task | None

    def stop(self) -> None: ...

    def abort(self) -> None: ...


@dataclass
class ServedModel:
    """One model and what serves it: its engine, profiler and allocator (with its own budget)."""

    name: str
    engine: Engine
    profiler: StageProfiler
    allocator: GreedyAllocator
    allocator_task: asyncio.Task | None = None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        """Its entry in GET /v1/models (OpenAI's fields first); no paths, which would name this machine's files."""
        info = self.engine.info()
        return {"id": self.name, "object": "model", "created": int(self.loaded_at), "owned_by": "asr-service",
                "device": info.device, "dtype": info.dtype, "multilingual": info.multilingual, "languages": list(info.languages),
                "dims": info.dims, "sha256": info.weights_sha256,
                "budget": {"cpu_slots": self.allocator.policy.cpu_slots, "gpu_slots": self.allocator.policy.gpu_slots}}

    async def stop(self) -> None:
        if self.allocator_task is not None:
            self.allocator_task.cancel()
        await self.engine.stop()


@dataclass
class Service:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    models: dict[str, ServedModel] = field(default_factory=dict)  # by name, as each finishes loading
    webhook: WebhookOutbox | None = None
    jobs: JobLane | None = None  # once the job store is open
    jobs_unavailable: str | None = None  # why it could not be opened (the job API answers 503 with it)
    stream_connections: set[LiveStream] = field(default_factory=set)
    requests_in_flight: int = 0  # admitted REST requests not yet answered
    transcriptions: set[asyncio.Future] = field(default_factory=set)  # their pipeline work
    load_failed: bool = False
    draining: bool = False
    decoder: AudioDecoder = field(init=False)  # uploads -> PCM, on threads of its own
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)  # no stream open, no request in flight
    _cut: asyncio.Event = field(init=False, default_factory=asyncio.Event)  # a second signal: stop draining
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        s = self.settings
        self.decoder = AudioDecoder(s.decode_workers, s.decode_max_waiting, s.decode_timeout_s, s.max_audio_s)
        self.metrics.decodes_in_flight.set_function(lambda: self.decoder.in_flight)
        if s.post_webhook_url:
            m = self.metrics
            self.webhook = WebhookOutbox(validate_webhook_url(s.post_webhook_url), s.post_webhook_timeout_s, s.webhook_max_pending,
                                         on_delivered=m.webhook_deliveries.labels("delivered").inc,
                                         on_failed=m.webhook_deliveries.labels("failed").inc,
                                         on_dropped=m.webhook_deliveries.labels("dropped").inc)
            m.webhook_pending.set_function(lambda: self.webhook.pending)
        self._idle.set()

    @property
    def ready(self) -> bool:
        return len(self.models) == len(self.settings.models)

    def unavailable(self) -> APIError | None:
        """Why no new work can come in now (a 503 to answer with), or None when it can."""
        retry = {"Retry-After": "5"}
        if self.draining:
            return APIError(503, "shutting_down", "the server is shutting down; retry (another replica will answer)", retry)
        if self.load_failed:  # the reason names paths on this machine: it goes to the log, not to clients
            return APIError(503, "model_failed", "a model could not be loaded; the reason is in the server's log")
        if not self.ready:
            return APIError(503, "loading", "the models are still loading; retry shortly (GET /readyz says when they are ready)", retry)
        return None

    def model(self, name: str | None) -> ServedModel:
        """The model a request names (the default when it names none; aliases resolved); 404 model_not_found for a name not served,
        503 loading for one still loading."""
        name = self.settings.model_name(name)
        if (served := self.models.get(name)) is None:
            if name in self.settings.models:
                raise APIError(503, "loading", f"the model {name} is loading", {"Retry-After": "5"})
            raise APIError(404, "model_not_found", f"no model {name!r}; this server serves {', '.join(self.settings.models)} (GET /v1/models)")
        return served

    def job_engine(self, name: str) -> Engine | None:
        """The engine a stored job names: None while it loads; KeyError if it is not served (any more)."""
        if name not in self.settings.models:
            raise KeyError(f"the model {name} is not served by this server (ASR_MODELS)")
        served = self.models.get(name)
        return None if served is None else served.engine

    # who is in: a drain waits for both to reach zero
    def request_started(self) -> None:
        self.requests_in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.requests_in_flight -= 1
        self._check_idle()

    def stream_opened(self, connection: LiveStream) -> None:
        self.stream_connections.add(connection)
        self._idle.clear()

    def stream_closed(self, connection: LiveStream) -> None:
        self.stream_connections.discard(connection)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.stream_connections and not self.requests_in_flight:
            self._idle.set()

    async def load(self) -> None:
        """Load and warm each model off the event loop, one after the other, and start its engine;
        /readyz turns 200 once all are up."""
        self._loop = asyncio.get_running_loop()
        self.metrics.watch_streams(self.stream_connections, lambda: sum(m.engine.snapshot().streams_open for m in self.models.values()))
        if self.webhook is not None:
            self.webhook.start()
        try:
            self.jobs = await JobLane.open(self.settings, self.metrics, self.job_engine)
        except StoreUnavailable as exc:  # the rest of the service goes on; restarting would not mend it
            self.jobs_unavailable = str(exc)
            log.error("the job API is unavailable: %s", exc)
        for name, spec in self.settings.models.items():
            try:
                self.models[name] = await self._serve(name, spec)
            except Exception:
                self.load_failed = True
                log.exception("model %s (%s) could not be loaded", name, spec.path)
                raise

    async def _serve(self, name: str, spec: ModelSpec) -> ServedModel:
        settings, started = self.settings, time.perf_counter()
        engine = await asyncio.to_thread(load_engine, name, spec.path, settings, StageMetrics(self.metrics, name))
        profiler = StageProfiler(engine.snapshot, settings.profiler_window_s, PressureWeights(
            settings.pressure_weight_latency, settings.pressure_weight_utilization, settings.pressure_weight_queue,
            settings.pressure_threshold))
        engine.watch(profiler)
        shares = len(settings.models)  # a model without a budget of its own gets an equal share of the total
        cpu_slots = spec.cpu_slots if spec.cpu_slots is not None else max(1, (settings.allocator_cpu_slots or available_cpus()) // shares)
        gpu_slots = spec.gpu_slots if spec.gpu_slots is not None else settings.allocator_gpu_slots // shares
        allocator = GreedyAllocator(engine.resize, profiler, AllocatorPolicy(
            interval_s=settings.allocator_interval_s, cooldown_s=settings.allocator_cooldown_s,
            cpu_slots=cpu_slots, gpu_slots=gpu_slots,
            idle_utilization=settings.allocator_idle_utilization, shrink_after_s=settings.allocator_shrink_after_s),
            on_decision=lambda d: self.metrics.allocator_decisions.labels(name, d.stage, d.action).inc(),
            enabled=settings.allocator_enabled)
        self.metrics.watch_model(name, engine.snapshot, profiler.profile)
        engine.start()
        served = ServedModel(name, engine, profiler, allocator)
        served.allocator_task = asyncio.create_task(allocator.run(), name=f"allocator-{name}")
        info = engine.info()
        log.info("model %s ready on %s in %.1f s (warm-up: encoder %.3f s, decoder %.3f s per window; allocator budget: %d CPU, %d GPU slots)",
                 name, info.device, time.perf_counter() - started, info.warmup_encoder_s, info.warmup_decoder_s, cpu_slots, gpu_slots)
        return served

    def cut_drain(self) -> None:
        """A second SIGTERM or SIGINT while draining: stop waiting (safe to call from a signal handler)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut.set)

    async def drain(self, timeout_s: float) -> None:
        """The first step of a graceful shutdown: refuse new work (/readyz turns 503), let every open stream
        send its last final and close with 1001, and let admitted requests finish; at most ``timeout_s``,
        or until :meth:`cut_drain`."""
        self.draining = True
        if self.jobs is not None:  # running jobs stop here and resume, from their last window, at the next start
            await self.jobs.stop()
        connections = list(self.stream_connections)
        log.info("draining: %d streams, %d requests in flight", len(connections), self.requests_in_flight)
        for connection in connections:
            connection.stop()
        deadline = time.monotonic() + timeout_s
        idle, cut = asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._cut.wait())
        await asyncio.wait([idle, cut], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        if not self._cut.is_set():
            for served in self.models.values():  # what the engines still hold (windows whose caller left)
                emptied = asyncio.ensure_future(served.engine.drain(max(0.0, deadline - time.monotonic())))
                await asyncio.wait([cut, emptied], return_when=asyncio.FIRST_COMPLETED)
                emptied.cancel()
        cut.cancel()
        if self.stream_connections or self.requests_in_flight:
            why = "a second signal cut it short" if self._cut.is_set() else f"it timed out after {timeout_s:g} s (ASR_SHUTDOWN_TIMEOUT_S)"
            log.warning("drain ended early (%s): %d streams and %d requests cut off", why, len(self.stream_connections), self.requests_in_flight)
            for work in self.transcriptions:  # their clients get 503 shutting_down rather than a dropped connection
                work.cancel()
            await asyncio.sleep(0.1)  # for those answers to go out

    async def close(self) -> None:
        """Streams still open (the drain ran out of time, or never ran) are cut off, then the engines stop
        (answering whatever they still hold) and the webhook outbox delivers what it can."""
        connections = list(self.stream_connections)
        for connection in connections:
            connection.abort()
        await asyncio.gather(*(c.task for c in connections if c.task is not None), return_exceptions=True)
        if self.jobs is not None:
            await self.jobs.close()
        models, self.models = list(self.models.values()), {}
        for served in models:
            await served.stop()
        if self.webhook is not None:
            await self.webhook.close(self.settings.webhook_close_timeout_s)
        self.decoder.close()
