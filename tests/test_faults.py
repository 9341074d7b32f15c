"""Faults inside the engine: a failed batch fails only its own windows; a worker that fails anywhere fails
exactly what it held and is restarted; out-of-memory batches are split and retried after their memory is
freed; stopping answers everything queued or held; abandoned rows leave the running decode batch between two
tokens; the decoder pool shrinks under load without losing or repeating a row; and through a real server a
faulty request gets a JSON error while its neighbours succeed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from app.audio import decode_audio
from configs import Settings
from loadtest.evalset import normalize
from loadtest.faults import in_process_server
from tests.conftest import JFK, JFK_TEXT, Quiet, free_port, wav_bytes
from workers.decoding import INITIAL_CACHE, DecodingOptions, BatchDecoder
from workers.jobs import Job, WindowOptions
from workers.packing import EncodedWindow, PassInput
from workers.runner import ModelRunner, embedded_model_path
from workers.scheduler import BatchPolicy, Priority
from workers.stages import DecoderStage, Stage, StageError, StageStopped

NO_OPTIONS = WindowOptions(language="en", prompt=())


def job(offset_s: float = 0.0, samples: int = 16, options: WindowOptions = NO_OPTIONS) -> Job:
    return Job(audio=np.ones(samples, np.float32), offset_s=offset_s, priority=Priority.BULK, options=options)


class Counting(Quiet):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def windows_failed(self, stage, count):
        self.counts["failed"] += count

    def windows_abandoned(self, stage, count):
        self.counts["abandoned"] += count

    def worker_restarted(self, stage):
        self.counts["restarts"] += 1


def test_a_fault_in_one_batch_fails_only_its_jobs_and_the_worker_goes_on() -> None:
    def compute(jobs: list[Job]) -> list[float]:
        if any(job.offset_s < 0 for job in jobs):  # the injected fault
            raise RuntimeError("injected fault")
        return [float(np.sum(job.audio)) for job in jobs]

    async def main():
        stage = Stage("post", "cpu", BatchPolicy(1, 0, 100), 2, 2, compute, Quiet())
        stage.start()
        jobs = [job(-1.0 if i == 5 else 0.0) for i in range(20)]
        for j in jobs:
            await stage.put(j)
        outcomes = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        await stage.stop()
        return outcomes

    outcomes = asyncio.run(main())
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [5] and "post stage failed on this request's batch: RuntimeError" in str(outcomes[5])
    assert all(o == 16.0 for i, o in enumerate(outcomes) if i != 5)  # before and after the fault, on the same workers


def test_a_batch_out_of_memory_is_split_until_it_fits_and_a_job_that_never_fits_fails_alone() -> None:
    batch_sizes: list[int] = []

    def compute(jobs: list[Job]) -> list[float]:
        batch_sizes.append(len(jobs))
        if len(jobs) > 2 or any(j.offset_s == 6 for j in jobs):  # a GPU with room for two windows; window 6 never fits
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [j.offset_s for j in jobs]

    async def main():
        observer = Counting()
        stage = Stage("acoustic", "gpu", BatchPolicy(8, 1000, 100), 1, 1, compute, observer)
        jobs = [job(float(i)) for i in range(7)]
        for j in jobs:
            await stage.put(j)
        stage.start()  # all seven wait, so the first batch takes them together
        outcomes = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 10)
        await stage.stop()
        return outcomes, observer.counts

    outcomes, counts = asyncio.run(main())
    assert outcomes[:6] == [float(i) for i in range(6)]  # every other job once, in order
    assert isinstance(outcomes[6], StageError) and "OutOfMemoryError" in str(outcomes[6])
    assert batch_sizes == [7, 3, 1, 2, 4, 2, 2, 1, 1]
    assert counts == {"failed": 1}  # only the row involved, and no worker restarted


def test_a_worker_that_fails_outside_its_compute_fails_what_it_held_and_is_restarted() -> None:
    handed_on: list[int] = []

    class FailingOnce(Counting):
        def batch_done(self, stage, size, busy_s):
            if not self.counts["boom"]:
                self.counts["boom"] += 1
                raise RuntimeError("observer fault (injected)")

    async def main():
        observer = FailingOnce()
        first = Stage("features", "cpu", BatchPolicy(2, 0, 100), 1, 1, lambda jobs: [j.offset_s for j in jobs], observer)
        second = Stage("post", "cpu", BatchPolicy(1, 0, 100), 1, 1, lambda jobs: [handed_on.append(int(j.offset_s)) or j.data for j in jobs], Quiet())
        first.next, second.upstream = second, [first]
        jobs = [job(float(i)) for i in range(10)]
        for j in jobs:
            await first.put(j)
        first.start()
        second.start()
        outcomes = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 10)
        restarts = first.snapshot().restarts
        await first.stop()
        await second.stop()
        return outcomes, observer.counts, restarts

    outcomes, counts, restarts = asyncio.run(main())
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [0, 1]  # the first batch, held when the fault hit
    assert "features stage failed on this request's batch: RuntimeError" in str(outcomes[0])
    assert outcomes[2:] == [float(i) for i in range(2, 10)] and sorted(handed_on) == list(range(2, 10))
    assert restarts == 1 and counts["restarts"] == 1 and counts["failed"] == 2


def test_stop_answers_what_is_queued_and_what_a_worker_holds() -> None:
    started = threading.Event()

    def slow(jobs: list[Job]) -> list[float]:
        started.set()
        time.sleep(0.3)
        return [0.0 for _ in jobs]

    async def main():
        stage = Stage("acoustic", "cpu", BatchPolicy(1, 0, 100), 1, 1, slow, Quiet())
        jobs = [job(float(i)) for i in range(5)]
        for j in jobs:
            await stage.put(j)
        stage.start()
        while not started.is_set():
            await asyncio.sleep(0.01)
        await stage.stop()
        late = job()
        await stage.put(late)  # after the stop: answered at once
        return await asyncio.gather(*(j.future for j in [*jobs, late]), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, StageStopped) for o in outcomes), outcomes


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())


@pytest.fixture(scope="module")
def encoded_jfk(runner: ModelRunner) -> torch.Tensor:
    return runner.encode([PassInput.alone(runner.features(decode_audio(JFK.read_bytes(), 60)))])[0]


def decode_jobs(runner: ModelRunner, encoded: torch.Tensor, count: int) -> list[Job]:
    jobs = [job(samples=16000 * 11, options=WindowOptions("en", runner.prompt([], "en"))) for _ in range(count)]
    for j in jobs:
        j.data = EncodedWindow.alone(encoded)
    return jobs


def text_of(runner: ModelRunner, row) -> str:
    return normalize(runner.tokenizer.decode([t for t in row.tokens if t < runner.tokenizer.eot]))


def test_the_decoder_restarts_its_rows_in_smaller_batches_after_out_of_memory(runner, encoded_jfk, monkeypatch) -> None:
    step, running_at_fault = BatchDecoder.step, []

    def step_that_runs_out_of_memory_once(decoder: BatchDecoder):
        if decoder.running > 2 and not running_at_fault:
            running_at_fault.append(decoder.running)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return step(decoder)

    monkeypatch.setattr(BatchDecoder, "step", step_that_runs_out_of_memory_once)

    async def main() -> list[str]:
        stage = DecoderStage("gpu", BatchPolicy(8, 1000, 100), 1, 1, runner.new_decoder, Quiet())
        jobs = decode_jobs(runner, encoded_jfk, 4)
        for j in jobs:
            await stage.put(j)
        stage.start()
        rows = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 120)
        await stage.stop()
        return [text_of(runner, row) for row in rows]

    assert asyncio.run(main()) == [JFK_TEXT] * 4  # all four restarted from scratch and finished
    assert running_at_fault == [4]


def test_an_abandoned_row_leaves_the_running_batch_within_a_token(runner, encoded_jfk, monkeypatch) -> None:
    steps: list[int] = []  # rows in the batch at each step
    step = BatchDecoder.step

    def counting_step(decoder: BatchDecoder):
        steps.append(decoder.running)
        return step(decoder)

    monkeypatch.setattr(BatchDecoder, "step", counting_step)

    async def main():
        observer = Counting()
        stage = DecoderStage("cpu", BatchPolicy(16, 0, 100), 1, 1, runner.new_decoder, observer)
        # more rows than the decoder's first cache holds: the cache grows, and removing a row then moves another
        # within it (the move once failed on the grown cache's inference tensors)
        jobs = decode_jobs(runner, encoded_jfk, INITIAL_CACHE[0] + 1)
        for j in jobs:
            await stage.put(j)
        stage.start()
        while len(steps) < 5:
            await asyncio.sleep(0.001)
        cancelled_at = len(steps)
        jobs[1].future.cancel()  # the client of the second row has gone
        rows = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs if j is not jobs[1])), 120)
        await stage.stop()
        return cancelled_at, rows, observer.counts

    cancelled_at, rows, counts = asyncio.run(main())
    left_after = next(i for i in range(cancelled_at, len(steps)) if steps[i] < INITIAL_CACHE[0] + 1) - cancelled_at
    assert left_after <= 2, steps  # gone by the next step or the one after (one may be in flight when it is cancelled)
    assert counts["abandoned"] == 1 and [text_of(runner, r) for r in rows] == [JFK_TEXT] * INITIAL_CACHE[0]


def test_the_decoder_pool_shrinks_under_load_without_losing_or_repeating_a_row(runner, encoded_jfk) -> None:
    async def main():
        stage = DecoderStage("cpu", BatchPolicy(4, 0, 100), 1, 2, runner.new_decoder, Quiet())
        stage.start()
        stage.resize(2)
        jobs = decode_jobs(runner, encoded_jfk, 16)
        finished: Counter[int] = Counter()
        for j in jobs:
            j.future.add_done_callback(lambda f, j=j: finished.update([j.id]))
            await stage.put(j)
        while not stage.busy_workers:
            await asyncio.sleep(0.001)
        stage.resize(1)  # both workers hold running rows: one leaves once its rows are done
        rows = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 300)
        workers = len(stage._held)
        await stage.stop()
        return rows, finished, workers

    rows, finished, workers = asyncio.run(main())
    assert len(finished) == 16 and set(finished.values()) == {1}
    assert all(text_of(runner, r) == JFK_TEXT for r in rows)
    assert workers == 1


def test_a_fault_injected_into_one_request_through_the_server_leaves_the_others_alone(monkeypatch) -> None:
    jfk = decode_audio(JFK.read_bytes(), 60)
    faulty = jfk[: 16000 * 4 + 321]  # its length marks it
    encode = ModelRunner.encode

    def encode_unless_marked(self, mels):
        if marked.is_set():
            marked.clear()
            raise RuntimeError("injected fault")
        return encode(self, mels)

    marked = threading.Event()
    features = ModelRunner.features

    def features_marking(self, audio):
        if len(audio) == len(faulty):
            marked.set()  # the next encoder batch is the faulty window's (the encoder batches one window on the CPU)
        return features(self, audio)

    monkeypatch.setattr(ModelRunner, "features", features_marking)
    monkeypatch.setattr(ModelRunner, "encode", encode_unless_marked)
    with in_process_server(Settings(port=free_port())) as (url, service):
        with httpx.Client(base_url=url, timeout=120) as client:
            failed = client.post("/v1/transcribe", content=wav_bytes(faulty))
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda audio: client.post("/v1/transcribe", content=wav_bytes(audio)), [jfk] * 4))

    assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_error"
    assert "acoustic stage failed on this request's batch" in failed.json()["error"]["message"]
    assert "Traceback" not in failed.text and "injected" not in failed.text  # the cause's type, never its text
    for answer in answers:  # the others, after it, on the same workers
        assert answer.status_code == 200 and normalize(answer.json()["text"]) == JFK_TEXT


def test_options_a_client_sends_cannot_fail_the_batch_they_join() -> None:
    """Good and bad options mixed into one running batch: upper-case and padded languages are normalised,
    languages the model does not have are refused at the edge (400), odd prompts are only text; every good
    request gets its transcript."""
    jfk = JFK.read_bytes()
    cases = [({}, 200), ({"language": "EN"}, 200), ({"language": " en "}, 200), ({"language": "transcribe"}, 400),
             ({"language": "fr"}, 400), ({"language": "<|en|>"}, 400), ({"prompt": "<|endoftext|> \x00 ☃ " * 50}, 200),
             ({"prompt": "word " * 1000}, 200), ({}, 200)]
    with in_process_server(Settings(port=free_port())) as (url, service):
        with httpx.Client(base_url=url, timeout=180) as client, ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: client.post("/v1/transcribe", params=case[0], content=jfk), cases))
            after = client.post("/v1/transcribe", content=jfk)
    for (params, status), answer in zip(cases, answers):
        assert answer.status_code == status, (params, answer.text)
        if status == 200 and "prompt" not in params:
            assert normalize(answer.json()["text"]) == JFK_TEXT and answer.json()["language"] == "en"
        if status == 400:
            assert answer.json()["error"]["code"] == "unsupported_language"
    assert after.status_code == 200 and normalize(after.json()["text"]) == JFK_TEXT
