"""Fault injection under mixed load: the real server in this process, a seeded random fault injector on
the engine's real code paths, REST clients and live streams against it for a fixed time, and then the
question this tool exists to ask: was every caller answered, and did the server come back to rest?

- The server is the real app (app.main.create_app) under uvicorn in a thread of this process, on a free
  loopback port, so that the engine's classes can be patched where they are defined.
- Fault points (each call raises with probability `--fault-rate` once the server is ready; half of the
  faults are `torch.OutOfMemoryError`, half `RuntimeError`, see `--oom-share`):
  inside a batch's compute (the batch fails, or an out-of-memory batch is split and retried):
  `ModelRunner.features`, `ModelRunner.encode`, `BatchDecoder.add`, `BatchDecoder.step`,
  `PostProcessor.window_result`; outside it (the worker fails what it held and restarts):
  `BatchDecoder.__init__` (a worker making a new decoder), `Stage._hand_on`, and the metrics observer's
  `StageMetrics.batch_done` / `StageMetrics.window_done`. Calls made once per decoded token
  (`BatchDecoder.step`, and the decoder's `batch_done`) fault at `--fault-rate / --token-divisor`,
  so that every point fails about the same share of the windows through it; `--token-divisor 1` makes
  every call fault at `--fault-rate`.
- `--rest-clients` closed-loop clients POST /v1/transcribe with the eval rows of up to `--max-row-s`
  (16-bit WAV bodies); a client refused for load (429, 503) waits the Retry-After it is given.
- `--streams` clients each open a stream, play `--steps-per-session` rows into it at `--speed` times
  real time, and after each row send `finalize` (the step), then close; then open the next stream.
  Each `finalize` is followed at once by a second one, a probe: the server answers finalizes in order,
  and the probe's (empty) final says that the step's answer, a `final` or an `error` event, is out.
  While a step waits for its answer the client sends 100 ms of silence every 5 s, as a live microphone
  would, so that the server's idle timeout cannot end the wait first.
- Every wait on the server is bounded by `--timeout-s`: a REST call, a stream's handshake, a step's
  answer or a stream's close that hits it is a caller LEFT WAITING, the failure this tool looks for.

When the time is up the injector is switched off, no new call or step starts (a row being played is cut
short, finalized and closed), those in flight finish, and the server gets up to `--settle-s` to come to
rest: from GET /metrics and GET /v1/pipeline, every stage's queue depth and busy workers 0,
`asr_windows_in_flight` 0, `asr_streams_active` and `asr_stream_sessions_held` 0, and the workers
restarted (`asr_stage_worker_restarts_total`) exactly as many times as faults hit outside compute.
RSS is this process's (server and clients), from /proc/self/status, after the warm-up and at the end.
Every progress line also shows what the engine holds, read off its objects: windows in flight, how many
of them no stage queues or holds ("unaccounted": in passage between two stages, or lost), and per stage
the windows queued / held / busy workers; a caller left waiting is reported with that state.

Exit status 0 only if no caller was left waiting, every stream step was answered, every REST call got an
HTTP answer and every stream closed properly (1000 after `close`, no error event but an utterance's), no
session leaked, everything came back to 0 and the restarts were counted. The server's warnings and
errors are tallied; those no injected fault explains are listed (they do not fail the run).

Run: python -m loadtest.faults --duration-s 300 --fault-rate 0.03 --rest-clients 3 --streams 2 \\
         --plot loadtest/results/faults.png --json loadtest/results/faults.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from app.main import create_app
from app.metrics import StageMetrics
from configs import Settings
from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, word_error_rate
from loadtest.bench_rest import log
from loadtest.harness import RssSampled, binned, free_port, rss_mib, stream_url, wav_bytes
from loadtest.harness import write_json as harness_write_json
from loadtest.rest import non_negative_int, positive_float, positive_int
from loadtest.plotting import new_figure, save_figure
from loadtest.stream import LiveStream, decode_file, open_stream, refusal_text
from workers.decoding import BatchDecoder
from workers.postprocess import PostProcessor
from workers.runner import ModelRunner
from workers.stages import Stage

Json = dict[str, Any]
SAMPLE_RATE = 16000
DEFAULT_SET = "librispeech_test_other_resemblyzer"
LEFT_WAITING = "left waiting"
PROBE_GRACE_S = 1.0
KEEPALIVE_S = 5.0  # silence sent this often while a stream waits for an answer (the server's idle timeout is 30 s)  # the probe's final follows the step's answer at once; see StreamStep
BIN_S = 10.0


# ----------------------------------------------------------------------------- the fault injector


@dataclass(frozen=True)
class FaultPoint:
    name: str
    owner: type
    attribute: str
    supervised: bool  # outside a batch's compute: a fault there fails what the worker held and restarts it
    per_token: Callable[[tuple], bool] = lambda args: False  # called once per decoded token (given the call's args)
    where: Callable[[tuple], str] = lambda args: ""  # the stage a call is made for, where the call says


def _stage_of_self(args: tuple) -> str:
    return str(getattr(args[0], "name", "")) if args else ""


def _stage_argument(args: tuple) -> str:
    return str(args[1]) if len(args) > 1 else ""


FAULT_POINTS: tuple[FaultPoint, ...] = (
    FaultPoint("ModelRunner.features", ModelRunner, "features", False),
    FaultPoint("ModelRunner.encode", ModelRunner, "encode", False),
    FaultPoint("BatchDecoder.__init__", BatchDecoder, "__init__", True),
    FaultPoint("BatchDecoder.add", BatchDecoder, "add", False),
    FaultPoint("BatchDecoder.step", BatchDecoder, "step", False, lambda args: True),
    FaultPoint("PostProcessor.window_result", PostProcessor, "window_result", False),
    FaultPoint("Stage._hand_on", Stage, "_hand_on", True, where=_stage_of_self),
    # StageMetrics.batch_done(self, stage, size, busy_s): the decoder reports a batch per token step
    FaultPoint("StageMetrics.batch_done", StageMetrics, "batch_done", True, lambda args: _stage_argument(args) == "decoder", _stage_argument),
    FaultPoint("StageMetrics.window_done", StageMetrics, "window_done", True, where=_stage_argument),
)
SUPERVISED = frozenset(p.name for p in FAULT_POINTS if p.supervised)


class FaultInjector:
    """Wraps each point's function (sync or async, as the original) so that a call raises with the point's
    probability while `enabled`; thread-safe (compute runs on the stages' executor threads). The draws
    are seeded; their order follows the run's timing, so two runs are alike rather than identical."""

    def __init__(self, rate: float, seed: int, *, oom_share: float = 0.5, token_divisor: float = 40.0,
                 points: Sequence[FaultPoint] = FAULT_POINTS, origin: float | None = None):
        if not 0 <= rate <= 1 or not 0 <= oom_share <= 1 or token_divisor < 1:
            raise ValueError("need 0 <= rate <= 1, 0 <= oom_share <= 1 and token_divisor >= 1")
        self.rate, self.oom_share, self.token_divisor = rate, oom_share, token_divisor
        self.points = list(points)
        self.origin = time.monotonic() if origin is None else origin
        self.enabled = False
        self.calls: Counter[str] = Counter()  # while enabled
        self.injected: Counter[str] = Counter()
        self.injected_kinds: Counter[str] = Counter()  # "point: Kind"
        self.times: list[tuple[float, str, str, str]] = []  # (seconds since origin, point, exception type, stage)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._originals: list[tuple[type, str, Any]] = []

    def _draw(self, point: FaultPoint, args: tuple) -> BaseException | None:
        if not self.enabled:
            return None
        rate = self.rate / self.token_divisor if point.per_token(args) else self.rate
        with self._lock:
            self.calls[point.name] += 1
            if self._rng.random() >= rate:
                return None
            oom = self._rng.random() < self.oom_share
            kind = "OutOfMemoryError" if oom else "RuntimeError"
            self.injected[point.name] += 1
            self.injected_kinds[f"{point.name}: {kind}"] += 1
            self.times.append((time.monotonic() - self.origin, point.name, kind, point.where(args)))
        if oom:
            return torch.OutOfMemoryError(f"CUDA out of memory (fault injected at {point.name})")
        return RuntimeError(f"fault injected at {point.name}")

    def _wrap(self, point: FaultPoint, original: Any) -> Any:
        draw = self._draw
        if inspect.iscoroutinefunction(original):
            @functools.wraps(original)
            async def faulty_async(*args, **kwargs):
                if (error := draw(point, args)) is not None:
                    raise error
                return await original(*args, **kwargs)
            return faulty_async

        @functools.wraps(original)
        def faulty(*args, **kwargs):
            if (error := draw(point, args)) is not None:
                raise error
            return original(*args, **kwargs)
        return faulty

    def install(self) -> None:
        for point in self.points:
            original = point.owner.__dict__[point.attribute]  # the class's own function, never an inherited one
            self._originals.append((point.owner, point.attribute, original))
            setattr(point.owner, point.attribute, self._wrap(point, original))

    def uninstall(self) -> None:
        self.enabled = False
        while self._originals:
            owner, attribute, original = self._originals.pop()
            setattr(owner, attribute, original)

    @contextlib.contextmanager
    def installed(self) -> Iterator[FaultInjector]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    @property
    def total(self) -> int:
        return sum(self.injected.values())

    @property
    def supervised_total(self) -> int:
        return sum(n for name, n in self.injected.items() if name in SUPERVISED)


class JobTracker:
    """Not a fault: remembers every window put into a stage (weakly), so that a caller left waiting can be
    traced to its window: queued where, held by which stage, or in no stage at all since its last mark."""

    STALE_S = 15.0  # a window no stage queues or holds, untouched this long, is taken as lost

    def __init__(self) -> None:
        import weakref

        self.jobs: weakref.WeakSet = weakref.WeakSet()
        self._original: Any = None

    def install(self) -> None:
        self._original = original = Stage.__dict__["put"]
        jobs = self.jobs

        @functools.wraps(original)
        async def put(stage, job, *args, **kwargs):
            jobs.add(job)
            return await original(stage, job, *args, **kwargs)

        Stage.put = put

    def uninstall(self) -> None:
        if self._original is not None:
            Stage.put, self._original = self._original, None

    def pending(self, stages: Sequence[Stage]) -> list[Json]:
        """The windows not yet answered: where each is, and its last mark."""
        queued = {id(e.item): s.name for s in stages for q in s.scheduler._queues.values() for e in q}
        held = {id(j): s.name for s in stages for h in list(s._held.values()) for j in h}
        now, out = time.monotonic(), []
        for job in list(self.jobs):
            if job.future.done():
                continue
            marks = [(stage, event, getattr(t, event)) for stage, t in job.times.items()
                     for event in ("enqueued", "started", "finished") if getattr(t, event) is not None]
            last = max(marks, key=lambda m: m[2]) if marks else None
            where = f"queued in {queued[id(job)]}" if id(job) in queued else f"held by {held[id(job)]}" if id(job) in held else "in no stage"
            idle = round(now - last[2], 1) if last else None
            out.append({"job": job.id, "priority": job.priority.name, "audio_s": round(job.duration_s, 2), "where": where,
                        "last_mark": f"{last[0]} {last[1]}" if last else None, "since_last_mark_s": idle,
                        "lost": where == "in no stage" and idle is not None and idle > self.STALE_S})
        return out


# ----------------------------------------------------------------------------- the server and its logs


class LogTally(logging.Handler):
    """Counts the server's warnings and errors by message template, keeping the first traceback of each:
    the injected faults log theirs; anything else (a task exception never retrieved, an ASGI error) is news."""

    def __init__(self, echo: bool = False):
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.echo = echo
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.name}: {record.msg}"
        with self._lock:
            self.counts[key] += 1
            if key not in self.examples:
                text = record.getMessage()
                if record.exc_info:
                    text += "\n" + "".join(traceback.format_exception(*record.exc_info))
                self.examples[key] = text[-4000:]
        if self.echo:
            log(f"[server log] {record.levelname} {record.name}: {record.getMessage()}")

    def unexpected(self) -> dict[str, int]:
        """Messages that no injected fault explains: not a stage's failure report nor a stream's."""
        expected = ("stage ", "interim step failed", "final of utterance")
        return {k: n for k, n in self.counts.items() if not any(k.split(": ", 1)[-1].startswith(e) for e in expected)}


