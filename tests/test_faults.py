"""Faults inside the pipeline: a failed batch fails only its own requests, out-of-memory batches are split
and retried, and through a real server a faulty request gets a JSON error while its neighbours succeed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from app.audio import decode_audio
from app.main import create_app
from configs import Settings
from loadtest.evalset import normalize
from tests.conftest import JFK, JFK_TEXT, Quiet, free_port, wav_bytes
from workers.decoding import DecodingOptions, GreedyDecoder
from workers.jobs import Job
from workers.runner import ModelRunner, embedded_model_path
from workers.scheduler import BatchPolicy, Priority
from workers.stages import DecoderStage, Stage


def test_a_fault_in_one_batch_fails_only_its_jobs_and_the_worker_goes_on() -> None:
    def compute(jobs: list[Job]) -> None:
        if any(job.offset_s < 0 for job in jobs):  # the injected fault
            raise RuntimeError("injected fault")
        for job in jobs:
            job.result = float(np.sum(job.audio))

    async def main():
        stage = Stage("post", BatchPolicy(1, 0, 100), 2, 2, compute, Quiet())
        stage.start()
        jobs = [Job(audio=np.ones(16, np.float32), offset_s=-1.0 if i == 5 else 0.0, priority=Priority.BULK) for i in range(20)]
        for job in jobs:
            await stage.put(job)
        outcomes = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        await stage.stop()
        return outcomes

    outcomes = asyncio.run(main())
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [5] and "post stage failed on this request's batch: RuntimeError" in str(outcomes[5])
    assert all(o == 16.0 for i, o in enumerate(outcomes) if i != 5)  # before and after the fault, on the same workers


def test_a_batch_out_of_memory_is_split_until_it_fits() -> None:
    batch_sizes: list[int] = []

    def compute(jobs: list[Job]) -> None:
        batch_sizes.append(len(jobs))
        if len(jobs) > 2:  # what a GPU with room for two windows would do
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        for job in jobs:
            job.result = job.offset_s

    async def main():
        stage = Stage("acoustic", BatchPolicy(8, 1000, 100), 1, 1, compute, Quiet())
        jobs = [Job(audio=np.ones(16, np.float32), offset_s=float(i), priority=Priority.BULK) for i in range(7)]
        for job in jobs:
            await stage.put(job)
        stage.start()  # all seven wait, so the first batch takes them together
        outcomes = await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 10)
        await stage.stop()
        return outcomes

    assert asyncio.run(main()) == [float(i) for i in range(7)]  # every job once, in order
    assert batch_sizes == [7, 3, 1, 2, 4, 2, 2]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())


def test_the_decoder_restarts_its_rows_in_smaller_batches_after_out_of_memory(runner: ModelRunner, monkeypatch) -> None:
    step, running_at_fault = GreedyDecoder.step, []

    def step_that_runs_out_of_memory_once(decoder: GreedyDecoder):
        if decoder.running > 2 and not running_at_fault:
            running_at_fault.append(decoder.running)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return step(decoder)

    monkeypatch.setattr(GreedyDecoder, "step", step_that_runs_out_of_memory_once)
    encoded = runner.encode([runner.features(decode_audio(JFK.read_bytes(), 60))])[0]

    async def main() -> list[str]:
        stage = DecoderStage(BatchPolicy(8, 1000, 100), 1, 1, runner, Quiet())
        jobs = [Job(audio=np.zeros(16000 * 11, np.float32), offset_s=0.0, priority=Priority.BULK) for _ in range(4)]
        for job in jobs:
            job.encoded = encoded
            await stage.put(job)
        stage.start()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 120)
        await stage.stop()
        return [runner.tokenizer.decode([t for t in job.decoded.tokens if t < runner.tokenizer.eot]) for job in jobs]

    texts = asyncio.run(main())
    assert running_at_fault == [4]
    assert [normalize(t) for t in texts] == [JFK_TEXT] * 4  # all four restarted from scratch and finished


@contextlib.contextmanager
def in_process_server(settings: Settings) -> Iterator[tuple[str, object]]:
    """The real app under uvicorn on a loopback port, in a thread of this process, so a test can reach into
    its pipeline; yields the base URL and the service."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        yield url, app.state.service
    finally:
        server.should_exit = True
        thread.join(60)


def test_a_fault_injected_into_one_request_through_the_server_leaves_the_others_alone() -> None:
    jfk = decode_audio(JFK.read_bytes(), 60)
    faulty = jfk[: 16000 * 4 + 321]  # its length marks it

    with in_process_server(Settings(port=free_port())) as (url, service):
        acoustic = next(stage for stage in service.model(None).pipeline.stages if stage.name == "acoustic")
        encode = acoustic.process

        def encode_unless_marked(jobs: list[Job]) -> None:
            if any(len(job.audio) == len(faulty) for job in jobs):
                raise RuntimeError("injected fault")
            encode(jobs)

        acoustic.process = encode_unless_marked
        with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(5) as pool:
            posts = [pool.submit(client.post, "/v1/transcribe", content=wav_bytes(audio)) for audio in [jfk, jfk, faulty, jfk, jfk]]
            answers = [post.result() for post in posts]
            after = client.post("/v1/transcribe", content=JFK.read_bytes())

    failed = answers.pop(2)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_error"
    assert "acoustic stage failed on this request's batch" in failed.json()["error"]["message"]
    assert "Traceback" not in failed.text and "injected" not in failed.text  # the cause's type, never its text
    for answer in answers + [after]:  # the others, at the same time and after, on the same workers
        assert answer.status_code == 200 and normalize(answer.json()["text"]) == JFK_TEXT
