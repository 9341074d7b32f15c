"""Prometheus metrics: per model and stage (fed by the stages through :class:`StageMetrics`) and per service.

Each app has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from allocator.greedy import ACTIONS
from allocator.profiler import Profile
from workers.engine import EngineSnapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's schedule after 0.0

# The fixed label values, exported from the start so that a panel shows zeros, not "No data", until the event happens.
WEBHOOK_OUTCOMES = ("delivered", "failed", "dropped")
REJECTION_REASONS = ("loading", "model_failed", "shutting_down", "decoders_busy", "backlog", "queue_full", "client_gone",  # app.limits, app.routes
                     "client_rate", "origin_not_allowed", "streams_full", "client_streams_full", "jobs_full")
STREAM_END_REASONS = ("client_close", "client_gone", "idle_timeout", "no_audio", "session_too_long", "rate_limited",  # app.routes.stream
                      "frame_too_large", "client_too_slow", "server_shutdown", "internal_error")
AUDIO_SOURCES = ("rest", "stream", "job")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")  # app.jobs.store
JOB_WEBHOOK_OUTCOMES = ("delivered", "retried", "failed")  # app.jobs.webhooks
# A transcription endpoint's answers that the dashboard tells apart: done, overloaded, failed, unavailable.
WATCHED_STATUSES = ("200", "429", "500", "503")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        stage = ["model", "stage"]
        self.stage_latency = Histogram("asr_stage_latency_seconds", "Time a window spends being processed by the stage.", stage, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("asr_stage_queue_wait_seconds", "Time a window waits in the stage's queue.", stage, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("asr_stage_batch_size", "Windows per batch the stage ran (decoder: rows per decode step).", stage, buckets=BATCH_BUCKETS, registry=r)
        self.busy_seconds = Counter("asr_stage_busy_seconds", "Seconds the stage's workers spent on model work.", stage, registry=r)
        self.failures = Counter("asr_stage_failed_windows", "Windows failed by an error inside the stage.", stage, registry=r)
        self.abandoned = Counter("asr_stage_abandoned_windows", "Windows dropped by the stage because their caller had gone (a disconnected client, a cancelled interim step, a closed stream); the decoder drops them between two tokens.", stage, registry=r)
        self.restarts = Counter("asr_stage_worker_restarts", "Stage workers restarted after failing outside a batch's compute (each failed exactly the windows it held).", stage, registry=r)
        self.requests = Counter("asr_http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.request_latency = Histogram("asr_http_request_duration_seconds", "Time from request to response.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("asr_audio_processed_seconds", "Seconds of audio transcribed.", ["model", "source"], registry=r)
        self.rejected = Counter("asr_rejected_requests", "Requests refused before any model work, by reason.", ["reason"], registry=r)
        self.connections_open = Gauge("asr_connections_open", "Open client connections (HTTP and WebSocket).", registry=r)
        self.connections_cut = Counter("asr_connections_cut", "Connections the server closed for their client's slowness or for room, by reason "
                                       "(header_timeout, body_too_slow, upload_timeout, connection_limit, evicted).", ["reason"], registry=r)
        self.decodes_in_flight = Gauge("asr_audio_decodes_in_flight", "Uploaded files being decoded or waiting for a decoding thread.", registry=r)
        self.allocator_decisions = Counter("asr_allocator_decisions", "Allocator decisions by stage and action (grow, shrink, hold).", ["model", "stage", "action"], registry=r)
        self.webhook_deliveries = Counter("asr_webhook_deliveries", "Finals (REST transcripts, stream finals) offered to ASR_POST_WEBHOOK_URL, by outcome: delivered, failed (an error or a non-2xx answer), dropped (the outbox was full, or still held them at shutdown).", ["outcome"], registry=r)
        self.webhook_pending = Gauge("asr_webhook_pending", "Finals waiting in the webhook outbox or being sent.", registry=r)
        self.streams_active = Gauge("asr_streams_active", "Live streams now connected.", registry=r)
        self.stream_sessions_held = Gauge("asr_stream_sessions_held", "Stream sessions holding audio and state; equals asr_streams_active unless something leaks.", registry=r)
        self.stream_sessions = Counter("asr_stream_sessions", "Streams ended, by close reason.", ["reason"], registry=r)
        self.first_partial_latency = Histogram("asr_stream_first_partial_latency_seconds", "From an utterance's first speech to its first partial.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.partial_latency = Histogram("asr_stream_partial_latency_seconds", "From an interim step's newest audio to its partial.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.final_latency = Histogram("asr_stream_final_latency_seconds", "From the end of an utterance (endpoint, finalize, close) to its final.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.realtime_revisions = Counter("asr_realtime_revised_transcripts", "Realtime items whose completed transcript does not begin with the words already sent as deltas (the final decode revised a committed word).", ["model"], registry=r)
        self.jobs = Gauge("asr_jobs", "Durable jobs in the store, by status (read from the store every few seconds).", ["status"], registry=r)
        self.job_queue_age = Gauge("asr_job_queue_age_seconds", "How long the oldest queued job has waited to run (0: none waits).", registry=r)
        self.job_windows = Counter("asr_job_windows", "Windows of durable jobs transcribed and stored (none twice, across restarts).", registry=r)
        self.job_store_failures = Counter("asr_job_store_failures", "Jobs paused because their progress could not be stored (a full disk); each is resumed "
                                          "from its last stored window after a pause that doubles up to 5 min.", registry=r)
        self.job_webhook_deliveries = Counter("asr_job_webhook_deliveries", "Job webhook attempts by outcome: delivered, retried (failed, tried again later), failed (the last attempt failed).", ["outcome"], registry=r)
        for counter, values in ((self.webhook_deliveries, WEBHOOK_OUTCOMES), (self.rejected, REJECTION_REASONS),
                                (self.stream_sessions, STREAM_END_REASONS), (self.jobs, JOB_STATUSES),
                                (self.job_webhook_deliveries, JOB_WEBHOOK_OUTCOMES)):
            for value in values:
                counter.labels(value)
        self._models: dict[str, tuple[Callable[[], EngineSnapshot], Callable[[], Profile]]] = {}
        r.register(_EngineCollector(self._models))

    def watch_model(self, model: str, snapshot: Callable[[], EngineSnapshot], profile: Callable[[], Profile]) -> None:
        """One model's gauges, read at scrape time from one engine snapshot and one profile per scrape; its
        counters and histograms, per stage and allocator action, exported from the start."""
        self._models[model] = (snapshot, profile)
        for stage in snapshot().stages:
            for metric in (self.stage_latency, self.queue_wait, self.batch_size, self.busy_seconds, self.failures, self.abandoned, self.restarts):
                metric.labels(model, stage.name)
            for action in ACTIONS:
                self.allocator_decisions.labels(model, stage.name, action)
        for metric in (self.first_partial_latency, self.partial_latency, self.final_latency, self.realtime_revisions):
            metric.labels(model)
        for source in AUDIO_SOURCES:
            self.audio_seconds.labels(model, source)

    def watch_endpoints(self, paths: tuple[str, ...]) -> None:
        """The transcription endpoints' requests, by the statuses the dashboard watches, and latencies exported from the start."""
        for path in paths:
            self.request_latency.labels(path)
            for status in WATCHED_STATUSES:
                self.requests.labels(path, status)

    def watch_streams(self, connections: set, sessions_held: Callable[[], int]) -> None:
        self.streams_active.set_function(lambda: len(connections))
        self.stream_sessions_held.set_function(sessions_held)