@contextlib.contextmanager
def in_process_server(settings: Settings, tally: LogTally | None = None, ready_timeout_s: float = 180) -> Iterator[tuple[str, Any]]:
    """The real app under uvicorn on a loopback port, in a thread of this process (as tests.test_faults'
    helper); yields the base URL and the service once /readyz answers 200."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")  # configures uvicorn's loggers
    if tally is not None:
        for name in ("", "uvicorn"):  # the engine's loggers propagate to the root; uvicorn's stop at "uvicorn"
            logging.getLogger(name).addHandler(tally)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if not thread.is_alive():
                raise RuntimeError("the server thread exited before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {ready_timeout_s:g} s")
            time.sleep(0.25)
        yield url, app.state.service
    finally:
        server.should_exit = True
        thread.join(60)
        if tally is not None:
            for name in ("", "uvicorn"):
                logging.getLogger(name).removeHandler(tally)


# ----------------------------------------------------------------------------- the plan and its records


@dataclass(frozen=True)
class FaultPlan:
    duration_s: float = 300.0
    fault_rate: float = 0.03
    rest_clients: int = 3
    streams: int = 2
    seed: int = 0
    speed: float = 1.0  # stream pace, times real time
    steps_per_session: int = 2  # rows played (each followed by a finalize) per stream before it closes
    timeout_s: float = 120.0  # the longest any caller waits on the server
    settle_s: float = 30.0
    oom_share: float = 0.5
    token_divisor: float = 40.0
    max_row_s: float = 12.0  # rows longer than this are not used: short calls, many of them
    progress_s: float = 10.0
    sample_s: float = 5.0
    warmup_fraction: float = 0.2
    frame_ms: int = 100


@dataclass
class RestCall:
    started_at: float
    ended_at: float
    audio: str
    reference: str
    outcome: str  # "ok", "HTTP 500 model_error", ..., LEFT_WAITING, "transport error (...)"
    status: int | None = None
    code: str | None = None
    text: str = ""
    error: str | None = None
    retry_after_s: float = 1.0

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class UtteranceEvent:
    """A final, or the error event that says its utterance could not be transcribed."""

    number: int | None
    kind: str  # final | error
    reason: str | None  # a final's reason; an error's code
    start: float | None
    end: float | None
    text: str
    received_at: float


@dataclass
class StreamStep:
    """One row played, then `finalize` (answered by a final or an error event) and the probe finalize.
    The server answers finalizes in order, each with one utterance event, and the probe's is always a
    final (reason finalize) at the stream position where both were sent, with nothing to transcribe: so
    the step's answer is the utterance event just before the probe's final."""

    audio: str
    reference: str
    position_s: float = 0.0  # stream seconds sent when the finalize went
    started_at: float = 0.0
    finalized_at: float | None = None
    answered_at: float | None = None
    answer: str | None = None  # final | error | None (see outcome)
    answer_code: str | None = None  # the error's code
    text: str = ""
    outcome: str = "pending"  # answered | LEFT_WAITING | "stream closed (...)" | "not sent (...)"
    audio_cut: bool = False  # the run's time was up while it played

    @property
    def answered(self) -> bool:
        return self.outcome == "answered"


@dataclass
class StreamSessionRecord:
    stream: int
    started_at: float
    ended_at: float | None = None
    steps: list[StreamStep] = field(default_factory=list)
    utterances: list[UtteranceEvent] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)  # error events that are not an utterance's
    closed_reason: str | None = None  # the `closed` event's
    close_code: int | None = None
    close_reason: str = ""
    problem: str | None = None  # refused, no connection, left waiting for ready or for the close, ...
    numbering_problem: str | None = None  # utterance numbers not 0, 1, 2, ... in order

    @property
    def clean_close(self) -> bool:
        return self.problem is None and self.close_code == 1000 and self.closed_reason == "client_close"


@dataclass
class Settled:
    """The server's state once the load is over: from GET /metrics and GET /v1/pipeline."""

    waited_s: float
    queue_depth: dict[str, float]
    busy_workers: dict[str, float]
    windows_in_flight: float
    streams_active: float
    sessions_held: float
    restarts: dict[str, float]  # asr_stage_worker_restarts_total by stage
    failed_windows: dict[str, float]
    abandoned_windows: dict[str, float]
    pipeline_engine: Json
    pipeline_stages: dict[str, Json]
    diagnostics: Json = field(default_factory=dict)  # read off the engine itself when something did not settle

    @property
    def at_rest(self) -> bool:
        pipeline_busy = any(s.get("queue_depth") or s.get("busy_workers") for s in self.pipeline_stages.values())
        engine = self.pipeline_engine
        return (not any(self.queue_depth.values()) and not any(self.busy_workers.values()) and not self.windows_in_flight
                and not self.streams_active and not self.sessions_held and not pipeline_busy
                and not engine.get("windows_in_flight") and not engine.get("windows_waiting") and not engine.get("streams_open"))


