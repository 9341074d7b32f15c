"""What the app holds while it runs: the settings, the metrics, and (once loaded) the pipeline."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from configs import Settings
from allocator.greedy import AllocatorPolicy, GreedyAllocator
from allocator.profiler import PressureWeights, StageProfiler
from app.errors import APIError
from app.metrics import Metrics
from app.webhook import WebhookDelivery
from workers.decoding import DecodingOptions
from workers.pipeline import Pipeline
from workers.stages import ObserverGroup
from workers.runner import EMBEDDED_MODEL_NAME, ModelRunner, choose_device, embedded_model_path
from workers.streaming import StreamConfig, StreamEngine

if TYPE_CHECKING:
    from app.routes.stream import StreamConnection

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    pipeline: Pipeline | None = None
    profiler: StageProfiler | None = None
    allocator: GreedyAllocator | None = None
    webhook: WebhookDelivery | None = None
    _allocator_task: asyncio.Task | None = None
    streams: StreamEngine | None = None
    stream_connections: set[StreamConnection] = field(default_factory=set)
    requests_in_flight: int = 0  # admitted REST requests not yet answered
    transcriptions: set[asyncio.Future] = field(default_factory=set)  # their pipeline work
    model_name: str = ""
    load_failed: bool = False
    draining: bool = False

    def unavailable(self) -> APIError | None:
        """Why no new work can come in now (a 503 to answer with), or None when it can."""
        retry = {"Retry-After": "5"}
        if self.draining:
            return APIError(503, "shutting_down", "the server is shutting down; retry (another replica will answer)", retry)
        if self.load_failed:  # the reason names paths on this machine: it goes to the log, not to clients
            return APIError(503, "model_failed", "the model could not be loaded; the reason is in the server's log")
        if self.pipeline is None:
            return APIError(503, "loading", "the model is still loading; retry shortly (GET /readyz says when it is ready)", retry)
        return None

    async def load(self) -> None:
        """Load and warm the model off the event loop, then start the stages; /readyz turns 200 after."""
        settings = self.settings
        model_dir = settings.model_path or embedded_model_path()
        self.model_name = settings.model_name or (EMBEDDED_MODEL_NAME if settings.model_path is None else model_dir.name)
        started = time.perf_counter()
        try:
            runner = await asyncio.to_thread(self._load_runner, model_dir)
            report = await asyncio.to_thread(runner.warm_up)
        except Exception:
            self.load_failed = True
            log.exception("model %s could not be loaded", model_dir)
            raise
        if settings.post_webhook_url:
            self.webhook = WebhookDelivery(settings.post_webhook_url, settings.post_webhook_timeout_s, self.metrics)
        observers = ObserverGroup(self.metrics)
        pipeline = Pipeline(runner, settings, observers, self.webhook, seconds_per_window=report.encoder_s + report.decoder_s)
        devices = {s.name: "gpu" if s.name in ("acoustic", "decoder") and runner.device.type == "cuda" else "cpu"
                   for s in pipeline.stages}
        self.profiler = StageProfiler(pipeline.stages, devices, settings.profiler_window_s, PressureWeights(
            settings.pressure_weight_latency, settings.pressure_weight_utilization, settings.pressure_weight_queue,
            settings.pressure_threshold))
        observers.observers.append(self.profiler)
        self.allocator = GreedyAllocator(pipeline.stages, self.profiler, AllocatorPolicy(
            interval_s=settings.allocator_interval_s, cooldown_s=settings.allocator_cooldown_s,
            cpu_slots=settings.allocator_cpu_slots or os.cpu_count() or 1, gpu_slots=settings.allocator_gpu_slots,
            idle_utilization=settings.allocator_idle_utilization, shrink_after_s=settings.allocator_shrink_after_s),
            on_decision=lambda d: self.metrics.allocator_decisions.labels(d.stage, d.action).inc(),
            enabled=settings.allocator_enabled)
        self.metrics.watch(pipeline.stages)
        self.metrics.watch_rate(pipeline.rate)
        self.metrics.watch_profile(self.profiler.profile)
        pipeline.start()
        self._allocator_task = asyncio.create_task(self.allocator.run(), name="allocator")
        self.streams = await asyncio.to_thread(StreamEngine, pipeline, StreamConfig(
            step_s=settings.stream_step_s, vad_threshold=settings.stream_vad_threshold,
            max_utterance_s=settings.stream_max_utterance_s, prompt_previous_text=settings.stream_prompt_previous_text))
        self.metrics.watch_streams(self.stream_connections, self.streams.sessions)
        self.pipeline = pipeline
        log.info("model %s ready on %s in %.1f s (warm-up: encoder %.3f s, decoder %.3f s per window)",
                 self.model_name, runner.device, time.perf_counter() - started, report.encoder_s, report.decoder_s)

    def backlog(self) -> tuple[int, float]:
        """Windows waiting in the stage queues, and the predicted wait of a window admitted now (0, 0 before
        the model is up)."""
        if self.pipeline is None:
            return 0, 0.0
        return sum(len(s.scheduler) for s in self.pipeline.stages), self.pipeline.rate.wait_s()

    def _load_runner(self, model_dir) -> ModelRunner:
        import torch

        if self.settings.cpu_threads:
            torch.set_num_threads(self.settings.cpu_threads)
        options = DecodingOptions(sample_len=self.settings.max_new_tokens)
        return ModelRunner(model_dir, choose_device(self.settings.device), options)

    async def drain(self, timeout_s: float) -> None:
        """The first step of a graceful shutdown: refuse new work (/readyz turns 503), let every open stream
        send its last final and close with 1001, and let admitted requests finish; at most ``timeout_s``."""
        self.draining = True
        connections = list(self.stream_connections)
        log.info("draining: %d streams, %d requests in flight", len(connections), self.requests_in_flight)
        for connection in connections:
            connection.stop()
        deadline = time.monotonic() + timeout_s
        while (self.stream_connections or self.requests_in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.stream_connections or self.requests_in_flight:
            log.warning("drain timed out after %g s (ASR_SHUTDOWN_TIMEOUT_S): %d streams and %d requests cut off",
                        timeout_s, len(self.stream_connections), self.requests_in_flight)
            for work in self.transcriptions:  # their clients get 503 shutting_down rather than a dropped connection
                work.cancel()
            await asyncio.sleep(0.1)  # for those answers to go out

    async def close(self) -> None:
        """Streams still open (the drain ran out of time, or never ran) are cut off, then the stages stop."""
        connections = list(self.stream_connections)
        for connection in connections:
            connection.abort()
        await asyncio.gather(*(c.task for c in connections if c.task is not None), return_exceptions=True)
        if self.streams is not None:
            self.streams.close()
        if self._allocator_task is not None:
            self._allocator_task.cancel()
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            await pipeline.stop()
        if self.webhook is not None:
            await self.webhook.close()
