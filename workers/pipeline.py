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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from configs.policies import EnginePolicy, StagePolicy
from workers.decoding import DecodeRow
from workers.features import CHUNK_SECONDS, SAMPLE_RATE
from workers.jobs import Job, Segment, WindowOptions
from workers.packing import FirstFitPacker, PackingMode
from workers.postprocess import PostProcessor
from workers.runner import ModelRunner
from workers.scheduler import BatchPolicy, LiveWindows, Priority
from workers.stages import DecoderStage, Stage, StageObserver

log = logging.getLogger(__name__)

MIN_CUT_S = 20.0  # a long file is cut between 20 and 30 s into each window, at its quietest 100 ms
MIN_REDECODE_S = 1.0  # less undecoded audio than this at a window's end is not decoded again
MIN_WINDOW_S = 0.1  # a window shorter than this holds no word: it is not decoded (Whisper would make one up)
MAX_REDECODES = 3  # per window, so a decoder that keeps stopping early cannot loop
PROMPT_RESET_TEMPERATURE = 0.5  # a window decoded above this temperature is no context for the next (faster-whisper)


class Overloaded(Exception):
    """The pipeline's first queue has no room for this request's windows."""


@dataclass
class Transcript:
    segments: list[Segment]
    duration_s: float
    # the request's, or the one most of its windows' audio was detected in; None when no window was decoded
    language: str | None = None

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


@dataclass
class FileWindow:
    """One window of a file (see :func:`plan_windows`) once it is final: it and every window before it are
    decoded, so no later result changes it (a window's prompt may be the text before it)."""

    start_s: float  # in the file
    end_s: float
    segments: list[Segment] = field(default_factory=list)  # in order, with those of its end decoded again
    language: str | None = None  # detected in it, when its request gave none
    context: tuple[int, ...] = ()  # with condition_on_previous_text: the text tokens the window after it is prompted with

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