@dataclass
class FaultRun(RssSampled):
    plan: FaultPlan
    origin: float = field(default_factory=time.monotonic)
    injector: FaultInjector | None = None
    rest: list[RestCall] = field(default_factory=list)
    rest_in_flight: int = 0
    sessions: list[StreamSessionRecord] = field(default_factory=list)
    open_sessions: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)
    load_s: float = 0.0  # from the start to the last caller's answer
    settled: Settled | None = None
    tally: LogTally | None = None
    service: Any = None  # the in-process server's, for diagnostics only
    engine_states: list[tuple[float, Json]] = field(default_factory=list)  # per progress line: what the engine holds
    left_waiting_notes: list[Json] = field(default_factory=list)  # per caller left waiting: when, who, what the engine held

    tracker: JobTracker | None = None

    def engine_state(self, with_jobs: bool = False) -> Json:
        return engine_state(self.service, self.tracker, with_jobs) if self.service is not None else {}

    def note_left_waiting(self, who: str) -> None:
        """A caller hit its timeout: keep what the engine holds now (every window not yet answered, and
        where it is) and what it held at the last progress line."""
        now = self.engine_state(with_jobs=True)
        self.left_waiting_notes.append({"t": round(self.now(), 1), "who": who, "engine_now": now,
                                        "engine_before": self.engine_states[-1] if self.engine_states else None})
        log(f"faults {self.now():5.0f} s: LEFT WAITING: {who}; engine now {compact_state(now)}")
        for model, state in now.items():
            for window in state.get("pending_windows", []):
                log(f"    {model} window {window['job']} ({window['priority']}, {window['audio_s']} s): {window['where']}, "
                    f"last mark {window['last_mark']} {window['since_last_mark_s']} s ago{' -> LOST' if window['lost'] else ''}")

    def now(self) -> float:
        return time.monotonic() - self.origin

    def time_left(self) -> float:
        return self.plan.duration_s - self.now()

    # ---- figures
    def steps(self) -> list[StreamStep]:
        return [step for session in self.sessions for step in session.steps]

    def rest_outcomes(self) -> dict[str, int]:
        return dict(Counter(c.outcome for c in self.rest).most_common())

    def step_outcomes(self) -> dict[str, int]:
        return dict(Counter(s.outcome if not s.answered else f"answered by {s.answer}" for s in self.steps()).most_common())

    def left_waiting(self) -> dict[str, int]:
        """Callers that hit the client-side timeout, by what they waited for."""
        waiting: Counter[str] = Counter()
        waiting["REST call"] = sum(c.outcome == LEFT_WAITING for c in self.rest)
        waiting["stream step"] = sum(s.outcome == LEFT_WAITING for s in self.steps())
        for session in self.sessions:
            if session.problem and session.problem.startswith(LEFT_WAITING):
                waiting[session.problem] += 1
        return {k: n for k, n in waiting.items() if n}

    def rest_wer(self) -> float | None:
        """WER of the successful REST answers only (a failed call has no text to score)."""
        ok = [c for c in self.rest if c.ok]
        if not ok:
            return None
        return word_error_rate([c.reference for c in ok], [c.text for c in ok])

    def stream_wer(self) -> float | None:
        """WER of the stream steps answered by a final whose row was played whole: the step's finals
        (endpoint ones and the finalize one) against the row's reference. Steps with a failed utterance
        are left out: they lost words by design."""
        refs, hyps = [], []
        for session in self.sessions:
            for step in session.steps:
                if step.answered and step.answer == "final" and not step.audio_cut and step.text is not None:
                    refs.append(step.reference)
                    hyps.append(step.text)
        return word_error_rate(refs, hyps) if refs else None

    def restarts_total(self) -> float | None:
        return None if self.settled is None else sum(self.settled.restarts.values())

    def problems(self) -> list[str]:
        """Why the run fails; empty when it passes."""
        problems = [f"{what} left waiting x{n}" for what, n in self.left_waiting().items()]
        unanswered = [s for s in self.steps() if not s.answered and s.outcome != LEFT_WAITING and not s.outcome.startswith("not sent")]
        if unanswered:
            problems.append(f"stream steps not answered x{len(unanswered)} ({', '.join(sorted({s.outcome for s in unanswered}))})")
        unanswered_rest = Counter(c.outcome for c in self.rest if c.status is None and c.outcome != LEFT_WAITING)
        problems += [f"REST calls without an HTTP answer: {outcome} x{n}" for outcome, n in unanswered_rest.items()]
        ended_badly = Counter(s.problem for s in self.sessions if s.problem and not s.problem.startswith(LEFT_WAITING)
                              and not s.problem.startswith("refused"))
        problems += [f"stream sessions: {problem} x{n}" for problem, n in ended_badly.items()]
        other_errors = Counter(e for s in self.sessions for e in s.other_errors)
        problems += [f"stream error events {code} x{n}" for code, n in other_errors.items()]
        numbering = [s.numbering_problem for s in self.sessions if s.numbering_problem]
        if numbering:
            problems.append(f"utterance events out of order x{len(numbering)}: {numbering[0]}")
        if self.settled is None:
            problems.append("the server's state could not be read after the load")
        else:
            st = self.settled
            if st.streams_active or st.sessions_held or st.pipeline_engine.get("streams_open"):
                problems.append(f"stream sessions leaked: asr_streams_active {st.streams_active:g}, asr_stream_sessions_held "
                                f"{st.sessions_held:g}, /v1/pipeline streams_open {st.pipeline_engine.get('streams_open')}")
            if not st.at_rest:
                problems.append(f"not back to 0 after {st.waited_s:.0f} s: queue depth {st.queue_depth}, busy workers {st.busy_workers}, "
                                f"windows in flight {st.windows_in_flight:g}")
            if self.injector is not None and self.restarts_total() != self.injector.supervised_total:
                problems.append(f"worker restarts {self.restarts_total():g} != {self.injector.supervised_total} faults injected outside compute")
        return problems

    def progress(self) -> str:
        injected = self.injector.total if self.injector else 0
        rest = Counter("ok" if c.ok else LEFT_WAITING if c.outcome == LEFT_WAITING else "failed" for c in self.rest)
        steps = self.steps()
        answered = Counter(s.answer for s in steps if s.answered)
        rss = f"{self.rss[-1][1]:.0f} MiB" if self.rss else "n/a"
        return (f"faults {self.now():5.0f} s: {injected} faults injected; REST {rest['ok']} ok, {rest['failed']} failed, "
                f"{rest[LEFT_WAITING]} left waiting, {self.rest_in_flight} in flight; streams {len(self.sessions)} sessions "
                f"({self.open_sessions} open), steps {answered['final']} final + {answered['error']} error, "
                f"{sum(s.outcome == LEFT_WAITING for s in steps)} left waiting; RSS {rss}")

    def summary(self) -> Json:
        inj = self.injector
        steps = self.steps()
        utterances = [u for s in self.sessions for u in s.utterances]
        st = self.settled
        return {
            "plan": asdict(self.plan),
            "load_s": round(self.load_s, 1),
            "faults": {
                "total": inj.total if inj else 0,
                "by_point": dict(inj.injected) if inj else {},
                "by_point_and_kind": dict(sorted(inj.injected_kinds.items())) if inj else {},
                "calls_by_point": dict(inj.calls) if inj else {},
                "outside_compute": inj.supervised_total if inj else 0,
            },
            "rest": {"calls": len(self.rest), "outcomes": self.rest_outcomes(), "ok_wer": self.rest_wer()},
            "streams": {
                "sessions": len(self.sessions),
                "clean_closes": sum(s.clean_close for s in self.sessions),
                "session_problems": dict(Counter(s.problem for s in self.sessions if s.problem)),
                "close_codes": dict(Counter(str(s.close_code) for s in self.sessions)),
                "steps": len(steps),
                "steps_answered": sum(s.answered for s in steps),
                "steps_unanswered": sum(not s.answered for s in steps),
                "step_outcomes": self.step_outcomes(),
                "utterances_answered": dict(Counter(u.kind if u.kind == "final" else f"error {u.reason}" for u in utterances)),
                "other_error_events": dict(Counter(e for s in self.sessions for e in s.other_errors)),
                "finals_wer": self.stream_wer(),
            },
            "left_waiting": self.left_waiting(),
            "left_waiting_total": sum(self.left_waiting().values()),
            "settled": None if st is None else {**asdict(st), "at_rest": st.at_rest},
            "restarts_total": self.restarts_total(),
            "rss_start": self.rss_start,
            "rss_end": self.rss_end,
            "rss_growth_mib": self.rss_growth_mib,
            "server_log": {"counts": dict(self.tally.counts.most_common()) if self.tally else {},
                           "unexpected": self.tally.unexpected() if self.tally else {}},
            "problems": self.problems(),
        }


