"""What the app holds while it runs: the settings, the metrics, and (once loaded) a pipeline per served model."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from configs import Settings
from configs.settings import EMBEDDED, ModelSpec
from allocator.greedy import AllocatorPolicy, GreedyAllocator
from allocator.profiler import PressureWeights, StageProfiler
from app.audio import AudioDecoder
from app.errors import APIError
from app.metrics import Metrics, StageMetrics
from app.webhook import WebhookDelivery
from workers.decoding import DecodingOptions
from workers.pipeline import Pipeline
from workers.stages import ObserverGroup
from workers.runner import ModelRunner, choose_device, embedded_model_path
from workers.streaming import StreamConfig, StreamEngine

if TYPE_CHECKING:
    from app.routes.stream import StreamConnection

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model and what serves it: its own pipeline, profiler, allocator (with its own budget) and stream engine."""

    name: str
    pipeline: Pipeline
    profiler: StageProfiler
    allocator: GreedyAllocator
    streams: StreamEngine
    allocator_task: asyncio.Task | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def device(self) -> str:
        return self.pipeline.runner.device.type

    def describe(self) -> dict:
        """Its entry in GET /v1/models (OpenAI's fields first); no paths, which would name this machine's files."""
        runner = self.pipeline.runner
        return {"id": self.name, "object": "model", "created": int(self.loaded_at), "owned_by": "asr-service",
                "device": self.device, "dtype": str(runner.dtype).removeprefix("torch."),
                "multilingual": runner.tokenizer.multilingual, "dims": asdict(runner.model.dims),
                "budget": {"cpu_slots": self.allocator.policy.cpu_slots, "gpu_slots": self.allocator.policy.gpu_slots}}

    def transcribes(self, language: str) -> bool:
        return self.pipeline.runner.tokenizer.has_language(language)

    def backlog(self) -> tuple[int, float]:
        """Windows waiting in the stage queues, and the predicted wait of a window admitted now."""
        return sum(len(s.scheduler) for s in self.pipeline.stages), self.pipeline.rate.wait_s()

    async def stop(self) -> None:
        if self.allocator_task is not None:
            self.allocator_task.cancel()
        self.streams.close()
        await self.pipeline.stop()


@dataclass
class Service:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    models: dict[str, ServedModel] = field(default_factory=dict)  # by name, as each finishes loading
    webhook: WebhookDelivery | None = None
    stream_connections: set[StreamConnection] = field(default_factory=set)
    requests_in_flight: int = 0  # admitted REST requests not yet answered
    transcriptions: set[asyncio.Future] = field(default_factory=set)  # their pipeline work
    load_failed: bool = False
    draining: bool = False
    decoder: AudioDecoder = field(init=False)  # uploads -> PCM, on threads of its own

    def __post_init__(self) -> None:
        s = self.settings
        self.decoder = AudioDecoder(s.decode_workers, s.decode_max_waiting, s.decode_timeout_s, s.max_audio_s)
        self.metrics.decodes_in_flight.set_function(lambda: self.decoder.in_flight)

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
        """The model a request names (the default when it names none); 404 model_not_found for a name not served,
        503 loading for one still loading."""
        name = name or self.settings.default_model_name
        if (served := self.models.get(name)) is None:
            if name in self.settings.models:
                raise APIError(503, "loading", f"the model {name} is loading", {"Retry-After": "5"})
            raise APIError(404, "model_not_found", f"no model {name!r}; this server serves {', '.join(self.settings.models)} (GET /v1/models)")
        return served

    async def load(self) -> None:
        """Load and warm each model off the event loop, one after the other, and start its pipeline;
        /readyz turns 200 once all are up."""
        settings = self.settings
        self.metrics.watch_streams(self.stream_connections, lambda: sum(len(m.streams.sessions) for m in self.models.values()))
        if settings.post_webhook_url:
            self.webhook = WebhookDelivery(settings.post_webhook_url, settings.post_webhook_timeout_s, self.metrics)
        for name, spec in settings.models.items():
            try:
                self.models[name] = await self._serve(name, spec)
            except Exception:
                self.load_failed = True
                log.exception("model %s (%s) could not be loaded", name, spec.path)
                raise

    async def _serve(self, name: str, spec: ModelSpec) -> ServedModel:
        settings, started = self.settings, time.perf_counter()
        runner = await asyncio.to_thread(self._load_runner, embedded_model_path() if spec.path == EMBEDDED else spec.path)
        report = await asyncio.to_thread(runner.warm_up)
        observers = ObserverGroup(StageMetrics(self.metrics, name))
        pipeline = Pipeline(runner, settings, observers, self.webhook, seconds_per_window=report.encoder_s + report.decoder_s)
        devices = {s.name: "gpu" if s.name in ("acoustic", "decoder") and runner.device.type == "cuda" else "cpu"
                   for s in pipeline.stages}
        profiler = StageProfiler(pipeline.stages, devices, settings.profiler_window_s, PressureWeights(
            settings.pressure_weight_latency, settings.pressure_weight_utilization, settings.pressure_weight_queue,
            settings.pressure_threshold))
        observers.observers.append(profiler)
        shares = len(settings.models)  # a model without a budget of its own gets an equal share of the total
        cpu_slots = spec.cpu_slots if spec.cpu_slots is not None else max(1, (settings.allocator_cpu_slots or os.cpu_count() or 1) // shares)
        gpu_slots = spec.gpu_slots if spec.gpu_slots is not None else settings.allocator_gpu_slots // shares
        allocator = GreedyAllocator(pipeline.stages, profiler, AllocatorPolicy(
            interval_s=settings.allocator_interval_s, cooldown_s=settings.allocator_cooldown_s,
            cpu_slots=cpu_slots, gpu_slots=gpu_slots,
            idle_utilization=settings.allocator_idle_utilization, shrink_after_s=settings.allocator_shrink_after_s),
            on_decision=lambda d: self.metrics.allocator_decisions.labels(name, d.stage, d.action).inc(),
            enabled=settings.allocator_enabled)
        self.metrics.watch_model(name, pipeline.stages, pipeline.rate, profiler.profile)
        pipeline.start()
        streams = await asyncio.to_thread(StreamEngine, pipeline, StreamConfig(
            step_s=settings.stream_step_s, vad_threshold=settings.stream_vad_threshold,
            max_utterance_s=settings.stream_max_utterance_s, prompt_previous_text=settings.stream_prompt_previous_text))
        served = ServedModel(name, pipeline, profiler, allocator, streams)
        served.allocator_task = asyncio.create_task(allocator.run(), name=f"allocator-{name}")
        log.info("model %s ready on %s in %.1f s (warm-up: encoder %.3f s, decoder %.3f s per window; allocator budget: %d CPU, %d GPU slots)",
                 name, runner.device, time.perf_counter() - started, report.encoder_s, report.decoder_s, cpu_slots, gpu_slots)
        return served

    def _load_runner(self, model_dir: Path) -> ModelRunner:
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
        models, self.models = list(self.models.values()), {}
        for served in models:
            await served.stop()
        if self.webhook is not None:
            await self.webhook.close()
        self.decoder.close()
