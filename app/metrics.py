"""Prometheus metrics: per model and stage (fed by the stages through :class:`StageMetrics`) and per service.

Each app has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from allocator.profiler import Profile

from workers.jobs import Job
from workers.pipeline import WindowRate
from workers.stages import Stage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        stage = ["model", "stage"]
        self.queue_depth = Gauge("asr_stage_queue_depth", "Windows waiting in front of the stage.", stage, registry=r)
        self.queue_capacity = Gauge("asr_stage_queue_capacity", "Most windows that may wait in front of the stage.", stage, registry=r)
        self.queue_age = Gauge("asr_stage_queue_oldest_seconds", "How long the oldest waiting window has waited.", stage, registry=r)
        self.workers = Gauge("asr_stage_workers", "Workers in the stage's pool.", stage, registry=r)
        self.busy_workers = Gauge("asr_stage_busy_workers", "Workers of the stage running model work now.", stage, registry=r)
        self.stage_latency = Histogram("asr_stage_latency_seconds", "Time a window spends being processed by the stage.", stage, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("asr_stage_queue_wait_seconds", "Time a window waits in the stage's queue.", stage, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("asr_stage_batch_size", "Windows per batch the stage ran (decoder: rows per decode step).", stage, buckets=BATCH_BUCKETS, registry=r)
        self.busy_seconds = Counter("asr_stage_busy_seconds", "Seconds the stage's workers spent on model work.", stage, registry=r)
        self.failures = Counter("asr_stage_failed_windows", "Windows failed by an error inside the stage.", stage, registry=r)
        self.requests = Counter("asr_http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.request_latency = Histogram("asr_http_request_duration_seconds", "Time from request to response.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("asr_audio_processed_seconds", "Seconds of audio transcribed.", ["model", "source"], registry=r)
        self.predicted_wait = Gauge("asr_admission_predicted_wait_seconds", "How long work admitted now would wait for the windows in flight (the admission signal; a scaling signal).", ["model"], registry=r)
        self.windows_in_flight = Gauge("asr_windows_in_flight", "Windows submitted to the pipeline and not finished.", ["model"], registry=r)
        self.rejected = Counter("asr_rejected_requests", "Requests refused before any model work, by reason.", ["reason"], registry=r)
        self.connections_open = Gauge("asr_connections_open", "Open client connections (HTTP and WebSocket).", registry=r)
        self.connections_cut = Counter("asr_connections_cut", "Connections the server closed for their client's slowness or for room, by reason "
                                       "(header_timeout, body_too_slow, upload_timeout, connection_limit, evicted).", ["reason"], registry=r)
        self.decodes_in_flight = Gauge("asr_audio_decodes_in_flight", "Uploaded files being decoded or waiting for a decoding thread.", registry=r)
        self.allocator_decisions = Counter("asr_allocator_decisions", "Allocator decisions by stage and action (grow, shrink, hold).", ["model", "stage", "action"], registry=r)
        self.webhook_failures = Counter("asr_webhook_failures", "Segments the post stage could not deliver to ASR_POST_WEBHOOK_URL.", registry=r)
        self.streams_active = Gauge("asr_streams_active", "Live streams now connected.", registry=r)
        self.stream_sessions_held = Gauge("asr_stream_sessions_held", "Stream sessions holding audio and state; equals asr_streams_active unless something leaks.", registry=r)
        self.stream_sessions = Counter("asr_stream_sessions", "Streams ended, by close reason.", ["reason"], registry=r)
        self.first_partial_latency = Histogram("asr_stream_first_partial_latency_seconds", "From an utterance's first speech to its first partial.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.partial_latency = Histogram("asr_stream_partial_latency_seconds", "From an interim step's newest audio to its partial.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.final_latency = Histogram("asr_stream_final_latency_seconds", "From the end of an utterance (endpoint, finalize, close) to its final.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self._profiles: dict[str, Callable[[], Profile]] = {}
        r.register(_ProfileCollector(self._profiles))

    def watch_model(self, model: str, stages: list[Stage], rate: WindowRate, profile: Callable[[], Profile]) -> None:
        """Gauges that read one model's pipeline at scrape time (utilization and pressure from one profile per scrape)."""
        for stage in stages:
            s, labels = stage, (model, stage.name)
            self.queue_depth.labels(*labels).set_function(lambda s=s: len(s.scheduler))
            self.queue_capacity.labels(*labels).set_function(lambda s=s: s.scheduler.policy.capacity)
            self.queue_age.labels(*labels).set_function(s.scheduler.oldest_wait_s)
            self.workers.labels(*labels).set_function(lambda s=s: s.workers)
            self.busy_workers.labels(*labels).set_function(lambda s=s: s.busy_workers)
        self.predicted_wait.labels(model).set_function(rate.wait_s)
        self.windows_in_flight.labels(model).set_function(lambda: rate.in_flight)
        self._profiles[model] = profile

    def watch_streams(self, connections: set, sessions_held: Callable[[], int]) -> None:
        self.streams_active.set_function(lambda: len(connections))
        self.stream_sessions_held.set_function(sessions_held)


class StageMetrics:
    """The :class:`StageObserver` of one model's stages: its observations, labelled with the model."""

    def __init__(self, metrics: Metrics, model: str):
        self.metrics, self.model = metrics, model

    def batch_done(self, stage: str, size: int, busy_s: float) -> None:
        self.metrics.batch_size.labels(self.model, stage).observe(size)
        self.metrics.busy_seconds.labels(self.model, stage).inc(busy_s)

    def jobs_done(self, stage: str, jobs: list[Job]) -> None:
        queue_wait, latency = self.metrics.queue_wait.labels(self.model, stage), self.metrics.stage_latency.labels(self.model, stage)
        for job in jobs:
            times = job.times[stage]
            queue_wait.observe(times.started - times.enqueued)
            latency.observe(times.finished - times.started)

    def batch_failed(self, stage: str, jobs: list[Job], error: BaseException) -> None:
        self.metrics.failures.labels(self.model, stage).inc(len(jobs))


class _ProfileCollector(Collector):
    def __init__(self, profiles: dict[str, Callable[[], Profile]]):
        self.profiles = profiles

    def collect(self):
        utilization = GaugeMetricFamily("asr_stage_utilization_ratio", "Busy time / wall time / workers over the profiler's window.", labels=["model", "stage"])
        pressure = GaugeMetricFamily("asr_stage_pressure", "The profiler's pressure score (the bottleneck has the highest).", labels=["model", "stage"])
        for model, profile in self.profiles.items():
            for stage in profile().stages:
                utilization.add_metric([model, stage.name], stage.utilization)
                pressure.add_metric([model, stage.name], stage.pressure)
        yield utilization
        yield pressure