# ----------------------------------------------------------------------------- REST clients


async def rest_call(client: httpx.AsyncClient, url: str, row: EvalRow, body: bytes, run: FaultRun) -> RestCall:
    started = run.now()
    run.rest_in_flight += 1
    call = RestCall(started, started, row.audio.name, row.text, "pending")
    try:
        response = await asyncio.wait_for(client.post(f"{url}/v1/transcribe", content=body, headers={"content-type": "audio/wav"}),
                                          run.plan.timeout_s + 5)
        call.status = response.status_code
        with contextlib.suppress(ValueError):
            call.retry_after_s = min(10.0, float(response.headers.get("retry-after", 1)))
        if response.status_code == 200:
            call.text, call.outcome = response.json()["text"], "ok"
        else:
            try:
                call.code = response.json()["error"]["code"]
                call.error = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                call.error = response.text[:200]
            call.outcome = f"HTTP {response.status_code} {call.code or '?'}"
    except (httpx.TimeoutException, TimeoutError) as exc:
        call.outcome, call.error = LEFT_WAITING, f"{type(exc).__name__} after {run.now() - started:.0f} s"
        run.note_left_waiting(f"REST call {row.audio.name} (sent at {started:.1f} s)")
    except httpx.HTTPError as exc:
        call.outcome, call.error = f"transport error ({type(exc).__name__})", str(exc)[:200]
    except (ValueError, KeyError, TypeError) as exc:
        call.outcome, call.error = "bad body", repr(exc)[:200]
    finally:
        run.rest_in_flight -= 1
    call.ended_at = run.now()
    run.rest.append(call)
    return call


