"""The webhook outbox against a real receiver: a tiny ASGI app served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from app.webhook import WebhookOutbox, stream_final_payload, transcript_payload, validate_webhook_url
from tests.conftest import free_port


class Receiver:
    """Answers each POST with ``status`` after ``delay_s`` and records its JSON body; ``arrived`` counts bodies read so far."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.delay_s = 0.0
        self.status = 204
        self.arrived = 0
        self.bodies: list[dict] = []  # those answered, in order
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    interface="asgi3", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.arrived += 1
        if self.delay_s:
            try:  # once the body is read, receive() returns only when the client hangs up: then stop, so shutdown need not wait
                await asyncio.wait_for(receive(), self.delay_s)
                return
            except TimeoutError:
                pass
        self.bodies.append(json.loads(body))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def __enter__(self) -> Receiver:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@dataclass
class Counts:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


def outbox(url: str, counts: Counts, max_pending: int = 100, timeout_s: float = 5.0) -> WebhookOutbox:
    return WebhookOutbox(url, timeout_s, max_pending,
                         on_delivered=lambda: setattr(counts, "delivered", counts.delivered + 1),
                         on_failed=lambda: setattr(counts, "failed", counts.failed + 1),
                         on_dropped=lambda: setattr(counts, "dropped", counts.dropped + 1))


def final(i: int) -> dict:
    return stream_final_payload(f"s-{i}", "tiny", i, f"utterance {i}", i * 1.0, i + 0.5, "silence")


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_delivers_in_order(receiver: Receiver) -> None:
    counts = Counts()
    payloads = [final(i) for i in range(20)] + [transcript_payload("r-1", "tiny", "hello there", 1.5, [
        {"start": 0.0, "end": 1.5, "text": "hello there", "avg_logprob": -0.2}])]

    async def main() -> None:
        box = outbox(receiver.url, counts)
        box.start()
        assert all(box.offer(p) for p in payloads)
        await box.close(10)
        assert box.pending == 0

    asyncio.run(main())
    assert receiver.bodies == payloads[:-1] + [{"type": "transcript", "request_id": "r-1", "model": "tiny", "text": "hello there",
                                                "duration_s": 1.5, "segments": [{"start": 0.0, "end": 1.5, "text": "hello there"}]}]
    assert counts == Counts(delivered=21)


def test_offer_does_not_wait_for_a_slow_receiver(receiver: Receiver) -> None:
    receiver.delay_s = 2.0
    counts = Counts()

    async def main() -> None:
        box = outbox(receiver.url, counts, max_pending=3)
        box.start()
        assert box.offer(final(0))
        await wait_until(lambda: receiver.arrived == 1)  # the receiver now holds the first POST for 2 s
        assert [box.offer(final(i)) for i in range(1, 6)] == [True, True, True, False, False]  # 3 wait; the newest are dropped
        assert not receiver.bodies  # every offer returned while the first delivery was still unanswered
        assert box.pending == 4  # 3 waiting + 1 being sent
        assert counts == Counts(dropped=2)
        await box.close(0.2)  # far less than the receiver's 2 s: nothing can be delivered
        assert not box.offer(final(6))  # closed

    asyncio.run(main())
    assert not receiver.bodies
    assert counts == Counts(dropped=2 + 4 + 1)


def test_a_full_outbox_drops_the_new_payload(receiver: Receiver) -> None:
    counts = Counts()

    async def main() -> None:
        box = outbox(receiver.url, counts, max_pending=3)
        assert [box.offer(final(i)) for i in range(5)] == [True, True, True, False, False]  # not started: nothing drains
        assert box.pending == 3
        box.start()
        await box.close(10)

    asyncio.run(main())
    assert [b["utterance"] for b in receiver.bodies] == [0, 1, 2]  # the oldest were kept
    assert counts == Counts(delivered=3, dropped=2)


def test_error_answers_count_as_failures_and_later_payloads_go_out(receiver: Receiver) -> None:
    counts = Counts()

    async def main() -> None:
        box = outbox(receiver.url, counts)
        box.start()
        receiver.status = 500
        for i in range(3):
            box.offer(final(i))
        await wait_until(lambda: counts.failed == 3)
        receiver.status = 200
        for i in range(3, 5):
            box.offer(final(i))
        await box.close(10)

    asyncio.run(main())
    assert [b["utterance"] for b in receiver.bodies] == [0, 1, 2, 3, 4]
    assert counts == Counts(delivered=2, failed=3)


def test_a_receiver_that_comes_back_gets_the_later_payloads() -> None:
    port = free_port()  # nothing listens here yet: connections are refused
    counts = Counts()

    async def main() -> None:
        box = outbox(f"http://127.0.0.1:{port}/hook", counts)
        box.start()
        for i in range(3):
            box.offer(final(i))
        await wait_until(lambda: counts.failed == 3)
        with Receiver(port) as receiver:
            for i in range(3, 5):
                box.offer(final(i))
            await box.close(10)
            assert [b["utterance"] for b in receiver.bodies] == [3, 4]

    asyncio.run(main())
    assert counts == Counts(delivered=2, failed=3)