class StageMetrics:
    """The stage observer of one model's engine: its observations, labelled with the model."""

    def __init__(self, metrics: Metrics, model: str):
        self.metrics, self.model = metrics, model

    def batch_done(self, stage: str, size: int, busy_s: float) -> None:
        self.metrics.batch_size.labels(self.model, stage).observe(size)
        self.metrics.busy_seconds.labels(self.model, stage).inc(busy_s)

    def window_done(self, stage: str, waited_s: float, worked_s: float, audio_s: float) -> None:
        self.metrics.queue_wait.labels(self.model, stage).observe(waited_s)
        self.metrics.stage_latency.labels(self.model, stage).observe(worked_s)

    def windows_failed(self, stage: str, count: int) -> None:
        self.metrics.failures.labels(self.model, stage).inc(count)

    def windows_abandoned(self, stage: str, count: int) -> None:
        self.metrics.abandoned.labels(self.model, stage).inc(count)

    def worker_restarted(self, stage: str) -> None:
        self.metrics.restarts.labels(self.model, stage).inc()


class _EngineCollector(Collector):
    """Per model: the stages' pools and queues, the admission signal, utilization and pressure."""

    STAGE_GAUGES = (  # (name, help, field of StageSnapshot)
        ("asr_stage_queue_depth", "Windows waiting in front of the stage.", "queue_depth"),
        ("asr_stage_queue_capacity", "Most windows that may wait in front of the stage.", "queue_capacity"),
        ("asr_stage_queue_oldest_seconds", "How long the oldest waiting window has waited.", "queue_oldest_s"),
        ("asr_stage_workers", "Workers in the stage's pool.", "workers"),
        ("asr_stage_busy_workers", "Workers of the stage running model work now.", "busy_workers"),
    )

    def __init__(self, models: dict[str, tuple[Callable[[], EngineSnapshot], Callable[[], Profile]]]):
        self.models = models

    def collect(self):
        stage_labels = ["model", "stage"]
        gauges = {field: GaugeMetricFamily(name, text, labels=stage_labels) for name, text, field in self.STAGE_GAUGES}
        utilization = GaugeMetricFamily("asr_stage_utilization_ratio", "Busy time / wall time / workers over the profiler's window.", labels=stage_labels)
        pressure = GaugeMetricFamily("asr_stage_pressure", "The profiler's pressure score (the bottleneck has the highest).", labels=stage_labels)
        wait = GaugeMetricFamily("asr_admission_predicted_wait_seconds", "How long work admitted now would wait for the windows in flight (the admission signal; a scaling signal).", labels=["model"])
        in_flight = GaugeMetricFamily("asr_windows_in_flight", "Windows submitted to the pipeline and not finished.", labels=["model"])
        passes = CounterMetricFamily("asr_encoder_passes", "Encoder passes run (each one window padded to 30 s, or several packed windows and a 4 s tail).", labels=["model"])
        packed = CounterMetricFamily("asr_encoder_windows", "Windows encoded; per pass (over asr_encoder_passes_total), the encoder's fill.", labels=["model"])
        packed_audio = CounterMetricFamily("asr_encoder_audio_seconds", "Seconds of audio encoded; per pass, the encoder's fill (30 s would be a full pass).", labels=["model"])
        decoded = CounterMetricFamily("asr_decoder_windows", "Windows decoded (each once, however many temperatures it took).", labels=["model"])
        fallbacks = CounterMetricFamily("asr_decoder_fallbacks", "Windows decoded again at a higher temperature because their result failed Whisper's quality rules "
                                        "(ASR_COMPRESSION_RATIO_THRESHOLD, ASR_LOGPROB_THRESHOLD), by that temperature.", labels=["model", "temperature"])
        for model, (snapshot, profile) in self.models.items():
            engine = snapshot()
            decoded.add_metric([model], engine.windows_decoded)
            # the usual labels from the start: a panel shows zeros, not "No data"
            for temperature, count in sorted(({t: 0 for t in FALLBACK_TEMPERATURES} | engine.decode_fallbacks).items()):
                fallbacks.add_metric([model, f"{temperature:g}"], count)
            for stage in engine.stages:
                for field, gauge in gauges.items():
                    gauge.add_metric([model, stage.name], getattr(stage, field))
            wait.add_metric([model], engine.predicted_wait_s)
            in_flight.add_metric([model], engine.windows_in_flight)
            passes.add_metric([model], engine.encoder_passes)
            packed.add_metric([model], engine.encoder_windows)
            packed_audio.add_metric([model], engine.encoder_audio_s)
            for stage in profile().stages:
                utilization.add_metric([model, stage.name], stage.utilization)
                pressure.add_metric([model, stage.name], stage.pressure)
        yield from gauges.values()
        yield from (utilization, pressure, wait, in_flight, passes, packed, packed_audio, decoded, fallbacks)
