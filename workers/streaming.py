"""A live stream's session: voice activity, interim steps with LocalAgreement-2, and finals.

The session keeps the audio of the utterance in progress. Silero VAD marks speech; while speech goes
on, every ``step_s`` of new audio the whole utterance so far is transcribed as real-time work, and the
words on which two consecutive hypotheses agree are committed (LocalAgreement-2). A session never has
more than one interim step in flight, so under load its step grows instead of a backlog building up.
An utterance ends at an endpoint (``endpoint_silence_s`` of trailing silence; with none, the client
ends its turns), on ``finalize`` or ``close``, or before it would pass ``max_utterance_s``, where it is cut at the end of the last segment
whose words are all committed. Its final is transcribed once more on the whole utterance, ahead of all
interim work. Finals go out in order, and their text is the next utterance's decoder prompt. With
``context_s``, the audio of the utterances before (as far back as that) goes with each transcription too,
their finals' words forced as its start: a turn cut at a short pause is heard with what led up to it.

Nothing here knows about WebSockets: the API feeds PCM in and receives :class:`SpeechStarted`,
:class:`Partial`, :class:`SpeechStopped`, :class:`Final` and :class:`StreamError` events through ``emit``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from configs.policies import StreamPolicy
from workers.features import N_SAMPLES, SAMPLE_RATE
from workers.jobs import Segment, WindowOptions
from workers.pipeline import Overloaded, Pipeline, Transcript
from workers.scheduler import Priority
from workers.vad import CHUNK_SAMPLES, CONTEXT_SAMPLES, SileroVAD

log = logging.getLogger(__name__)

MIN_STEP_AUDIO_S = 0.5  # no interim step on less audio than this
SETTLED_S = 2.0  # committed words this far from the end of the audio are forced as the next transcription's start
# words of earlier utterances forced as a transcription's start, at most: the decoder forces no more than half its token budget
CONTEXT_MAX_WORDS = 60


@dataclass(frozen=True)
class StreamOptions:
    """What one client asked for, normalised at the edge (the language is one the model knows)."""

    language: str | None = None
    interim_results: bool = True
    endpoint_silence_s: float | None = 0.6  # None: no endpoints, the client ends each turn (finalize)
    tenant: str = ""  # whose API key opened it (see WindowOptions.tenant)
    word_timestamps: bool = False  # finals carry their words with start and end
    vad_threshold: float | None = None  # speech probability of a speech chunk; None: the engine's
    prefix_padding_s: float | None = None  # audio kept before the first speech chunk; None: the engine's speech pad
    prompt: str | None = None  # the client's text before the stream's first words (names, terms); earlier finals follow it
    beam_size: int | None = None  # beams of its finals and of the steps at pauses (which may become finals); None: the engine's stream beam
    context_s: float = 0.0  # audio of earlier utterances (this far back) heard with each one, their words forced
    final_fallback: bool | None = None  # a final that fails Whisper's quality rules is decoded again hotter; None: the engine's


@dataclass(frozen=True)
class SpeechStarted:
    """An utterance has begun: it has enough speech to be transcribed (it is followed by its SpeechStopped,
    unless the client clears it or goes)."""

    utterance: int
    start: float  # stream seconds where it starts, its prefix padding included


@dataclass(frozen=True)
class SpeechStopped:
    """An utterance is over and its final is on its way."""

    utterance: int
    end: float  # stream seconds
    reason: str  # as its Final's


@dataclass(frozen=True)
class Partial:
    utterance: int
    text: str  # committed words, then the tentative tail
    stable: str  # the committed words only
    settled: str  # the first of them, which every later transcription of the utterance is made to begin with
    start: float  # stream seconds where the utterance starts
    latency_s: float  # from the step's newest audio to this event
    first: bool  # the utterance's first partial


@dataclass(frozen=True)
class Final:
    utterance: int
    text: str
    start: float
    end: float
    reason: str  # endpoint | finalize | close | max_length
    segments: list[Segment]
    latency_s: float  # from the moment the utterance was known to be over to this event
    language: str | None = None  # the stream's, or the one detected in the utterance (None: nothing was decoded)


@dataclass(frozen=True)
class StreamError:
    code: str
    message: str
    utterance: int | None = None  # the utterance whose final failed, if that is what failed


Event = SpeechStarted | Partial | SpeechStopped | Final | StreamError


class VoiceActivity:
    """Speech probability of each 32 ms chunk of one stream, the VAD state carried between frames."""

    def __init__(self, model: SileroVAD):
        self.model = model
        self.state = SileroVAD.initial_state()
        self.context = torch.zeros(CONTEXT_SAMPLES)
        self.pending = np.zeros(0, dtype=np.float32)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of the complete chunks in ``pending + audio``; the remainder waits."""
        audio = np.concatenate([self.pending, audio])
        complete = len(audio) // CHUNK_SAMPLES * CHUNK_SAMPLES
        self.pending = audio[complete:]
        if not complete:
            return np.zeros(0, dtype=np.float32)
        chunks = torch.from_numpy(audio[:complete])
        probabilities, self.state = self.model(chunks, self.context, self.state)
        self.context = chunks[-CONTEXT_SAMPLES:]
        return probabilities.numpy()