class WindowRate:
    """How long the pipeline takes per window while it is busy, learned from the last windows it finished,
    and so how long a window admitted now would wait: the admission decision looks ahead with it, where the
    age of the oldest queued window would only say that it is already too late."""

    def __init__(self, initial_s: float, samples: int = 32):
        self.in_flight = 0  # windows submitted and not finished, queued or being worked on
        # the warm-up's estimate counts as a quarter of the samples, each real sample replacing one of its copies:
        # windows decoded side by side finish in bursts, and a burst's first interval alone reads as the time of
        # one window (8 beam-search requests on a cold server were refused, 10.9 s predicted, with a single
        # copy), while a warm-up slowed by a neighbour must not outlast the first windows served
        self._prior = max(1, samples // 4)
        self._intervals: deque[float] = deque([initial_s] * self._prior, maxlen=samples)
        self._last = time.monotonic()
        self.on_finished: Callable[[], None] = lambda: None

    def started(self) -> None:
        if self.in_flight == 0:
            self._last = time.monotonic()  # busy from now: the idle time before is not service time
        self.in_flight += 1

    def finished(self, worked: bool) -> None:
        """A window is answered; only one that was worked to its end counts toward the rate."""
        self.in_flight -= 1
        if worked:
            now = time.monotonic()
            if self._prior:
                self._prior -= 1
                self._intervals.popleft()
            self._intervals.append(now - self._last)
            self._last = now
        self.on_finished()

    @property
    def seconds_per_window(self) -> float:
        return sum(self._intervals) / len(self._intervals)


@dataclass
class EncoderFill:
    """What the encoder's passes held, since the start: windows and seconds of audio per pass are its fill."""

    passes: int = 0
    windows: int = 0
    audio_s: float = 0.0

    def add(self, passes: int, windows: int, audio_s: float) -> None:
        self.passes += passes
        self.windows += windows
        self.audio_s += audio_s


@dataclass
class DecodeCounts:
    """What the decoder did, since the start: windows decoded, and windows decoded again at each fallback temperature."""

    windows: int = 0
    fallbacks: dict[float, int] = field(default_factory=dict)

    def add(self, row: DecodeRow) -> None:
        self.windows += 1
        for attempt in row.attempts[1:]:
            self.fallbacks[attempt.temperature] = self.fallbacks.get(attempt.temperature, 0) + 1


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


def build_stages(runner: ModelRunner, post: PostProcessor, policies: dict[str, StagePolicy], packing: PackingMode,
                 fill: EncoderFill, decoded: DecodeCounts, observer: StageObserver, live: LiveWindows) -> list[Stage]:
    """features -> acoustic -> decoder -> post, each with its batching policy, pool bounds and device; ``live``
    counts the live windows in flight, while which every stage holds its job windows back."""
    model_device = "gpu" if runner.device.type == "cuda" else "cpu"
    packer: FirstFitPacker[Job] = FirstFitPacker(policies["acoustic"].max_batch_size, packing,
                                                 size=lambda job: len(job.audio), tenant=lambda job: job.options.tenant)

    def features(jobs: list[Job]) -> list:
        return [runner.features(job.audio) for job in jobs]

    def acoustic(jobs: list[Job]) -> list:
        layouts, samples = packer.layout(jobs), [len(job.audio) for job in jobs]
        windows = runner.encode_windows(layouts, [job.data for job in jobs], samples)
        fill.add(len(layouts), len(jobs), sum(samples) / SAMPLE_RATE)
        return windows

    def postprocess(jobs: list[Job]) -> list:
        return [post.window_result(job.data, job.duration_s, job.offset_s) for job in jobs]

    def batching(p: StagePolicy) -> BatchPolicy:
        return BatchPolicy(p.max_batch_size, p.max_wait_ms, p.capacity, p.bulk_share, p.job_share, p.reserved_final, p.reserved_realtime)

    f, a, d, p = (policies[name] for name in ("features", "acoustic", "decoder", "post"))
    stages = [
        Stage("features", "cpu", batching(f), f.workers, f.max_workers, features, observer, live=live),
        Stage("acoustic", model_device, batching(a), a.workers, a.max_workers, acoustic, observer, packer, live),
        DecoderStage(model_device, batching(d), d.workers, d.max_workers, runner.new_decoder, observer, decoded.add, live),
        Stage("post", "cpu", batching(p), p.workers, p.max_workers, postprocess, observer, live=live),
    ]
    for i, stage in enumerate(stages):
        stage.upstream = stages[:i]
        stage.next = stages[i + 1] if i + 1 < len(stages) else None
    return stages


class Pipeline:
    def __init__(self, runner: ModelRunner, policy: EnginePolicy, observer: StageObserver, seconds_per_window: float = 1.0):
        self.runner = runner
        self.rate = WindowRate(seconds_per_window)
        self.fill = EncoderFill()
        self.decoded = DecodeCounts()
        self.live = LiveWindows(policy.jobs_yield_to_live)
        self.silence_dbfs = policy.silence_threshold_dbfs
        self.stages: list[Stage] = build_stages(runner, PostProcessor(runner.tokenizer, policy.guards), policy.stages,
                                                PackingMode(policy.encoder_packing), self.fill, self.decoded, observer, self.live)

    @property
    def entry(self) -> Stage:
        return self.stages[0]

    @property
    def decoder(self) -> DecoderStage:
        return next(stage for stage in self.stages if isinstance(stage, DecoderStage))

    def start(self) -> None:
        for stage in self.stages:
            stage.start()

    async def stop(self) -> None:
        """Every window still queued or in a worker's hands is answered (StageStopped)."""
        for stage in self.stages:
            await stage.stop()

    def promote(self, jobs: list[Job], priority: Priority) -> None:
        """Raise the priority of a transcription's windows (an interim step a final now waits for), wherever
        they wait; those being worked on keep it for the stages after."""
        for job in jobs:
            if job.priority > priority and not job.abandoned:
                for stage in self.stages:
                    if stage.scheduler.promote(job, priority):
                        break
                job.priority = priority

    async def transcribe(self, audio: np.ndarray, options: WindowOptions, priority: Priority = Priority.BULK,
                         submitted: list[Job] | None = None, on_window: Callable[[FileWindow], None] = lambda window: None,
                         done: Sequence[FileWindow] = (), lookahead: int | None = None) -> Transcript:
        """Transcribe float32 16 kHz mono ``audio``; raises :class:`Overloaded` when the first queue has
        no room for its windows at its priority. Each window's job is appended to ``submitted`` (so that
        :meth:`promote` can find them), and ``on_window`` is called with each window of :func:`plan_windows`
        as soon as it is final (it and every window before it are decoded), in order: the transcript is
        those windows' segments.

        With ``options.condition_on_previous_text`` each window's prompt is the text before it (Whisper's
        long-form context): every window is still submitted at once, so the encoder works on all of them
        as soon as it can, but the decoder stage parks each one until the window before is done.

        ``done``: the first windows, final from an earlier run (a job resumed after a restart): they are not
        transcribed again, and the next one's context is the last one's. ``lookahead``: at most this many
        windows in the stages at once (a long job's do not fill the queues); unset: all of them."""
        planned = plan_windows(audio)
        if any(round(w.start_s * SAMPLE_RATE) != start or round(w.end_s * SAMPLE_RATE) != end for w, (start, end) in zip(done, planned)) \
                or len(done) > len(planned):
            raise ValueError("the windows done before are not this audio's")
        wanted = len(planned) - len(done) if lookahead is None else min(lookahead, len(planned) - len(done))
        if not self.entry.scheduler.has_room(wanted, priority):
            raise Overloaded(f"{len(self.entry.scheduler)} windows are waiting; this request needs room for {wanted}")
        windows = [*done, *(FileWindow(start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in planned[len(done) :])]
        decoded = [index < len(done) for index in range(len(windows))]  # a window is decoded once its last job (itself, or its undecoded end) is done
        told = len(done)  # windows passed to on_window
        submitted_to = len(done)  # the next window to submit
        open_windows = 0  # submitted and not decoded
        pending: dict[asyncio.Future, tuple[Job, int, int, int]] = {}  # job, its window, the window's end, redecodes so far
        chained = options.condition_on_previous_text
        context = list(done[-1].context if done else options.context)  # the text tokens the next window is conditioned on
        held: deque[Job] = deque()  # with context: windows waiting for the text before them, in order

        def later(prompted: bool) -> WindowOptions:
            """A window's options after the first: no forced prefix; with context, the text so far as its prompt."""
            prompt = self.runner.prompt(context, options.language, options.task) if chained and prompted else options.prompt
            return replace(options, forced=(), prompt=prompt)

        async def submit(index: int, start: int, end: int, redecodes: int, priority: Priority, hold: bool) -> None:
            # only the first window's transcript begins with the forced prefix
            job = Job(audio=audio[start:end], offset_s=start / SAMPLE_RATE, priority=priority,
                      options=options if start == 0 else later(not hold), held=hold, resumed=redecodes > 0)
            if submitted is not None:
                submitted.append(job)
            pending[job.future] = (job, index, end, redecodes)
            if hold:
                held.append(job)
            self.rate.started()
            job.future.add_done_callback(lambda f: self.rate.finished(not f.cancelled() and f.exception() is None))
            if priority <= Priority.REALTIME:
                self.live.started()
                job.future.add_done_callback(lambda _: self.live.finished())
            await self.entry.put(job)

        def context_after() -> tuple[int, ...]:
            """What a window just final leaves the next one to be prompted with (kept on it for a resumed run)."""
            return tuple(context[-self.runner.options.max_prompt_tokens :]) if chained else ()

        async def submit_more() -> None:
            nonlocal submitted_to, open_windows
            while submitted_to < len(planned) and (lookahead is None or open_windows < lookahead):
                index, (start, end) = submitted_to, planned[submitted_to]
                submitted_to += 1
                # Whisper hallucinates on silence and on clicks
                if end - start >= MIN_WINDOW_S * SAMPLE_RATE and rms_dbfs(audio[start:end]) >= self.silence_dbfs:
                    open_windows += 1
                    await submit(index, start, end, 0, priority, hold=chained and bool(pending))
                else:
                    decoded[index] = True
                    windows[index].context = context_after()

        def tell_final() -> None:
            nonlocal told
            while told < len(windows) and decoded[told]:
                on_window(windows[told])
                told += 1

        heard: dict[str, float] = {}  # seconds of audio detected in each language
        for window in done:
            if window.language is not None:
                heard[window.language] = heard.get(window.language, 0.0) + window.end_s - window.start_s
        try:
            await submit_more()
            tell_final()  # the windows before the first with sound
            while pending:
                answered, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in answered:
                    job, index, end, redecodes = pending.pop(future)
                    result, window = future.result(), windows[index]
                    # a window's jobs run one after the other, each from where the one before stopped: in order
                    window.segments += result.segments
                    if result.language is not None:
                        heard[result.language] = heard.get(result.language, 0.0) + job.duration_s
                        window.language = window.language or result.language
                    if chained:
                        context += [token for segment in result.segments for token in segment.tokens]
                        if result.temperature > PROMPT_RESET_TEMPERATURE:
                            context.clear()  # a window that took a high temperature is a poor context (faster-whisper)
                    resume = int((job.offset_s + result.covered_s) * SAMPLE_RATE)
                    if (end - resume) / SAMPLE_RATE >= MIN_REDECODE_S and redecodes < MAX_REDECODES:
                        await submit(index, resume, end, redecodes + 1, job.priority, hold=False)  # promoted or not
                        continue
                    decoded[index] = True
                    open_windows -= 1
                    window.context = context_after()
                    if held:
                        await self.decoder.release(held.popleft(), later(True))
                await submit_more()
                tell_final()
        finally:
            for future in pending:
                future.cancel()  # the caller has gone or a window failed: the rest is dropped, even mid-decode
        return Transcript([segment for window in windows for segment in window.segments], len(audio) / SAMPLE_RATE,
                          options.language or max(heard, key=heard.__getitem__, default=None))
