"""What the app holds while it runs: the settings, the metrics, and (once loaded) the pipeline."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from configs import Settings
from allocator.greedy import AllocatorPolicy, GreedyAllocator
from allocator.profiler import PressureWeights, StageProfiler
from app.metrics import Metrics
from app.webhook import WebhookDelivery
from workers.decoding import DecodingOptions
from workers.pipeline import Pipeline
from workers.stages import ObserverGroup
from workers.runner import EMBEDDED_MODEL_NAME, ModelRunner, choose_device, embedded_model_path
from workers.streaming import StreamConfig, StreamEngine

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
    stream_connections: set[asyncio.Task] = field(default_factory=set)
    model_name: str = ""
    load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    async def load(self) -> None:
        """Load and warm the model off the event loop, then start the stages; /readyz turns 200 after."""
        settings = self.settings
        model_dir = settings.model_path or embedded_model_path()
        self.model_name = settings.model_name or (EMBEDDED_MODEL_NAME if settings.model_path is None else model_dir.name)
        started = time.perf_counter()
        try:
            runner = await asyncio.to_thread(self._load_runner, model_dir)
            report = await asyncio.to_thread(runner.warm_up)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model %s could not be loaded", model_dir)
            raise
        if settings.post_webhook_url:
            self.webhook = WebhookDelivery(settings.post_webhook_url, settings.post_webhook_timeout_s, self.metrics)
        observers = ObserverGroup(self.metrics)
        pipeline = Pipeline(runner, settings, observers, self.webhook)
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
        """Windows waiting in all stage queues, and the longest any has waited (0, 0 before the model is up)."""
        if self.pipeline is None:
            return 0, 0.0
        stages = self.pipeline.stages
        return sum(len(s.scheduler) for s in stages), max(s.scheduler.oldest_wait_s() for s in stages)

    def _load_runner(self, model_dir) -> ModelRunner:
        import torch

        if self.settings.cpu_threads:
            torch.set_num_threads(self.settings.cpu_threads)
        options = DecodingOptions(sample_len=self.settings.max_new_tokens)
        return ModelRunner(model_dir, choose_device(self.settings.device), options)

    async def close(self) -> None:
        """Streams still open are told the server is going away, then the stages stop."""
        for task in list(self.stream_connections):
            task.cancel()
        await asyncio.gather(*self.stream_connections, return_exceptions=True)
        if self.streams is not None:
            self.streams.close()
        if self._allocator_task is not None:
            self._allocator_task.cancel()
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            await pipeline.stop()
        if self.webhook is not None:
            await self.webhook.close()