class StreamEngine:
    """What every session shares: the pipeline, the VAD model and the thread that runs it."""

    def __init__(self, pipeline: Pipeline, config: StreamPolicy,
                 window_options: Callable[[StreamOptions, str | None, str | None, str], WindowOptions]):
        self.pipeline = pipeline
        self.config = config
        self.window_options = window_options  # (stream options, prompt text, forced prefix, interim|pause|final) -> what the decoder is given
        self.vad_model = SileroVAD.load()
        # one thread: VAD costs 0.16 ms per 32 ms chunk, and must not take both cores from the model
        self._vad_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self.sessions: set[StreamSession] = set()

    async def run_vad(self, vad: VoiceActivity, audio: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._vad_executor, vad, audio)

    def open(self, options: StreamOptions, emit: Callable[[Event], None]) -> StreamSession:
        session = StreamSession(self, options, emit)
        self.sessions.add(session)
        return session

    def close(self) -> None:
        self._vad_executor.shutdown(wait=False, cancel_futures=True)


def _words_key(words: list[str]) -> list[str]:
    return [re.sub(r"[^\w']", "", w.lower()) for w in words]


def agreed_prefix(previous: list[str], current: list[str]) -> int:
    """How many leading words two hypotheses share (case and punctuation ignored): LocalAgreement-2."""
    n = 0
    for a, b in zip(_words_key(previous), _words_key(current)):
        if a != b:
            break
        n += 1
    return n


@dataclass
class _Said:
    """An utterance that has ended: where it lies in the stream, and once its final is out, its words."""

    start: int
    end: int
    words: list[str] | None = None


@dataclass
class _Step:
    """An interim transcription of the utterance from its start to ``end`` (stream samples)."""

    utterance: int
    start: int
    end: int
    task: asyncio.Task | None = None
    transcript: Transcript | None = None  # once done
    jobs: list = field(default_factory=list)  # its windows, to promote when a final waits for it
    heard_from: int | None = None  # once done: where the audio it was transcribed on began (earlier utterances heard with it)
    at_pause: bool = False  # started while the speech paused: if the pause is an endpoint, it is the final


