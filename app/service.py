"""What the app holds while it runs: the settings, the metrics, and (once loaded) the pipeline."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from configs import Settings
from app.metrics import Metrics
from workers.decoding import DecodingOptions
from workers.pipeline import Pipeline
from workers.runner import EMBEDDED_MODEL_NAME, ModelRunner, choose_device, embedded_model_path
from workers.streaming import StreamConfig, StreamEngine

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    pipeline: Pipeline | None = None
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
        pipeline = Pipeline(runner, settings, self.metrics)
        self.metrics.watch(pipeline.stages)
        pipeline.start()
        self.streams = await asyncio.to_thread(StreamEngine, pipeline, StreamConfig(
            step_s=settings.stream_step_s, vad_threshold=settings.stream_vad_threshold,
            max_utterance_s=settings.stream_max_utterance_s, prompt_previous_text=settings.stream_prompt_previous_text))
        self.metrics.watch_streams(self.stream_connections, self.streams.sessions)
        self.pipeline = pipeline
        log.info("model %s ready on %s in %.1f s (warm-up: encoder %.3f s, decoder %.3f s per window)",
                 self.model_name, runner.device, time.perf_counter() - started, report.encoder_s, report.decoder_s)

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
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            await pipeline.stop()
