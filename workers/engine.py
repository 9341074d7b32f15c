"""The engine of one model: the only part of ``workers`` the API layer talks to.

It is built in one place (:func:`load_engine`, from the settings through the frozen policies of
:mod:`configs.policies`), and offers: options normalised once (:meth:`Engine.options`), a file's
transcription (:meth:`Engine.transcribe`), a live stream's session (:meth:`Engine.open_stream`), a frozen
:meth:`Engine.snapshot` that metrics, admission, ``/v1/pipeline`` and the profiler read, :meth:`Engine.info`,
pool resizing for the allocator, and its lifecycle: :meth:`Engine.start`, :meth:`Engine.drain`,
:meth:`Engine.stop`. What the API needs of the engine's types is exported here too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from configs.policies import EnginePolicy, available_cpus, resolve_engine_policy
from configs.settings import EMBEDDED, Settings
from workers.decoding import DecodingOptions, SearchOptions, compression_ratio, temperature_schedule
from workers.features import SAMPLE_RATE
from workers.jobs import Segment, WindowOptions
from workers.pipeline import FileWindow, Overloaded, Pipeline, Transcript, plan_windows
from workers.runner import ModelRunner, WarmupReport, choose_device, embedded_model_path
from workers.scheduler import Priority, Signal
from workers.stages import ObserverGroup, StageError, StageObserver, StageSnapshot, StageStopped
from workers.timing import WordTiming
from workers.tokenizer import LANGUAGE_CODES, LANGUAGES, TASKS
from workers.streaming import Event, Final, Partial, SpeechStarted, SpeechStopped, StreamError, StreamOptions, StreamSession, StreamEngine

__all__ = [
    "LANGUAGES", "MAX_BEAM_SIZE", "SAMPLE_RATE", "TASKS", "compression_ratio", "Engine", "EngineInfo", "EngineSnapshot", "Event", "FileWindow", "Final", "OptionError", "Overloaded", "Partial", "Priority",
    "Segment", "SpeechStarted", "SpeechStopped", "StageError", "StageObserver", "StageSnapshot", "StageStopped", "StreamError", "StreamOptions",
    "StreamSession", "Transcript", "WindowOptions", "WordTiming", "load_engine",
]

log = logging.getLogger(__name__)


MAX_BEAM_SIZE = 16


class OptionError(ValueError):
    """A request option this model cannot honour; the message says which and why, ``code`` names it for an API error."""

    def __init__(self, message: str, code: str = "unsupported_option"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EngineInfo:
    name: str
    device: str  # cpu | cuda
    dtype: str
    multilingual: bool
    languages: tuple[str, ...]
    dims: dict
    warmup_encoder_s: float  # one 30 s window through the encoder, measured at load
    warmup_decoder_s: float  # ... and decoded
    weights_sha256: str  # of the model's model.bin: which weights a stored job was transcribed with


@dataclass(frozen=True)
class EngineSnapshot:
    stages: tuple[StageSnapshot, ...]
    windows_in_flight: int  # submitted and not finished, queued or being worked on
    seconds_per_window: float  # how long the pipeline has taken per window while busy
    streams_open: int  # stream sessions holding audio and state
    encoder_passes: int  # since the start; with the two below, the encoder's fill
    encoder_windows: int
    encoder_audio_s: float
    windows_decoded: int  # since the start
    decode_fallbacks: dict[float, int]  # windows decoded again at each fallback temperature, since the start

    @property
    def windows_waiting(self) -> int:
        return sum(stage.queue_depth for stage in self.stages)

    @property
    def encoder_fill(self) -> dict[str, float]:
        """Windows and seconds of audio per encoder pass since the start (a full pass holds 30 s)."""
        per_pass = max(self.encoder_passes, 1)
        return {"passes": self.encoder_passes, "windows": self.encoder_windows, "audio_s": round(self.encoder_audio_s, 1),
                "windows_per_pass": round(self.encoder_windows / per_pass, 2), "audio_s_per_pass": round(self.encoder_audio_s / per_pass, 2)}

    @property
    def predicted_wait_s(self) -> float:
        """How long work admitted now would wait for the windows in flight."""
        return self.windows_in_flight * self.seconds_per_window


class Engine:
    def __init__(self, name: str, runner: ModelRunner, policy: EnginePolicy, warmup: WarmupReport, streams: StreamEngine,
                 pipeline: Pipeline, observers: ObserverGroup, weights_sha256: str):
        self.name = name
        self._policy = policy
        self._runner, self._pipeline, self._streams, self._observers = runner, pipeline, streams, observers
        self._info = EngineInfo(name, runner.device.type, str(runner.dtype).removeprefix("torch."), runner.tokenizer.multilingual,
                                tuple(runner.tokenizer.languages), asdict(runner.model.dims), warmup.encoder_s, warmup.decoder_s,
                                weights_sha256)
        self._stages = {stage.name: stage for stage in pipeline.stages}
        self._idle = Signal()  # notified whenever a window finishes: a drain waits on it
        pipeline.rate.on_finished = self._idle.notify

    # what a request may ask
    def options(self, language: str | None, prompt: str | None, tenant: str = "", prefix: str | None = None,
                beam_size: int | None = None, temperature: float = 0.0, condition_on_previous_text: bool | None = None,
                word_timestamps: bool = False, task: str = "transcribe") -> WindowOptions:
        """Normalise a request's options; raises :class:`OptionError` for one the model cannot honour (a language
        it does not have, translation on an English-only model). What comes out cannot fail inside a shared batch.
        ``language``: a code or openai-whisper's name of it; unset, a multilingual model detects each window's.
        ``prefix``: text the transcript of its first window must begin with (a stream's committed words), so that
        only the rest is decoded. ``beam_size`` (unset: ASR_BEAM_SIZE), ``temperature`` (the first of its fallback
        schedule), ``condition_on_previous_text`` (unset: ASR_CONDITION_ON_PREVIOUS_TEXT), ``word_timestamps``,
        ``task``: transcribe, or translate into English."""
        search = self._policy.search
        if beam_size is not None and not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise OptionError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}, not {beam_size}", "invalid_beam_size")
        if not 0.0 <= temperature <= 1.0:
            raise OptionError(f"temperature must be between 0 and 1, not {temperature}", "invalid_temperature")
        if task not in TASKS:
            raise OptionError(f"task must be one of {', '.join(TASKS)}, not {task!r}", "unsupported_task")
        if task == "translate" and not self._info.multilingual:
            raise OptionError(f"the model {self.name} is English-only and cannot translate: serve a multilingual Whisper "
                              "(ASR_MODELS) and name it in the request", "unsupported_task")
        code = self._language(language)
        tokens = self._runner.tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        forced = self._runner.forced_prefix(prefix)
        chained = search.condition_on_previous_text if condition_on_previous_text is None else condition_on_previous_text
        return WindowOptions(language=code, prompt=self._runner.prompt(tokens, code, task), forced=forced, tenant=tenant, task=task,
                             search=SearchOptions(beam_size or search.beam_size, search.patience, search.length_penalty,
                                                  temperature_schedule(temperature, search.temperature_increment), search.best_of,
                                                  search.seed),
                             context=tuple(tokens), condition_on_previous_text=chained, word_timestamps=word_timestamps)

    def _language(self, language: str | None) -> str | None:
        if language is None or not language.strip():
            return None if self._info.multilingual else "en"
        code = language.strip().lower()
        code = LANGUAGE_CODES.get(code, code)
        if code not in self._info.languages:
            raise OptionError(f"the model {self.name} does not transcribe language {language!r}"
                              + ("" if self._info.multilingual else " (it is English-only: 'en')"), "unsupported_language")
        return code

    # work
    async def transcribe(self, audio: np.ndarray, options: WindowOptions, priority: Priority = Priority.BULK,
                         on_window: Callable[[FileWindow], None] = lambda window: None, done: Sequence[FileWindow] = (),
                         lookahead: int | None = None) -> Transcript:
        """A file's transcript: the segments of its windows (at most 30 s each), each of which ``on_window`` is
        given, in order, as soon as it is final (it and every window before it are decoded). ``done``: its first
        windows, final from an earlier run, which are not transcribed again (a durable job resumed: the same
        audio and options); ``lookahead``: at most this many of its windows in the stages at once. Raises
        :class:`Overloaded` (no room for its windows), :class:`StageError` (model work failed),
        :class:`StageStopped` (the engine stopped first), ValueError (``done`` is not this audio's)."""
        return await self._pipeline.transcribe(audio, options, priority, on_window=on_window, done=done, lookahead=lookahead)

    def plan(self, audio: np.ndarray) -> list[tuple[float, float]]:
        """The windows (start and end, in seconds) :meth:`transcribe` cuts ``audio`` into."""
        return [(start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in plan_windows(audio)]

    def open_stream(self, options: StreamOptions, emit: Callable[[Event], None]) -> StreamSession:
        return self._streams.open(options, emit)

    # what the operator and the allocator see and do
    def info(self) -> EngineInfo:
        return self._info

    def snapshot(self) -> EngineSnapshot:
        rate = self._pipeline.rate
        fill = self._pipeline.fill
        return EngineSnapshot(tuple(stage.snapshot() for stage in self._pipeline.stages), rate.in_flight,
                              rate.seconds_per_window, len(self._streams.sessions), fill.passes, fill.windows, fill.audio_s,
                              self._pipeline.decoded.windows, dict(self._pipeline.decoded.fallbacks))

    def watch(self, observer: StageObserver) -> None:
        """Another observer of the stages (the profiler)."""
        self._observers.observers.append(observer)

    def resize(self, stage: str, workers: int) -> int:
        return self._stages[stage].resize(workers)

    # lifecycle
    def start(self) -> None:
        self._pipeline.start()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no window is in flight, at most ``timeout_s``; True if it emptied."""
        deadline = time.monotonic() + timeout_s
        while self._pipeline.rate.in_flight and (left := deadline - time.monotonic()) > 0:
            await self._idle.wait(left)
        return not self._pipeline.rate.in_flight

    async def stop(self) -> None:
        """Every window still queued or held is answered (:class:`StageStopped`); the threads are released."""
        for session in list(self._streams.sessions):
            session.abort()
        self._streams.close()
        await self._pipeline.stop()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as weights:
        while chunk := weights.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_engine(name: str, model_path: Path | str, settings: Settings, observer: StageObserver) -> Engine:
    """Load, warm and wire one model (blocking: run it off the event loop) from a CTranslate2 Whisper
    directory or 'embedded'. The engine's policies are resolved here, once, for the device the model
    lands on; it starts with :meth:`Engine.start`."""
    import torch

    threads = settings.cpu_threads or min(available_cpus(), torch.get_num_threads())
    if threads != torch.get_num_threads():  # torch counts the host's cores, not the container's quota
        torch.set_num_threads(threads)
    model_dir = embedded_model_path() if model_path == EMBEDDED else Path(model_path)
    options = DecodingOptions(sample_len=settings.max_new_tokens, compression_ratio_threshold=settings.compression_ratio_threshold,
                              logprob_threshold=settings.logprob_threshold, no_speech_threshold=settings.no_speech_threshold)
    runner = ModelRunner(model_dir, choose_device(settings.device), options)
    policy = resolve_engine_policy(settings, on_gpu=runner.device.type == "cuda")
    warmup = runner.warm_up()
    observers = ObserverGroup(observer)
    pipeline = Pipeline(runner, policy, observers, seconds_per_window=warmup.encoder_s + warmup.decoder_s)
    engine: Engine | None = None

    def window_options(stream: StreamOptions, prompt: str | None, prefix: str | None, kind: str) -> WindowOptions:
        # a stream's context is its earlier finals (its prompt), and an utterance is one window. ``kind``: interim,
        # pause (a step at a pause in the speech, which becomes the final if the pause is an endpoint) or final.
        # The stream's beams are for what may be a final; a step the next one supersedes takes the stream beam.
        # An interim step never falls back, a final only with ASR_STREAM_TEMPERATURE_FALLBACK (or the stream's
        # own choice): a window sampled at every temperature costs 26 decodes, which the finals behind it wait for
        beams = (stream.beam_size if kind != "interim" else None) or policy.search.stream_beam_size
        options = engine.options(stream.language, prompt, stream.tenant, prefix, beam_size=beams,
                                 condition_on_previous_text=False, word_timestamps=stream.word_timestamps)
        if kind == "final" and (policy.search.stream_fallback if stream.final_fallback is None else stream.final_fallback):
            return options
        return replace(options, search=replace(options.search, temperatures=options.search.temperatures[:1]))

    streams = StreamEngine(pipeline, policy.stream, window_options)
    engine = Engine(name, runner, policy, warmup, streams, pipeline, observers, file_sha256(model_dir / "model.bin"))
    return engine
