"""The pipeline: the four stages wired together, and the one call the API makes, ``transcribe``.

Audio longer than one window is cut at its quietest moments into windows of at most 30 s, all of which
go through the batched stages together; a window whose transcript stops at a segment boundary before
its end is decoded again from there, as Whisper's own ``transcribe`` seeks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from configs import Settings
from workers.features import CHUNK_SECONDS, SAMPLE_RATE
from workers.jobs import Job, Segment
from workers.postprocess import Guards, PostProcessor
from workers.runner import ModelRunner
from workers.scheduler import Priority
from workers.stages import Stage, StageObserver, build_stages

log = logging.getLogger(__name__)

MIN_CUT_S = 20.0  # a long file is cut between 20 and 30 s into each window, at its quietest 100 ms
MIN_REDECODE_S = 1.0  # less undecoded audio than this at a window's end is not decoded again
MAX_REDECODES = 3  # per window, so a decoder that keeps stopping early cannot loop


class Overloaded(Exception):
    """The pipeline's first queue has no room for this request's windows."""


@dataclass
class Transcript:
    segments: list[Segment]
    duration_s: float

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


class WindowRate:
    """How long the pipeline takes per window while it is busy, learned from the last windows it finished,
    and so how long a window admitted now would wait: the admission decision looks ahead with it, where the
    age of the oldest queued window would only say that it is already too late."""

    def __init__(self, initial_s: float, samples: int = 32):
        self.in_flight = 0  # windows submitted and not finished, queued or being worked on
        self._intervals: deque[float] = deque([initial_s], maxlen=samples)
        self._last = time.monotonic()

    def started(self) -> None:
        if self.in_flight == 0:
            self._last = time.monotonic()  # busy from now: the idle time before is not service time
        self.in_flight += 1

    def finished(self, worked: bool) -> None:
        self.in_flight -= 1
        if worked:
            now = time.monotonic()
            self._intervals.append(now - self._last)
            self._last = now

    @property
    def seconds_per_window(self) -> float:
        return sum(self._intervals) / len(self._intervals)

    def wait_s(self) -> float:
        """Predicted time until the windows in flight are done."""
        return self.in_flight * self.seconds_per_window


def plan_windows(audio: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most 30 s covering ``audio``, cut where it is quietest."""
    window, frame = CHUNK_SECONDS * SAMPLE_RATE, SAMPLE_RATE // 10
    windows, start = [], 0
    while len(audio) - start > window:
        lo, hi = start + int(MIN_CUT_S * SAMPLE_RATE), start + window
        frames = audio[lo:hi][: (hi - lo) // frame * frame].reshape(-1, frame)
        cut = lo + int(np.argmin((frames**2).mean(axis=1))) * frame + frame // 2
        windows.append((start, cut))
        start = cut
    windows.append((start, len(audio)))
    return windows


def rms_dbfs(audio: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(np.square(audio, dtype=np.float64))) + 1e-20)


class Pipeline:
    def __init__(self, runner: ModelRunner, settings: Settings, observer: StageObserver,
                 deliver: Callable[[Job], Awaitable[None]] | None = None, seconds_per_window: float = 1.0):
        self.runner = runner
        self.rate = WindowRate(seconds_per_window)
        self.silence_dbfs = settings.silence_threshold_dbfs
        guards = Guards(settings.no_speech_threshold, settings.logprob_threshold, settings.compression_ratio_threshold)
        self.stages: list[Stage] = build_stages(runner, PostProcessor(runner.tokenizer, guards), settings, observer, deliver)

    @property
    def entry(self) -> Stage:
        return self.stages[0]

    def start(self) -> None:
        for stage in self.stages:
            stage.start()

    async def stop(self) -> None:
        for stage in self.stages:
            await stage.stop()

    async def transcribe(self, audio: np.ndarray, *, priority: Priority = Priority.BULK,
                         language: str | None = None, prompt: str | None = None) -> Transcript:
        """Transcribe float32 16 kHz mono ``audio``; raises :class:`Overloaded` when the queue is full."""
        windows = plan_windows(audio)
        if not self.entry.scheduler.has_room(len(windows)):
            raise Overloaded(f"{len(self.entry.scheduler)} windows are waiting; this request needs room for {len(windows)}")
        prompt_tokens = self.runner.tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        pending: dict[asyncio.Future, tuple[Job, int, int]] = {}

        async def submit(start: int, end: int, redecodes: int) -> None:
            job = Job(audio=audio[start:end], offset_s=start / SAMPLE_RATE, priority=priority,
                      prompt_tokens=prompt_tokens, language=language)
            pending[job.future] = (job, end, redecodes)
            self.rate.started()
            job.future.add_done_callback(lambda f: self.rate.finished(not f.cancelled() and f.exception() is None))
            await self.entry.put(job)

        segments: list[Segment] = []
        try:
            for start, end in windows:
                if rms_dbfs(audio[start:end]) >= self.silence_dbfs:  # Whisper hallucinates on silence
                    await submit(start, end, 0)
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    job, end, redecodes = pending.pop(future)
                    result = future.result()
                    segments += result.segments
                    resume = int((job.offset_s + result.covered_s) * SAMPLE_RATE)
                    if (end - resume) / SAMPLE_RATE >= MIN_REDECODE_S and redecodes < MAX_REDECODES:
                        await submit(resume, end, redecodes + 1)
        finally:
            for future in pending:
                future.cancel()  # the caller has gone or a window failed: the rest is skipped
        segments.sort(key=lambda s: (s.start, s.end))
        return Transcript(segments=segments, duration_s=len(audio) / SAMPLE_RATE)
