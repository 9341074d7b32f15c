"""A job is one audio window on its way through the four stages."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.decoding import SearchOptions
from workers.features import SAMPLE_RATE
from workers.timing import WordTiming
from workers.scheduler import Priority

_ids = itertools.count()


@dataclass
class StageTimes:
    enqueued: float  # time.monotonic() when it entered the stage's queue
    started: float | None = None  # when a worker took it
    finished: float | None = None  # when the worker was done with it


@dataclass
class Segment:
    start: float  # seconds from the start of the request's audio
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float = 0.0  # the last its window was decoded at (above 0 after a fallback)
    words: list[WordTiming] | None = None  # when the request asked for word timestamps


@dataclass
class WindowResult:
    segments: list[Segment]
    # seconds of the window the transcript accounts for; less than its length when the decoder
    # stopped at a segment boundary before the end, and the rest must be decoded again
    covered_s: float
    temperature: float = 0.0  # the last its decoder tried: a high one ends the file's context (see Pipeline.transcribe)
    language: str | None = None  # detected in it, when its request gave none


@dataclass(frozen=True)
class WindowOptions:
    """What a request asked of its decoding, normalised once at the edge (see ``Engine.options``): nothing
    in it can fail inside a shared batch."""

    language: str | None  # a code the model's tokenizer knows, lower case; None: each window's is detected (multilingual models)
    prompt: tuple[int, ...]  # the decoder's whole prompt: previous text (cut to fit), then the start-of-transcript sequence
    forced: tuple[int, ...] = ()  # the transcript's first tokens, fed rather than sampled (see Engine.options)
    tenant: str = ""  # whose API key sent it: with ASR_ENCODER_PACKING=per_key, only one tenant's windows share an encoder pass
    search: SearchOptions = SearchOptions()  # greedy or beam, and the temperatures to fall back to
    context: tuple[int, ...] = ()  # the text tokens the first window is conditioned on (the request's prompt)
    condition_on_previous_text: bool = False  # each later window of a file on the text before it (the decoder waits for it)
    word_timestamps: bool = False  # each segment's words with their start and end
    task: str = "transcribe"  # or translate: a multilingual model's text in English


@dataclass(eq=False)  # a job is itself, not its contents (its audio is an array)
class Job:
    """One window and its caller's future. ``data`` is what the last stage made of it (log-mel, encoder
    output, decoded row, window result): each stage maps its batch's data to new data, nothing else."""

    audio: np.ndarray  # float32 PCM at 16 kHz, at most 30 s
    offset_s: float  # where this window starts in the request's audio
    priority: Priority
    options: WindowOptions
    id: int = field(default_factory=lambda: next(_ids))
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    times: dict[str, StageTimes] = field(default_factory=dict)
    data: Any = None
    held: bool = False  # its prompt waits for the previous window's text: the decoder stage parks it until it is released
    # the undecoded end of a window decoded before: its window, and every window after it that waits for its
    # text, wait for it, so it goes ahead of the windows queued at its priority in each stage (it was admitted once)
    resumed: bool = False

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def abandoned(self) -> bool:
        """The caller stopped waiting (disconnected, timed out, cancelled): skip the work."""
        return self.future.done()

    def mark(self, stage: str, event: str) -> None:
        now = time.monotonic()
        if event == "enqueued":
            self.times[stage] = StageTimes(enqueued=now)
        else:
            setattr(self.times[stage], event, now)

    def fail(self, error: BaseException) -> None:
        self.data = None  # what the stages attached (encoder output: 1.5 MB) goes with the answer
        if not self.future.done():
            self.future.set_exception(error)

    def finish(self, result: WindowResult) -> None:
        self.data = None
        if not self.future.done():
            self.future.set_result(result)
