"""Random faults on the engine's real code paths under mixed REST and streaming load (loadtest.faults, short):
every caller gets an answer, the workers that failed outside compute were restarted, the server comes back
to rest with nothing leaked, and the requests that succeeded have the right text.

One run (40 s of load after a 13 s start, on 2 cores) feeds all the tests of the module; a caller
waits at most 30 s here (the tool's default is 120 s), so that a caller left waiting fails the run
without making it long."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.audio import decode_audio
from loadtest.evalset import word_error_rate
from loadtest.faults import LEFT_WAITING, SUPERVISED, FaultPlan, FaultRun, format_report, run_faults
from tests.conftest import JFK, Quiet
from workers.decoding import DecodingOptions
from workers.jobs import Job, WindowOptions
from workers.packing import EncodedWindow, PassInput
from workers.runner import ModelRunner, embedded_model_path
from workers.scheduler import BatchPolicy, Priority
from workers.stages import DecoderStage

PLAN = FaultPlan(duration_s=40, fault_rate=0.05, rest_clients=2, streams=1, seed=7, speed=2.0, timeout_s=30, settle_s=15)


@pytest.fixture(scope="module")
def run() -> FaultRun:
    result = run_faults(PLAN)
    print(format_report(result))  # shown with -s, and on a failure
    return result


def test_faults_hit_many_points_and_the_workers_that_failed_were_restarted(run: FaultRun) -> None:
    injected = run.injector.injected
    assert len([point for point, n in injected.items() if n]) >= 4, dict(injected)
    assert run.injector.supervised_total >= 1, dict(injected)
    restarts = run.restarts_total()
    assert restarts is not None and restarts >= 1
    assert restarts == run.injector.supervised_total, (run.settled.restarts, {p: injected[p] for p in SUPERVISED})


def test_no_caller_was_left_waiting(run: FaultRun) -> None:
    assert run.left_waiting() == {}, format_report(run)
    assert not any(call.outcome == LEFT_WAITING for call in run.rest)
    assert run.rest and all(call.status is not None for call in run.rest), run.rest_outcomes()  # every call got an HTTP answer


def test_every_stream_step_was_answered_by_a_final_or_an_error(run: FaultRun) -> None:
    steps = run.steps()
    assert steps, "no stream step ran"
    assert all(step.answered for step in steps), run.step_outcomes()
    assert all(step.answer in ("final", "error") for step in steps)
    for session in run.sessions:
        assert session.numbering_problem is None, session.numbering_problem
        assert session.problem is None and session.clean_close, (session.problem, session.close_code, session.closed_reason)


def test_no_session_leaked_and_everything_came_back_to_zero(run: FaultRun) -> None:
    settled = run.settled
    assert settled is not None
    assert settled.streams_active == 0 and settled.sessions_held == 0
    assert settled.pipeline_engine["streams_open"] == 0
    assert set(settled.queue_depth) == {"features", "acoustic", "decoder", "post"}
    assert not any(settled.queue_depth.values()) and not any(settled.busy_workers.values())
    assert settled.windows_in_flight == 0 and settled.pipeline_engine["windows_in_flight"] == 0
    assert settled.at_rest, settled


def test_requests_still_succeed_with_the_right_text(run: FaultRun) -> None:
    ok = [call for call in run.rest if call.ok]
    assert ok, run.rest_outcomes()
    assert word_error_rate([c.reference for c in ok], [c.text for c in ok]) < 0.35
    finals = [step for step in run.steps() if step.answered and step.answer == "final" and not step.audio_cut]
    if finals:  # a stream whose every step lost its final to a fault still passes the tests above
        assert word_error_rate([s.reference for s in finals], [s.text for s in finals]) < 0.35


def test_a_fault_handing_on_a_finished_row_leaves_no_running_row_unanswered() -> None:
    """The case the run above exists to catch, pinned down: two rows in the running decode batch, the short
    one finishes first and handing it on fails (outside compute, so the worker restarts): the long row,
    still running in that worker's decoder, must be answered too (finished or failed), not dropped."""
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    jfk = decode_audio(JFK.read_bytes(), 60)
    windows = [jfk[: 16000 * 2], jfk]  # 2 s and 11 s: the short row leaves the batch long before the other
    encoded = [runner.encode([PassInput.alone(runner.features(audio))])[0] for audio in windows]

    class FailingOnce(Quiet):
        fired = 0

        def window_done(self, stage, waited_s, worked_s, audio_s):
            if stage == "decoder" and not self.fired:
                self.fired += 1
                raise RuntimeError("observer fault (injected)")

    async def main():
        stage = DecoderStage("cpu", BatchPolicy(8, 1000, 100), 1, 1, runner.new_decoder, FailingOnce())
        jobs = [Job(audio=audio, offset_s=0.0, priority=Priority.BULK, options=WindowOptions("en", runner.prompt([], "en")))
                for audio in windows]
        for job, data in zip(jobs, encoded):
            job.data = EncodedWindow.alone(data)
            await stage.put(job)
        stage.start()  # both wait, so the first decode batch takes them together
        await asyncio.wait([job.future for job in jobs], timeout=15)  # both rows take about 2 s on 2 cores
        answered = [job.future.done() for job in jobs]
        restarts = stage.restarts
        await stage.stop()
        return answered, restarts, [job.future.done() for job in jobs]

    answered, restarts, after_stop = asyncio.run(main())
    assert restarts == 1
    assert answered == [True, True], "the row still running when its worker failed was never answered"
    assert after_stop == [True, True]