@pytest.mark.parametrize("url", ["http://exa mple.com/hook", "http://[::1"])
def test_an_invalid_url_fails_each_payload_without_stopping_the_task(url: str, caplog: pytest.LogCaptureFixture) -> None:
    counts = Counts()

    async def main() -> None:
        box = outbox(url, counts, timeout_s=2.0)
        box.start()
        for i in range(5):
            box.offer(final(i))
        await wait_until(lambda: counts.failed == 5)
        box.offer(final(5))  # the task is still there to take it
        await wait_until(lambda: counts.failed == 6)
        await box.close(5)

    with caplog.at_level(logging.WARNING, logger="app.webhook"):
        asyncio.run(main())
    assert counts == Counts(failed=6)
    assert len([r for r in caplog.records if "delivery failed" in r.getMessage()]) == 1  # not one line per payload


def test_an_unsendable_payload_fails_alone(receiver: Receiver) -> None:
    counts = Counts()

    async def main() -> None:
        box = outbox(receiver.url, counts)
        box.start()
        box.offer({"not json": object()})  # a TypeError from the JSON encoder, no httpx error at all
        box.offer(final(1))
        await box.close(10)

    asyncio.run(main())
    assert [b["utterance"] for b in receiver.bodies] == [1]
    assert counts == Counts(delivered=1, failed=1)


def test_close_delivers_what_it_can_in_time_and_drops_the_rest(receiver: Receiver) -> None:
    receiver.delay_s = 0.3
    counts = Counts()

    async def main() -> None:
        box = outbox(receiver.url, counts)
        box.start()
        for i in range(10):
            box.offer(final(i))
        await box.close(1.0)

    asyncio.run(main())
    assert counts.failed == 0
    assert counts.delivered + counts.dropped == 10
    assert counts.dropped > 0  # 10 × 0.3 s cannot fit in 1 s
    assert [b["utterance"] for b in receiver.bodies] == list(range(counts.delivered))  # a prefix, in order


@pytest.mark.parametrize("url, complaint", [("ftp://x", "scheme must be http or https"), ("nohost", "scheme must be http or https"),
                                            ("", "scheme must be http or https"), ("http:///x", "has no host"),
                                            ("http://[::1", "not a valid URL"), ("http://exa mple.com", "whitespace")])
def test_validate_refuses(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as refused:
        validate_webhook_url(url)
    assert "ASR_POST_WEBHOOK_URL=" in str(refused.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "https://example.com/hook"])
def test_validate_accepts(url: str) -> None:
    assert validate_webhook_url(url) == url


def test_the_server_delivers_finals_only_with_their_ids_and_never_waits_for_the_receiver(receiver: Receiver) -> None:
    """Through a real server: a REST transcript and a stream's finals reach the receiver with the request's
    id (the response's X-Request-Id) and the stream's session id; interim steps never do; and the answers do
    not wait for a slow receiver."""
    import httpx
    import numpy as np

    from app.audio import decode_audio
    from loadtest.evalset import normalize
    from loadtest.stream import StreamClient
    from tests.conftest import JFK, JFK_TEXT, running_server

    receiver.delay_s = 0.5
    jfk = decode_audio(JFK.read_bytes(), 60)
    with running_server(post_webhook_url=receiver.url) as server:
        answer = httpx.post(f"{server.url}/v1/transcribe", content=JFK.read_bytes(), timeout=60)
        answered_before_delivery = not receiver.bodies  # the receiver is still sitting on it
        record = asyncio.run(StreamClient(server.url.replace("http", "ws") + "/v1/stream", speed=2.0).run_file(jfk))
        deadline = time.monotonic() + 30
        finals = [e.data for e in record.events if e.type == "final"]
        while len(receiver.bodies) < 1 + len(finals) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert answer.status_code == 200 and normalize(answer.json()["text"]) == JFK_TEXT
    assert answered_before_delivery
    transcript, *stream_finals = receiver.bodies
    assert transcript["type"] == "transcript" and transcript["request_id"] == answer.headers["X-Request-Id"]
    assert normalize(transcript["text"]) == JFK_TEXT and transcript["model"] == "tiny.en" and transcript["segments"]
    session = next(e.data for e in record.events if e.type == "ready")["session_id"]
    assert [b["type"] for b in stream_finals] == ["stream.final"] * len(finals) and finals
    assert {b["stream_id"] for b in stream_finals} == {session}
    assert [(b["utterance"], b["text"]) for b in stream_finals] == [(f["utterance"], f["text"]) for f in finals]
    assert any(e.type == "partial" for e in record.events)  # there were interim steps, and none was delivered
    assert np.isclose(transcript["duration_s"], len(jfk) / 16000, atol=0.01)


def test_a_bad_webhook_url_stops_the_server_at_start_with_a_clear_message() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"ASR_POST_WEBHOOK_URL": "ftp://example.com/hook", "ASR_PORT": str(free_port()), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ASR_POST_WEBHOOK_URL" in result.stderr and "http or https" in result.stderr
