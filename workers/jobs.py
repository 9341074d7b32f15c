"""A job is one audio window on its way through the four stages."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.features import SAMPLE_RATE
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


@dataclass
class WindowResult:
    segments: list[Segment]
    # seconds of the window the transcript accounts for; less than its length when the decoder
    # stopped at a segment boundary before the end, and the rest must be decoded again
    covered_s: float


@dataclass(eq=False)  # a job is itself, not its contents (its audio is an array)
class Job:
    audio: np.ndarray  # float32 PCM at 16 kHz, at most 30 s
    offset_s: float  # where this window starts in the request's audio
    priority: Priority
    prompt_tokens: list[int] = field(default_factory=list)  # previous text, conditions the decoder
    language: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    times: dict[str, StageTimes] = field(default_factory=dict)
    # what the stages attach on the way: log-mel, encoder output, decoded row, window result
    mel: Any = None
    encoded: Any = None
    decoded: Any = None
    result: WindowResult | None = None

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def abandoned(self) -> bool:
        """The caller stopped waiting (disconnected, timed out): skip the work."""
        return self.future.done()

    def mark(self, stage: str, event: str) -> None:
        now = time.monotonic()
        if event == "enqueued":
            self.times[stage] = StageTimes(enqueued=now)
        else:
            setattr(self.times[stage], event, now)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def finish(self, result: WindowResult) -> None:
        if not self.future.done():
            self.future.set_result(result)