class StreamSession:
    def __init__(self, engine: StreamEngine, options: StreamOptions, emit: Callable[[Event], None]):
        self.engine = engine
        self.config = engine.config
        self.reconfigure(options)
        self.emit = emit
        self.vad = VoiceActivity(engine.vad_model)
        self.received = 0  # samples received: the stream's clock
        self.vad_position = 0  # stream sample where the VAD's next chunk starts
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_start = 0  # stream sample of buffer[0]
        self.speaking = False
        self.utterance = 0
        self.utterance_start: int | None = None  # None: no speech since the last final
        self.started = False  # SpeechStarted was emitted for the utterance in progress
        self.utterance_detected_at = 0.0
        self.last_speech_end = 0
        self.speech_samples = 0  # in the utterance in progress
        self.hypothesis: list[str] = []
        self.committed: list[str] = []
        self.segments: list[Segment] = []  # of the last hypothesis, in stream seconds
        self.first_partial_sent = False
        self.previous_text: deque[str] = deque(maxlen=self.config.prompt_words)  # the prompt's words, no more
        self.said: deque[_Said] = deque()  # with context_s: the ended utterances whose audio is still kept, in order
        self.step: _Step | None = None  # the one interim step in flight
        self.last_step: _Step | None = None  # the utterance's latest finished step
        self.finals: list[asyncio.Task] = []  # in utterance order; each emits after the one before
        self.aborted = False

    def reconfigure(self, options: StreamOptions) -> None:
        """The client's options, or new ones mid-stream (its language, prompt, turn detection): they apply
        from the next chunk and the next transcription on."""
        self.options = options
        self.vad_threshold = options.vad_threshold or self.config.vad_threshold
        pad_s = options.prefix_padding_s if options.prefix_padding_s is not None else self.config.speech_pad_s
        self.prefix_pad = int(pad_s * SAMPLE_RATE)

    def _seconds(self, sample: int) -> float:
        return round(sample / SAMPLE_RATE, 3)

    def _audio(self, start: int, end: int) -> np.ndarray:
        return self.buffer[start - self.buffer_start : end - self.buffer_start].copy()

    async def feed(self, audio: np.ndarray) -> None:
        """Take float32 16 kHz PCM; may start an interim step or end the utterance."""
        self.buffer = np.concatenate([self.buffer, audio])
        self.received += len(audio)
        probabilities = await self.engine.run_vad(self.vad, audio)
        config, threshold = self.config, self.vad_threshold
        for probability in probabilities:
            start, end = self.vad_position, self.vad_position + CHUNK_SAMPLES
            self.vad_position = end
            if probability >= threshold:
                if self.utterance_start is None:
                    self.utterance_start = max(self.buffer_start, start - self.prefix_pad)
                    self.utterance_detected_at = time.monotonic()
                self.speaking = True
                self.last_speech_end = end
                self.speech_samples += CHUNK_SAMPLES
            elif probability < threshold - 0.15:  # hysteresis, as silero's own iterator
                self.speaking = False
        if self.utterance_start is not None and not self.started and self.speech_samples >= config.min_speech_s * SAMPLE_RATE:
            self.started = True
            self.emit(SpeechStarted(self.utterance, self._seconds(self.utterance_start)))
        if self.utterance_start is not None:
            silence = (self.received - self.last_speech_end) / SAMPLE_RATE
            endpoint = self.options.endpoint_silence_s
            if not self.speaking and endpoint is not None and silence >= endpoint:
                self._end_utterance(min(self.received, self.last_speech_end + self._trailing_pad), "endpoint")
            elif self.received >= (limit := self.utterance_start + int(config.max_utterance_s * SAMPLE_RATE)):
                # a frame may carry the utterance past its limit: the rest starts the next one
                self._end_utterance(self._committed_boundary() or limit, "max_length")
        self._trim()
        self._kick()

    @property
    def _trailing_pad(self) -> int:
        """Audio kept after the last speech chunk."""
        return int(self.config.speech_pad_s * SAMPLE_RATE)

    def finalize(self, reason: str = "finalize") -> None:
        """End the utterance now; a final follows even when nothing was said (its text is empty)."""
        if self.utterance_start is not None:
            self._end_utterance(self.received, reason)
        elif reason == "finalize":
            self._submit_final(_Step(self.utterance, self.received, self.received), reason, None)

    def clear(self) -> None:
        """Forget the audio not yet ended as an utterance (the client takes it back): no final for it."""
        self._cancel_step()
        self._reset_utterance(None)
        self.speaking = False
        self.buffer, self.buffer_start = np.zeros(0, dtype=np.float32), self.received
        self.said.clear()  # their audio is gone

    async def close(self) -> None:
        """Finish: the last final, then return once every event is out."""
        self.finalize("close")
        while self.finals:
            await asyncio.wait(self.finals)
        if self.step is not None and self.step.task is not None:
            self.step.task.cancel()
        self.engine.sessions.discard(self)

    def abort(self) -> None:
        """The client has gone: drop everything now."""
        self.aborted = True
        for task in [*self.finals, *([self.step.task] if self.step and self.step.task else [])]:
            task.cancel()
        self.buffer = np.zeros(0, dtype=np.float32)
        self.engine.sessions.discard(self)

    def _end_utterance(self, end: int, reason: str) -> None:
        start, step = self.utterance_start, None
        if self.speech_samples < self.config.min_speech_s * SAMPLE_RATE and reason != "max_length":
            self._cancel_step()
            self._reset_utterance(None)
            if reason == "finalize":  # always answered
                self._submit_final(_Step(self.utterance, end, end), reason, None)
            return
        # a step that already covers the utterance to its end is its final: no second transcription.
        # (Not at a length cut, where the step has words past the cut.)
        # (Nor a step decoded with fewer beams than a final: only a step at a pause has the final's.)
        for candidate in (self.last_step, self.step):
            if reason != "max_length" and candidate is not None and candidate.utterance == self.utterance and candidate.end >= end \
                    and (candidate.at_pause or self.options.beam_size is None):
                step = candidate
                break
        if step is None:
            self._cancel_step()
        self.emit(SpeechStopped(self.utterance, self._seconds(end), reason))
        if self.options.context_s:
            self.said.append(_Said(start, end))
        # past a length cut, committed words may lie beyond the cut: only a whole utterance starts with them
        self._submit_final(_Step(self.utterance, start, end), reason, step, self._settled(end) if reason != "max_length" else [])
        # a cut at max length leaves the speech after the cut to the next utterance
        self._reset_utterance(end if reason == "max_length" else None)

    def _cancel_step(self) -> None:
        """Drop the interim step of the utterance in progress: its hypothesis is of audio that is over."""
        if self.step is not None and self.step.utterance == self.utterance and self.step.task is not None:
            self.step.task.cancel()

    def _reset_utterance(self, start: int | None) -> None:
        self.utterance_start, self.speech_samples = start, 0
        self.hypothesis, self.committed, self.segments = [], [], []
        self.first_partial_sent, self.last_step, self.started = False, None, False

    def _submit_final(self, span: _Step, reason: str, covering: _Step | None, prefix: list[str] | None = None) -> None:
        floor = self._context_floor(span.start, span.end)
        audio = None if span.start == span.end else self._audio(floor, span.end)
        before = self.finals[-1] if self.finals else None
        task = asyncio.create_task(self._run_final(span, reason, audio, floor, covering, prefix or [], before, time.monotonic()))
        self.finals.append(task)
        task.add_done_callback(self.finals.remove)
        task.add_done_callback(lambda _: self._kick())  # an interim step may have waited for it (context_s)
        self.utterance += 1

    def _settled(self, end: int) -> list[str]:
        """The committed words a transcription up to ``end`` is made to begin with: those of the leading
        segments that ended SETTLED_S or more before ``end``. Words committed early, on a second or two of
        audio, are often wrong ("desiring" for "there's iron"); forced, a wrong one would stay to the final."""
        words: list[str] = []
        for segment in self._committed_segments():
            if segment.end > end / SAMPLE_RATE - SETTLED_S:
                break
            words += segment.text.split()
        return words

    def _committed_segments(self) -> Iterator[Segment]:
        """The leading segments of the last hypothesis all of whose words are committed."""
        words = 0
        for segment in self.segments:
            words += len(segment.text.split())
            if words > len(self.committed):
                return
            yield segment

    def _committed_boundary(self) -> int | None:
        """The end of the last segment all of whose words are committed, if past the first second."""
        boundary = None
        for segment in self._committed_segments():
            boundary = int(segment.end * SAMPLE_RATE)
        if boundary is None or boundary - self.utterance_start < SAMPLE_RATE or boundary > self.received:
            return None
        return boundary

    def _trim(self) -> None:
        """Keep the utterance in progress, or only the padding before speech may start; and with context_s,
        the ended utterances that begin no more than that before."""
        keep_from = self.utterance_start
        if keep_from is None:
            keep_from = max(self.buffer_start, self.received - self.prefix_pad)
        horizon = keep_from - int(self.options.context_s * SAMPLE_RATE)
        while self.said and self.said[0].start < horizon:
            self.said.popleft()
        if self.said:
            keep_from = min(keep_from, self.said[0].start)
        if keep_from > self.buffer_start:
            self.buffer = self.buffer[keep_from - self.buffer_start :]
            self.buffer_start = keep_from

    def _prompt(self, heard_words: int) -> str | None:
        """The client's prompt and the words of the earlier finals, but the last ``heard_words`` (forced instead)."""
        previous = list(self.previous_text)[: len(self.previous_text) - heard_words] if self.config.prompt_previous_text else []
        return " ".join([self.options.prompt, *previous] if self.options.prompt else previous) or None

    def _context_floor(self, start: int, end: int) -> int:
        """Where the audio a transcription from ``start`` to ``end`` may hear begins: ``context_s`` before it,
        within one window of its end, and still kept."""
        if not self.options.context_s:
            return start
        return min(start, max(self.buffer_start, start - int(self.options.context_s * SAMPLE_RATE), end - N_SAMPLES))

    def _context(self, start: int, floor: int) -> tuple[int, list[str]]:
        """The earlier utterances heard with the one from ``start``: the latest ones before it whose finals are
        out, beginning at ``floor`` or after, their words no more than CONTEXT_MAX_WORDS; where their audio
        begins, and their words."""
        begin, words = start, []
        for said in reversed(self.said):
            if said.start >= start:
                continue  # itself, or after it (the one before may overlap it by its padding)
            if not said.words or said.start < floor or len(words) + len(said.words) > CONTEXT_MAX_WORDS:
                break  # an empty final or one still on its way is no text to force: the audio before it is not heard
            begin, words = said.start, said.words + words
        return begin, words

    def _kick(self) -> None:
        """Start an interim step if one is due and none is in flight."""
        if self.step is None and not self.aborted and self._step_due():
            self.step = _Step(self.utterance, self.utterance_start, self.received, at_pause=not self.speaking)
            self.step.task = asyncio.create_task(self._run_step(self.step))

    def _step_due(self) -> bool:
        if self.utterance_start is None or (self.received - self.utterance_start) / SAMPLE_RATE < MIN_STEP_AUDIO_S:
            return False
        if self.options.context_s and self.finals:
            return False  # the final on its way is this utterance's context: a step without it would be done again
        covered = self.last_step.end if self.last_step is not None else self.utterance_start
        if self.options.interim_results and (self.received - covered) / SAMPLE_RATE >= self.config.step_s:
            return True
        # the speech has paused long enough to pad it: transcribe it now, so that if the pause turns
        # out to be an endpoint its final is (nearly) ready
        return not self.speaking and self.received >= self.last_speech_end + self._trailing_pad > covered

    async def _transcribe(self, audio: np.ndarray, floor: int, start: int, kind: str, submitted: list | None = None,
                          prefix: list[str] | None = None) -> tuple[Transcript, int]:
        """The utterance from ``start`` (``audio`` runs from ``floor`` to its end), and where the audio it was
        heard with began. ``kind``: interim, pause (see _Step.at_pause) or final. ``prefix``: settled committed words (see :meth:`_settled`) the transcript is made to
        begin with: only the rest of the utterance is decoded. Earlier utterances heard with it (see
        :meth:`_context`) are forced before them, and are not in the transcript returned."""
        begin, heard = self._context(start, floor)
        forced = heard + (prefix or [])
        options = self.engine.window_options(self.options, self._prompt(len(heard)), " ".join(forced) if forced else None, kind)
        if heard and not options.forced:  # too long to force: the utterance alone
            begin, heard = start, []
            options = self.engine.window_options(self.options, self._prompt(0), " ".join(prefix) if prefix else None, kind)
        priority = Priority.FINAL if kind == "final" else Priority.REALTIME
        transcript = await self.engine.pipeline.transcribe(audio[begin - floor :], options, priority, submitted)
        if heard:
            transcript = _without_heard(transcript, heard, (start - begin) / SAMPLE_RATE)
        return transcript, begin

    async def _run_step(self, step: _Step) -> Transcript | None:
        submitted = time.monotonic()
        floor = self._context_floor(step.start, step.end)
        try:
            step.transcript, step.heard_from = await self._transcribe(self._audio(floor, step.end), floor, step.start,
                                                                      "pause" if step.at_pause else "interim", step.jobs, self._settled(step.end))
        except Overloaded:
            return None  # the next step covers this audio too
        except Exception:  # noqa: BLE001 - an interim step that failed is skipped, the final will be tried
            log.exception("interim step failed")
            return None
        finally:
            self.step = None
            self._kick()
        if step.utterance == self.utterance:
            self.last_step = step
            self._hypothesis(step, submitted)
        return step.transcript

    def _hypothesis(self, step: _Step, submitted: float) -> None:
        """LocalAgreement-2 over the new hypothesis, and a partial unless a final is still on its way."""
        words = step.transcript.text.split()
        agreed = agreed_prefix(self.hypothesis, words)
        if agreed > len(self.committed):
            self.committed = words[:agreed]
        self.hypothesis = words
        self.segments = [_shifted(s, step.start / SAMPLE_RATE) for s in step.transcript.segments]
        if not self.options.interim_results or self.finals:
            return
        text = " ".join(self.committed + words[len(self.committed) :])
        first = not self.first_partial_sent
        self.first_partial_sent = True
        latency = time.monotonic() - (self.utterance_detected_at if first else submitted)
        self.emit(Partial(step.utterance, text, " ".join(self.committed), " ".join(self._settled(step.end)),
                          self._seconds(step.start), latency, first))

    async def _run_final(self, span: _Step, reason: str, audio: np.ndarray | None, floor: int, covering: _Step | None,
                         prefix: list[str], before: asyncio.Task | None, requested_at: float) -> None:
        said = next((s for s in reversed(self.said) if s.start == span.start), None)
        try:
            if covering is not None and covering.task is not None:
                self.engine.pipeline.promote(covering.jobs, Priority.FINAL)  # it is this final now: it must not wait as an interim step
                await asyncio.wait([covering.task])  # it already covers the utterance; None if it failed
            if self.options.context_s and before is not None:
                await asyncio.wait([before])  # its words are this one's context
            transcript = covering.transcript if covering is not None else None
            if transcript is not None and self.options.context_s and covering.heard_from != self._context(span.start, floor)[0]:
                transcript = None  # the step heard less than the final can now: a final before it came out meanwhile
            if transcript is None and audio is not None:
                transcript, _ = await self._transcribe(audio, floor, span.start, "final", prefix=prefix)
        except Exception as exc:  # noqa: BLE001 - the session goes on; the client learns this utterance is lost
            log.exception("final of utterance %d failed", span.utterance)
            if before is not None:
                await asyncio.wait([before])
            code = "overloaded" if isinstance(exc, Overloaded) else "final_failed"
            self.emit(StreamError(code, f"utterance {span.utterance} could not be transcribed: {exc}", span.utterance))
            return
        if before is not None:
            await asyncio.wait([before])  # finals go out in utterance order
        end_s = self._seconds(span.end)
        shifted = [_shifted(s, span.start / SAMPLE_RATE) for s in transcript.segments] if transcript is not None else []
        # a covering step heard a little past the utterance's end: nothing of it belongs here
        segments = [replace(s, end=min(s.end, end_s),
                            words=None if s.words is None else [replace(w, end=min(w.end, end_s)) for w in s.words if w.start < end_s])
                    for s in shifted if s.start < end_s]
        text = " ".join(s.text for s in segments)
        self.previous_text.extend(text.split())
        if said is not None:
            said.words = text.split()
        self.emit(Final(span.utterance, text, self._seconds(span.start), end_s, reason, segments,
                        time.monotonic() - requested_at, transcript.language if transcript is not None else self.options.language))


def _without_heard(transcript: Transcript, heard: list[str], offset_s: float) -> Transcript:
    """A transcript of earlier utterances' audio and then the utterance (from ``offset_s``), which begins with
    their words ``heard``: the utterance's part alone, its times from the utterance's start."""
    left, segments = len(heard), []
    for segment in transcript.segments:
        words = segment.text.split()
        drop = min(left, len(words))
        left -= drop
        if drop == len(words):
            continue
        kept = replace(segment, text=" ".join(words[drop:]), words=None if segment.words is None else segment.words[drop:])
        shifted = _shifted(kept, -offset_s)
        segments.append(replace(shifted, start=max(0.0, shifted.start), end=max(0.0, shifted.end)))
    return replace(transcript, segments=segments, duration_s=transcript.duration_s - offset_s)


def _shifted(segment: Segment, offset_s: float) -> Segment:
    words = None if segment.words is None else [
        replace(w, start=round(w.start + offset_s, 3), end=round(w.end + offset_s, 3)) for w in segment.words]
    return replace(segment, start=round(segment.start + offset_s, 3), end=round(segment.end + offset_s, 3), words=words)