async def rest_loop(k: int, client: httpx.AsyncClient, url: str, rows: Sequence[EvalRow], bodies: dict[Path, bytes], run: FaultRun) -> None:
    index = k * len(rows) // max(1, run.plan.rest_clients)
    while run.time_left() > 0:
        row = rows[index % len(rows)]
        call = await rest_call(client, url, row, bodies[row.audio], run)
        index += 1
        if call.status in (429, 503):  # refused for load: a client retries after the pause the server asks for
            await asyncio.sleep(min(call.retry_after_s, max(0.0, run.time_left())))


# ----------------------------------------------------------------------------- stream clients

_UTTERANCE_IN_ERROR = re.compile(r"utterance (\d+)")
UTTERANCE_ERRORS = ("final_failed", "overloaded")


class SessionDriver:
    """One stream session: sends rows and finalizes, reads events, resolves each step (see StreamStep)."""

    def __init__(self, live: LiveStream, record: StreamSessionRecord, run: FaultRun):
        self.live, self.record, self.run = live, record, run
        self.events: list[Json] = []
        self.changed = asyncio.Event()
        self.ended = False
        self.samples_sent = 0
        self._consumed = 0  # utterance events up to the last step's probe

    async def receive(self) -> None:
        try:
            async for event in self.live.events():
                self._take(event.data)
                self.changed.set()
        finally:
            self.ended = True
            self.changed.set()

    def _take(self, data: Json) -> None:
        self.events.append(data)
        kind = data.get("type")
        record = self.record
        if kind == "final":
            record.utterances.append(UtteranceEvent(data.get("utterance"), "final", data.get("reason"), data.get("start"),
                                                    data.get("end"), str(data.get("text", "")), self.run.now()))
        elif kind == "error" and data.get("code") in UTTERANCE_ERRORS and (m := _UTTERANCE_IN_ERROR.search(str(data.get("message", "")))):
            record.utterances.append(UtteranceEvent(int(m.group(1)), "error", data.get("code"), None, None, "", self.run.now()))
        elif kind == "error":
            record.other_errors.append(str(data.get("code", "?")))
        elif kind == "closed":
            record.closed_reason = data.get("reason")
        else:
            return
        if kind in ("final", "error") and record.utterances and record.numbering_problem is None:
            numbers = [u.number for u in record.utterances]
            if numbers != list(range(len(numbers))):
                record.numbering_problem = f"utterance numbers {numbers[-6:]} after {len(numbers)} events"

    async def wait(self, condition: Callable[[], Any], timeout_s: float) -> Any:
        """Until `condition()` is truthy (returned), the stream ends (None) or the time is up (TimeoutError)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if (value := condition()) or self.ended:
                return value or None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def play(self, audio: np.ndarray, step: StreamStep) -> None:
        """At `speed` x real time; stops early (after at least a second) once the run's time is up."""
        plan = self.run.plan
        frame = SAMPLE_RATE * plan.frame_ms // 1000
        t0 = time.monotonic()
        for k, start in enumerate(range(0, audio.size, frame)):
            if self.ended:
                return
            if self.run.time_left() <= 0 and start >= SAMPLE_RATE:
                step.audio_cut = True
                return
            due = t0 + k * (frame / SAMPLE_RATE) / plan.speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            chunk = audio[start : start + frame]
            await self.live.send_audio(chunk)
            self.samples_sent += chunk.size

    def _resolve(self, step: StreamStep, first_utterance: int) -> tuple[UtteranceEvent, UtteranceEvent | None] | None:
        """(the probe's final, the step's answer) once they are known, else None. `first_utterance`: how many
        utterance events had come before this step's finalize."""
        mine = self.record.utterances[first_utterance:]
        at_position = [i for i, u in enumerate(mine) if u.kind == "final" and u.reason == "finalize"
                       and u.start is not None and u.end is not None and abs(u.end - step.position_s) < 2e-3]
        if len(at_position) >= 2:  # the step's own final (empty: its speech had ended before), then the probe's
            i = at_position[-1]
            return mine[i], mine[i - 1]
        if len(at_position) == 1:
            i = at_position[0]
            final = mine[i]
            if abs(final.start - final.end) >= 2e-3:
                return None  # the step's final, with speech: the probe's is still to come
            before = mine[i - 1] if i > 0 else None
            if before is not None and before.kind == "error":
                return final, before  # the probe, after the step's error (or a real empty final after an endpoint's error: see PROBE_GRACE_S)
            return None  # an empty final: the step's, with the probe to come (or the probe after a step answered before this step's events)
        return None

    async def step(self, step: StreamStep, audio: np.ndarray) -> None:
        run = self.run
        step.started_at = run.now()
        await self.play(audio, step)
        if self.ended:
            step.outcome = self._closed_outcome()
            return
        first = len(self.record.utterances)
        step.position_s = round(self.samples_sent / SAMPLE_RATE, 3)
        try:
            await self.live.send_json({"type": "finalize"})
            await self.live.send_json({"type": "finalize"})  # the probe
        except ConnectionClosed:
            step.outcome = self._closed_outcome()
            return
        step.finalized_at = run.now()
        keepalive = asyncio.create_task(self._keep_alive())
        try:
            resolved = await self.wait(lambda: self._resolve(step, first), run.plan.timeout_s)
            if resolved is not None and resolved[1] is not None and resolved[1].kind == "error":
                # a second final at this position within the grace means the error was an endpoint's
                with contextlib.suppress(TimeoutError):
                    await self.wait(lambda: len([u for u in self.record.utterances[first:] if u.kind == "final"
                                                 and u.end is not None and abs(u.end - step.position_s) < 2e-3]) >= 2, PROBE_GRACE_S)
                resolved = self._resolve(step, first) or resolved
        except TimeoutError:
            step.outcome = LEFT_WAITING
            run.note_left_waiting(f"stream {self.record.stream} step {step.audio} (finalized at {step.finalized_at:.1f} s)")
            return
        finally:
            keepalive.cancel()
            await asyncio.wait([keepalive])
        if resolved is None:
            step.outcome = self._closed_outcome()
            return
        probe, answer = resolved
        step.answered_at = probe.received_at if answer is None else answer.received_at
        step.outcome = "answered"
        step.answer = answer.kind if answer is not None else "final"
        step.answer_code = answer.reason if answer is not None and answer.kind == "error" else None
        # the step's text: the finals since the previous step's probe (endpoint ones while it played, then its own)
        probe_at = first + self.record.utterances[first:].index(probe)
        step.text = " ".join(u.text for u in self.record.utterances[self._consumed : probe_at] if u.kind == "final" and u.text)
        self._consumed = probe_at + 1

    async def _keep_alive(self) -> None:
        """While a step waits for its answer: a live microphone keeps sending (silence), so the server's
        idle timeout does not end the wait before the client's own timeout does."""
        silence = np.zeros(SAMPLE_RATE * self.run.plan.frame_ms // 1000, dtype=np.float32)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                await self.live.send_audio(silence)
                self.samples_sent += silence.size

    def _closed_outcome(self) -> str:
        return f"stream closed ({self.live.close_code} {self.live.close_reason})".replace(" )", ")")


async def stream_session(k: int, url: str, rows: Sequence[EvalRow], audio: dict[Path, np.ndarray], run: FaultRun) -> StreamSessionRecord:
    plan = run.plan
    record = StreamSessionRecord(stream=k, started_at=run.now())
    run.sessions.append(record)
    run.open_sessions += 1
    try:
        async with open_stream(url, timeout_s=plan.timeout_s) as live:
            driver = SessionDriver(live, record, run)
            receiver = asyncio.create_task(driver.receive())
            try:
                try:
                    ready = await driver.wait(lambda: any(e.get("type") == "ready" for e in driver.events), plan.timeout_s)
                except TimeoutError:
                    record.problem = f"{LEFT_WAITING} for ready"
                    return record
                if not ready:
                    record.problem = "closed before ready"
                    return record
                for row in rows:
                    step = StreamStep(row.audio.name, row.text)
                    record.steps.append(step)
                    if run.time_left() <= 0 and len(record.steps) > 1:
                        step.outcome = "not sent (time up)"
                        record.steps.pop()
                        break
                    await driver.step(step, audio[row.audio])
                    if step.outcome == LEFT_WAITING or driver.ended:
                        break
                if not driver.ended:
                    with contextlib.suppress(ConnectionClosed):
                        await live.send_json({"type": "close"})
                    try:
                        await asyncio.wait_for(asyncio.shield(receiver), plan.timeout_s)
                    except TimeoutError:
                        record.problem = f"{LEFT_WAITING} for the close"
            finally:
                receiver.cancel()
                await asyncio.wait([receiver])
        record.close_code, record.close_reason = live.close_code, live.close_reason
    except InvalidStatus as exc:
        record.problem = f"refused: HTTP {exc.response.status_code} {refusal_text(exc.response.body)}"
    except TimeoutError:
        record.problem = f"{LEFT_WAITING} for the handshake"
    except (OSError, InvalidHandshake, ConnectionClosed) as exc:
        record.problem = f"no connection: {type(exc).__name__}"
    finally:
        run.open_sessions -= 1
        record.ended_at = run.now()
    if record.problem is None and record.close_code != 1000:
        record.problem = f"close code {record.close_code} {record.close_reason}".rstrip()
    return record


async def stream_loop(k: int, url: str, rows: Sequence[EvalRow], audio: dict[Path, np.ndarray], run: FaultRun) -> None:
    per = run.plan.steps_per_session
    index = k * len(rows) // max(1, run.plan.streams) + 7  # other rows than the REST clients start with
    while run.time_left() > 0:
        files = [rows[(index + j) % len(rows)] for j in range(per)]
        index += per
        record = await stream_session(k, url, files, audio, run)
        if record.problem and record.problem.startswith("refused"):
            await asyncio.sleep(1.0)


# ----------------------------------------------------------------------------- the server's state after the load


def _by_stage(families: dict, name: str, suffix: str = "") -> dict[str, float]:
    family = families.get(name)
    if family is None:
        return {}
    return {s.labels.get("stage", "?"): s.value for s in family.samples if s.name == name + suffix}


def _scalar(families: dict, name: str) -> float:
    family = families.get(name)
    return sum(s.value for s in family.samples if s.name == name) if family is not None else math.nan


async def read_state(client: httpx.AsyncClient, url: str, waited_s: float) -> Settled:
    text = (await client.get(f"{url}/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    pipeline = (await client.get(f"{url}/v1/pipeline")).json()
    return Settled(
        waited_s=waited_s,
        queue_depth=_by_stage(families, "asr_stage_queue_depth"),
        busy_workers=_by_stage(families, "asr_stage_busy_workers"),
        windows_in_flight=_scalar(families, "asr_windows_in_flight"),
        streams_active=_scalar(families, "asr_streams_active"),
        sessions_held=_scalar(families, "asr_stream_sessions_held"),
        restarts=_by_stage(families, "asr_stage_worker_restarts", "_total"),
        failed_windows=_by_stage(families, "asr_stage_failed_windows", "_total"),
        abandoned_windows=_by_stage(families, "asr_stage_abandoned_windows", "_total"),
        pipeline_engine=pipeline.get("engine", {}),
        pipeline_stages={s["name"]: {k: s.get(k) for k in ("workers", "busy_workers", "queue_depth")} for s in pipeline.get("stages", [])},
    )


def engine_state(service: Any, tracker: JobTracker | None = None, with_jobs: bool = False) -> Json:
    """A compact view of what the engine holds, read off its objects: windows in flight, and per stage
    the windows queued, held by workers (still awaited) and the busy workers. A window in flight that
    no stage queues or holds (``unaccounted``) is either passing between two stages or lost."""
    out: Json = {}
    with contextlib.suppress(Exception):
        for name, served in service.models.items():
            pipeline = served.engine._pipeline
            stages = {s.name: [len(s.scheduler), sum(not j.future.done() for h in s._held.values() for j in h), s.busy_workers]
                      for s in pipeline.stages}
            accounted = sum(q + h for q, h, _ in stages.values())
            out[name] = {"in_flight": pipeline.rate.in_flight, "unaccounted": pipeline.rate.in_flight - accounted,
                         "streams": len(served.engine._streams.sessions), "stages [queued, held, busy]": stages}
            if tracker is not None:
                pending = tracker.pending(pipeline.stages)
                out[name]["lost"] = sum(p["lost"] for p in pending)
                if with_jobs:
                    out[name]["pending_windows"] = pending
    return out


def compact_state(state: Json) -> str:
    """engine_state as one short line: in flight (unaccounted), then per stage queued/held/busy."""
    parts = []
    for model, m in state.items():
        stages = " ".join(f"{name[0]} {q}/{h}/{b}" for name, (q, h, b) in m["stages [queued, held, busy]"].items())
        lost = f", {m['lost']} LOST" if m.get("lost") else ""
        parts.append(f"{model}: {m['in_flight']} windows in flight ({m['unaccounted']} unaccounted{lost}), {m['streams']} sessions, "
                     f"queued/held/busy {stages}")
    return "; ".join(parts) or "n/a"


async def settle(url: str, run: FaultRun, service: Any) -> Settled:
    """Poll until everything is back to 0, at most `settle_s`; the last reading."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            waited = time.monotonic() - started
            state = await read_state(client, url, waited)
            if state.at_rest or waited >= run.plan.settle_s:
                break
            await asyncio.sleep(0.5)
    if not state.at_rest:  # what the engine holds, read off its objects: to describe the failure, never to judge it
        state.diagnostics = {"stream_connections": len(getattr(service, "stream_connections", ())),
                             "requests_in_flight": getattr(service, "requests_in_flight", None), **run.engine_state(with_jobs=True)}
    return state


# ----------------------------------------------------------------------------- the run


def pick_rows(manifest: Path, source_set: str, max_row_s: float) -> list[EvalRow]:
    rows = [r for r in load_rows(manifest, sets=[source_set]) if r.duration_s <= max_row_s]
    if not rows:
        raise ValueError(f"no WER rows of {source_set} up to {max_row_s:g} s")
    return rows


async def sample_rss(run: FaultRun) -> None:
    while True:
        run.rss.append((run.now(), rss_mib(os.getpid())))
        if run.time_left() <= 0:
            return
        await asyncio.sleep(min(run.plan.sample_s, max(run.time_left(), 0.01)))


async def drive(url: str, service: Any, rows: Sequence[EvalRow], audio: dict[Path, np.ndarray], bodies: dict[Path, bytes], run: FaultRun) -> None:
    plan = run.plan

    async def progress() -> None:
        while True:
            await asyncio.sleep(plan.progress_s)
            state = run.engine_state()
            run.engine_states.append((round(run.now(), 1), state))
            log(run.progress() + f"; engine {compact_state(state)}")

    async def stop_faults() -> None:
        await asyncio.sleep(max(0.0, run.time_left()))
        if run.injector is not None:
            run.injector.enabled = False  # the load's tail and the settling run without faults

    reporter, stopper = asyncio.create_task(progress()), asyncio.create_task(stop_faults())
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(plan.timeout_s, connect=30), limits=limits) as client:
            await asyncio.gather(
                *(rest_loop(k, client, url, rows, bodies, run) for k in range(plan.rest_clients)),
                *(stream_loop(k, stream_url(url), rows, audio, run) for k in range(plan.streams)),
                sample_rss(run),
            )
    finally:
        run.load_s = run.now()
        if run.injector is not None:
            run.injector.enabled = False
        for task in (reporter, stopper):
            task.cancel()
        await asyncio.wait([reporter, stopper])
    log(f"faults: load over after {run.load_s:.0f} s; waiting up to {plan.settle_s:g} s for the server to come to rest")
    run.settled = await settle(url, run, service)
    run.rss.append((run.now(), rss_mib(os.getpid())))


def run_faults(plan: FaultPlan, *, manifest: Path = DEFAULT_MANIFEST, source_set: str = DEFAULT_SET,
               echo_logs: bool = False) -> FaultRun:
    """The whole run of the module docstring; the injector is removed again before it returns."""
    rows = pick_rows(manifest, source_set, plan.max_row_s)
    audio = {row.audio: decode_file(row.audio) for row in rows}
    bodies = {path: wav_bytes(samples) for path, samples in audio.items()}
    tally = LogTally(echo=echo_logs)
    settings = Settings(port=free_port(), log_level="warning")
    injector = FaultInjector(plan.fault_rate, plan.seed, oom_share=plan.oom_share, token_divisor=plan.token_divisor)
    tracker = JobTracker()
    tracker.install()
    try:
        with injector.installed(), in_process_server(settings, tally) as (url, service):
            run = FaultRun(plan, injector=injector, tally=tally, service=service, tracker=tracker)
            injector.origin = run.origin
            injector.enabled = True
            log(f"faults: {plan.rest_clients} REST clients + {plan.streams} streams (speed {plan.speed:g}) for {plan.duration_s:g} s against "
                f"{url}, fault rate {plan.fault_rate:g} (per token step / {plan.token_divisor:g}), seed {plan.seed}; {len(rows)} rows")
            asyncio.run(drive(url, service, rows, audio, bodies, run))
    finally:
        tracker.uninstall()
    run.service = None  # the server is gone; what it held is in the records
    return run


# ----------------------------------------------------------------------------- report, plot, command line


def format_report(run: FaultRun) -> str:
    s = run.summary()
    faults, rest, streams, st = s["faults"], s["rest"], s["streams"], run.settled

    def counts(values: dict) -> str:
        return ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items()) or "none"

    def point(p: tuple[float, float] | None) -> str:
        return "n/a" if p is None else f"{p[1]:.1f} MiB (at {p[0]:.0f} s)"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    lines = [
        f"load               {run.plan.rest_clients} REST clients + {run.plan.streams} streams (speed {run.plan.speed:g}) for "
        f"{run.plan.duration_s:g} s (last answer at {run.load_s:.0f} s); fault rate {run.plan.fault_rate:g}, seed {run.plan.seed}",
        f"faults injected    {faults['total']} ({faults['outside_compute']} outside compute): {counts(faults['by_point'])}",
        f"  by kind          {counts(faults['by_point_and_kind'])}",
        f"  calls seen       {counts(faults['calls_by_point'])}",
        f"REST               {rest['calls']} calls: {counts(rest['outcomes'])}; WER of the successful {pct(rest['ok_wer'])}",
        f"stream sessions    {streams['sessions']} ({streams['clean_closes']} closed 1000 client_close); close codes {counts(streams['close_codes'])}; "
        f"problems {counts(streams['session_problems'])}",
        f"stream steps       {streams['steps']}: {streams['steps_answered']} answered, {streams['steps_unanswered']} not; {counts(streams['step_outcomes'])}",
        f"utterances         {counts(streams['utterances_answered'])}; other error events {counts(streams['other_error_events'])}; "
        f"WER of whole steps answered by a final {pct(streams['finals_wer'])}",
        f"LEFT WAITING       {s['left_waiting_total']} {('(' + counts(s['left_waiting']) + ')') if s['left_waiting'] else ''}".rstrip(),
    ]
    for note in run.left_waiting_notes:
        before = note["engine_before"]
        lines.append(f"  at {note['t']:5.0f} s     {note['who']}; engine then {compact_state(note['engine_now'])}"
                     + (f"; at {before[0]:.0f} s {compact_state(before[1])}" if before else ""))
    if st is not None:
        lines += [
            f"after {st.waited_s:4.1f} s       queue depth {counts(st.queue_depth)}; busy workers {counts(st.busy_workers)}",
            f"                   windows in flight {st.windows_in_flight:g}; streams active {st.streams_active:g}; sessions held {st.sessions_held:g}; "
            f"{'AT REST' if st.at_rest else 'NOT AT REST'}",
            f"worker restarts    {counts(st.restarts)} (total {sum(st.restarts.values()):g}; faults outside compute {faults['outside_compute']})",
            f"windows failed     {counts(st.failed_windows)}; abandoned {counts(st.abandoned_windows)}",
        ]
        if st.diagnostics:
            lines.append(f"engine holds       {json.dumps(st.diagnostics)}")
    growth = "n/a" if run.rss_growth_mib is None else f"{run.rss_growth_mib:+.1f} MiB"
    lines += [
        f"RSS                start {point(run.rss_start)}, end {point(run.rss_end)}, growth {growth}",
        f"server log         {sum(run.tally.counts.values()) if run.tally else 0} warnings/errors; not from an injected fault: "
        f"{counts(s['server_log']['unexpected'])}",
        f"verdict            {'; '.join(s['problems']) or 'PASS'}",
    ]
    return "\n".join(lines)


def save_plot(run: FaultRun, path: Path) -> None:
    """Top: faults injected per BIN_S, stacked by point. Bottom: answers per BIN_S by kind (REST ok,
    REST error, stream step final, stream step error) and callers left waiting, by when they came."""
    figure = new_figure(nrows=2, sharex=True, figsize=(11, 7))
    if figure is None:
        return
    fig, (ax_faults, ax_answers) = figure
    end = max(run.load_s, run.plan.duration_s)
    inj = run.injector
    bottom = None
    for name in (p.name for p in FAULT_POINTS):
        times = [t for t, point, *_ in (inj.times if inj else []) if point == name]
        if not times:
            continue
        edges, sums = binned(times, BIN_S, until=end)
        base = bottom if bottom is not None else [0.0] * len(sums)
        ax_faults.bar(edges[:-1], sums, width=BIN_S, align="edge", bottom=base, label=name)
        bottom = [a + b for a, b in zip(base, sums)]
    ax_faults.set_ylabel(f"faults per {BIN_S:g} s")
    ax_faults.set_title(f"fault rate {run.plan.fault_rate:g}: {inj.total if inj else 0} faults; "
                        f"{sum(run.left_waiting().values())} callers left waiting")
    ax_faults.legend(loc="upper right", fontsize="small", ncol=2)
    steps = run.steps()
    series = {
        "REST ok": [c.ended_at for c in run.rest if c.ok],
        "REST error": [c.ended_at for c in run.rest if not c.ok and c.outcome != LEFT_WAITING and c.status not in (429, 503)],
        "REST refused (429/503)": [c.ended_at for c in run.rest if c.status in (429, 503)],
        "step: final": [s.answered_at for s in steps if s.answered and s.answer == "final"],
        "step: error": [s.answered_at for s in steps if s.answered and s.answer == "error"],
        "left waiting (at its timeout)": [c.ended_at for c in run.rest if c.outcome == LEFT_WAITING]
        + [(s.finalized_at or s.started_at) + run.plan.timeout_s for s in steps if s.outcome == LEFT_WAITING],
    }
    bottom = None
    for label, times in series.items():
        edges, sums = binned(times, BIN_S, until=end)
        base = bottom if bottom is not None else [0.0] * len(sums)
        if len(base) < len(sums):
            base += [0.0] * (len(sums) - len(base))
        ax_answers.bar(edges[:-1], sums, width=BIN_S, align="edge", bottom=base[: len(sums)], label=label)
        bottom = [a + b for a, b in zip(base, sums)] + base[len(sums):]
    ax_answers.set_ylabel(f"answers per {BIN_S:g} s")
    ax_answers.set_xlabel("seconds since the start")
    ax_answers.legend(loc="upper right", fontsize="small")
    save_figure(fig, path)


def write_json(run: FaultRun, path: Path) -> None:
    body = {
        "summary": run.summary(),
        "faults": [{"t": round(t, 3), "point": p, "kind": k, "stage": w} for t, p, k, w in (run.injector.times if run.injector else [])],
        "rest": [asdict(c) for c in run.rest],
        "sessions": [asdict(s) for s in run.sessions],
        "rss": run.rss,
        "server_log_examples": run.tally.examples if run.tally else {},
        "left_waiting_notes": run.left_waiting_notes,
        "engine_states": run.engine_states,
    }
    harness_write_json(path, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=positive_float, default=300.0, help="length of the load (default: %(default)s)")
    parser.add_argument("--fault-rate", type=float, default=0.03, help="probability that a call at a fault point raises (default: %(default)s)")
    parser.add_argument("--rest-clients", type=non_negative_int, default=3, help="closed-loop REST clients (default: %(default)s)")
    parser.add_argument("--streams", type=non_negative_int, default=2, help="stream clients, one session at a time each (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws (default: %(default)s)")
    parser.add_argument("--speed", type=positive_float, default=1.0, help="stream pace, times real time (default: %(default)s)")
    parser.add_argument("--steps-per-session", type=positive_int, default=2, help="rows (each then finalized) per stream session (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=120.0, help="longest any caller waits: past it, it was LEFT WAITING (default: %(default)s)")
    parser.add_argument("--settle-s", type=positive_float, default=30.0, help="longest wait for the server to come to rest after the load (default: %(default)s)")
    parser.add_argument("--oom-share", type=float, default=0.5, help="share of the faults that are torch.OutOfMemoryError (default: %(default)s)")
    parser.add_argument("--token-divisor", type=float, default=40.0,
                        help="per-token calls (BatchDecoder.step, the decoder's batch_done) fault at fault-rate / this; 1: every call at fault-rate (default: %(default)s)")
    parser.add_argument("--max-row-s", type=positive_float, default=12.0, help="longest eval row used (default: %(default)s)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="eval manifest.jsonl (default: %(default)s)")
    parser.add_argument("--set", dest="source_set", default=DEFAULT_SET, help="source_set of the rows (default: %(default)s)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save a figure of faults and answers over time (needs matplotlib)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summary and every call, session and fault as JSON")
    parser.add_argument("--echo-logs", action="store_true", help="also print the server's warnings and errors as they come")
    args = parser.parse_args(argv)
    if not 0 <= args.fault_rate <= 1 or not 0 <= args.oom_share <= 1 or args.token_divisor < 1:
        parser.error("need 0 <= --fault-rate <= 1, 0 <= --oom-share <= 1 and --token-divisor >= 1")
    if not args.rest_clients and not args.streams:
        parser.error("no load: give --rest-clients or --streams")
    plan = FaultPlan(duration_s=args.duration_s, fault_rate=args.fault_rate, rest_clients=args.rest_clients, streams=args.streams,
                     seed=args.seed, speed=args.speed, steps_per_session=args.steps_per_session, timeout_s=args.timeout_s,
                     settle_s=args.settle_s, oom_share=args.oom_share, token_divisor=args.token_divisor, max_row_s=args.max_row_s)
    try:
        run = run_faults(plan, manifest=args.manifest, source_set=args.source_set, echo_logs=args.echo_logs)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    print(format_report(run), flush=True)
    if args.plot:
        save_plot(run, args.plot)
    if args.json:
        write_json(run, args.json)
    sys.exit(1 if run.problems() else 0)


if __name__ == "__main__":
    main()
