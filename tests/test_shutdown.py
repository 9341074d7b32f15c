"""Graceful shutdown of a real server process: SIGTERM in the middle of streams and REST requests."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import numpy as np
from websockets.exceptions import InvalidStatus

from app.audio import decode_audio
from loadtest.evalset import normalize, word_error_rate
from loadtest.realtime import play
from loadtest.stream import StreamClient, open_stream
from tests.conftest import JFK, JFK_TEXT, Server, wav_bytes
from workers.engine import SAMPLE_RATE


async def refusals_while_draining(server: Server) -> tuple[httpx.Response, httpx.Response, int]:
    """What a newcomer gets while the server drains: /readyz, a REST request and a stream handshake."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        ready = await client.get("/readyz")
        rest = await client.post("/v1/transcribe", content=JFK.read_bytes())
    try:
        async with open_stream(server.url.replace("http", "ws") + "/v1/stream", timeout_s=10):
            handshake = 101
    except InvalidStatus as refused:
        handshake = refused.response.status_code
    return ready, rest, handshake


def repeats_for(server: Server, seconds: float, jfk: np.ndarray) -> int:
    """How many JFK sentences one request must hold to keep this server busy for about ``seconds``: the
    drain must outlast the refusals the test asks for, on a fast machine as on a slow one."""
    probe = 12
    started = time.monotonic()
    answer = httpx.post(f"{server.url}/v1/transcribe", content=wav_bytes(np.concatenate([jfk] * probe)), timeout=120)
    answer.raise_for_status()
    return max(probe, round(probe * seconds / (time.monotonic() - started)))


def test_sigterm_drains_streams_and_requests_then_exits() -> None:
    server = Server(shutdown_timeout_s="120")
    try:
        server.wait_ready()
        jfk = decode_audio(JFK.read_bytes(), 60)
        # each request still being transcribed when the signal comes 6 s in, and while the newcomers are refused
        repeats = repeats_for(server, 8, jfk)
        long_file = wav_bytes(np.concatenate([jfk] * repeats))
        stream_url = server.url.replace("http", "ws") + "/v1/stream"

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                streams = [asyncio.create_task(StreamClient(stream_url, frame_ms=100).run_file(jfk)) for _ in range(2)]
                realtime = asyncio.create_task(play(server.url, jfk, manual=True))  # OpenAI's protocol, nothing committed yet
                # without context: conditioned on the same sentence said just before, Whisper skips some repeats,
                # and this test reads the text to know each answer is whole
                rests = [asyncio.create_task(client.post("/v1/transcribe", content=long_file, params={"condition_on_previous_text": "false"}))
                         for _ in range(2)]
                await asyncio.sleep(6)  # both streams are mid-sentence, both requests admitted
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.3)
                refused = await refusals_while_draining(server)
                records = await asyncio.gather(*streams)
                answers = await asyncio.gather(*rests)
                realtime_record = await realtime
            exit_code = await asyncio.to_thread(server.process.wait, 60)
            return records, answers, realtime_record, refused, exit_code, time.monotonic() - signalled

        records, answers, realtime_record, (ready, rest, handshake), exit_code, exit_s = asyncio.run(main())
    finally:
        server.stop()

    assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
    assert rest.status_code == 503 and rest.json()["error"]["code"] == "shutting_down" and "retry" in rest.json()["error"]["message"]
    assert handshake == 503
    for answer in answers:  # admitted before the signal: answered in full, to the file's last second
        assert answer.status_code == 200, answer.text
        # not a count of the repeats: Whisper mishears some of them ("my fellow America ask not")
        assert word_error_rate([" ".join([JFK_TEXT] * repeats)], [answer.json()["text"]]) < 0.15
        assert answer.json()["segments"][-1]["end"] > repeats * len(jfk) / SAMPLE_RATE - 2
    for record in records:
        kinds = [event.type for event in record.events]
        assert kinds[0] == "ready" and kinds[-1] == "closed", kinds
        assert record.events[-1].data["reason"] == "server_shutdown"
        assert record.close_code == 1001
        finals = [event.data for event in record.events if event.type == "final"]
        heard = normalize(" ".join(final["text"] for final in finals)).split()
        # about six of the eleven seconds were sent: the last final carries what was said up to the signal
        # (the words around the cut may come out differently)
        assert finals and finals[-1]["text"] and heard[:6] == JFK_TEXT.split()[:6], heard
    # the Realtime session's uncommitted audio is committed for it by the drain: its transcript, then the close (1001)
    [item] = realtime_record.items.values()
    assert item.committed_at is not None and normalize(item.transcript).split()[:6] == JFK_TEXT.split()[:6], item
    assert realtime_record.failure is not None and "1001" in realtime_record.failure
    print(f"exited {exit_s:.1f} s after SIGTERM")
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is the signal's (143 in a shell)
    assert exit_code == -signal.SIGTERM and exit_s < 120 + 10


def test_a_drain_that_runs_out_of_time_still_exits_in_bounded_time() -> None:
    server = Server(shutdown_timeout_s="1")
    try:
        server.wait_ready()
        long_file = wav_bytes(np.concatenate([decode_audio(JFK.read_bytes(), 60)] * 60))  # 660 s: about a minute of work

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                request = asyncio.create_task(client.post("/v1/transcribe", content=long_file))
                await asyncio.sleep(3)
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                exit_code = await asyncio.to_thread(server.process.wait, 60)
                exited_s = time.monotonic() - signalled
                answer = await request
            return exit_code, exited_s, answer

        exit_code, exited_s, answer = asyncio.run(main())
    finally:
        server.stop()
    print(f"exited {exited_s:.1f} s after SIGTERM, the request got {answer!r}")
    # 1 s of drain, then uvicorn's 5 s for what is left, then the stages stop
    assert exit_code == -signal.SIGTERM and exited_s < 1 + 5 + 5, exited_s
    if answer.status_code != 200:  # cut off (or, on a fast machine, finished in time): never a half transcript
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down", answer.text
    else:
        assert normalize(answer.json()["text"]).count("fellow americans") == 60
