"""OpenAI's Realtime transcription on /v1/realtime: the official ``openai`` SDK's clients (GA and beta), used
unchanged, on real speech at real-time pace; bad events answered in OpenAI's error shape, and a transcription
the engine fails answered with ``.failed``, while the session goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from configs import Settings
from loadtest.evalset import normalize, word_error_rate
from loadtest.faults import in_process_server
from loadtest.realtime import REALTIME_RATE, play, resampled
from loadtest.stream import decode_file, to_pcm
from tests.conftest import JFK, JFK_TEXT, Server, free_port, running_server
from workers.postprocess import PostProcessor

ORDER = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return decode_file(JFK)


def _items_in_order(record) -> None:
    """Each item's events come in OpenAI's order, items chain by previous_item_id, and deltas are its transcript's start."""
    previous = None
    for item in record.items.values():
        assert item.committed_at is not None and item.transcript is not None, item
        assert item.previous_item_id == previous
        previous = item.id
        assert item.transcript.startswith("".join(item.deltas))
        if item.speech_started_at is not None:
            assert item.speech_started_at <= item.speech_stopped_at <= item.committed_at <= item.completed_at
            assert item.audio_start_ms < item.audio_end_ms


def test_the_ga_client_with_server_vad_transcribes_speech_played_in_real_time(server: Server, jfk: np.ndarray) -> None:
    record = asyncio.run(play(server.url, jfk))
    assert record.failure is None and not record.errors
    assert record.types[:2] == ["session.created", "session.updated"]
    created = record.events[0][1]["session"]
    assert created["type"] == "transcription" and created["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    assert len(record.items) >= 2  # JFK pauses after "fellow americans": server VAD ends a turn there
    _items_in_order(record)
    for item in record.items.values():
        assert [t for t in record.types if t in ORDER and any(e.get("item_id") == item.id for _, e in record.events)]
        assert item.deltas and item.first_delta_at <= item.completed_at
    assert word_error_rate([JFK_TEXT], [record.hypothesis]) < 0.1
    assert all(latency < 5 for latency in record.completion_latencies())


def test_the_beta_client_with_manual_commits_gets_one_item_per_commit(server: Server, jfk: np.ndarray) -> None:
    record = asyncio.run(play(server.url, jfk, dialect="beta", manual=True))
    assert record.failure is None and not record.errors
    assert record.types[:2] == ["transcription_session.created", "transcription_session.updated"]
    assert record.events[1][1]["session"]["turn_detection"] is None
    assert "input_audio_buffer.speech_started" not in record.types  # no turn detection: no VAD events
    [item] = record.items.values()
    _items_in_order(record)
    assert normalize(item.transcript) == JFK_TEXT


async def _raw_session(url: str, events: list[dict | bytes], *, until: str, headers: dict | None = None) -> list[dict]:
    """Send these events on a raw WebSocket, then read until an event of type ``until``."""
    async with connect(url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription", additional_headers=headers or {}) as ws:
        received = [json.loads(await ws.recv())]
        for event in events:
            await ws.send(event if isinstance(event, bytes | str) else json.dumps(event))
        while received[-1]["type"] != until:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        return received


def _append(audio: np.ndarray, encoding: str = "pcm_s16le", rate: int = REALTIME_RATE) -> list[dict]:
    pcm = to_pcm(resampled(audio, rate), encoding)
    step = rate // 2 * (2 if encoding == "pcm_s16le" else 1)  # 0.5 s per event
    return [{"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()} for i in range(0, len(pcm), step)]


def test_bad_events_get_openai_errors_and_the_session_goes_on(server: Server, jfk: np.ndarray) -> None:
    manual = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}}
    bad = [
        "not json", b"\x00\x01binary", {"type": "response.create", "event_id": "evt_1"},
        {"type": "transcription_session.update", "session": {}},
        {"type": "session.update", "session": {"type": "transcription", "colour": "blue"}, "event_id": "evt_2"},
        {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}},
        {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"transcription": {"language": "xx"}}}}},
        {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "nope"}}}}},
        {"type": "session.update", "session": {"type": "realtime"}},
        {"type": "input_audio_buffer.append", "audio": "%%%"},
        {"type": "input_audio_buffer.commit", "event_id": "evt_3"},  # nothing buffered yet
    ]
    events = asyncio.run(_raw_session(server.url, [*bad, manual, *_append(jfk), {"type": "input_audio_buffer.commit"}],
                                      until="conversation.item.input_audio_transcription.completed"))
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert len(errors) == len(bad)
    assert all(e["type"] == "invalid_request_error" and e["message"] for e in errors)
    codes = [e["code"] for e in errors]
    assert codes == ["invalid_json", "invalid_event", "unknown_event", "unknown_event", "unknown_parameter", "invalid_value",
                     "unsupported_language", "model_not_found", "invalid_value", "invalid_value", "input_audio_buffer_commit_empty"]
    assert [errors[i]["event_id"] for i in (2, 4, 10)] == ["evt_1", "evt_2", "evt_3"]  # the client's event it answers
    assert errors[4]["param"] == "session.colour"
    assert normalize(events[-1]["transcript"]) == JFK_TEXT  # the session went on, its options unchanged by the bad updates


def test_an_item_the_engine_fails_is_answered_failed_and_the_next_one_completes(monkeypatch: pytest.MonkeyPatch, jfk: np.ndarray,
                                                                                tmp_path: Path) -> None:
    """The post stage fails every window while an item is transcribed (the real engine, its PostProcessor raising): the
    item is answered with ``conversation.item.input_audio_transcription.failed``, a server_error saying which stage,
    never left waiting; once the fault is gone, the next item of the same session completes."""
    failing = threading.Event()
    window_result = PostProcessor.window_result

    def faulty(self, *args, **kwargs):
        if failing.is_set():
            raise RuntimeError("fault injected in the post stage")
        return window_result(self, *args, **kwargs)

    monkeypatch.setattr(PostProcessor, "window_result", faulty)
    manual = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}}
    commit = {"type": "input_audio_buffer.commit"}

    async def session(url: str) -> list[dict]:
        async with connect(url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription") as ws:
            events = [json.loads(await ws.recv())]

            async def until(kind: str) -> None:
                while events[-1]["type"] != kind:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))

            failing.set()
            for event in [manual, *_append(jfk), commit]:
                await ws.send(json.dumps(event))
            await until("conversation.item.input_audio_transcription.failed")
            failing.clear()
            for event in [*_append(jfk), commit]:
                await ws.send(json.dumps(event))
            await until("conversation.item.input_audio_transcription.completed")
            return events

    with in_process_server(Settings(port=free_port(), data_dir=str(tmp_path))) as (url, _):
        events = asyncio.run(session(url))
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    [failed] = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed"]
    [completed] = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(committed) == 2 and failed["item_id"] == committed[0] and completed["item_id"] == committed[1]
    assert failed["error"]["type"] == "server_error" and "post stage" in failed["error"]["message"]
    assert "injected" not in failed["error"]["message"]  # the cause's type, never its text
    assert normalize(completed["transcript"]) == JFK_TEXT


def test_g711_audio_and_a_clear(server: Server, jfk: np.ndarray) -> None:
    """audio/pcmu at 8 kHz transcribes; audio cleared before a commit is not transcribed."""
    pcmu = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}}}
    noise = np.random.default_rng(0).normal(0, 0.3, 16000 * 2).astype(np.float32)
    events = asyncio.run(_raw_session(server.url, [pcmu, *_append(noise, "pcm_mulaw", 8000), {"type": "input_audio_buffer.clear"},
                                                   *_append(jfk, "pcm_mulaw", 8000), {"type": "input_audio_buffer.commit"}],
                                      until="conversation.item.input_audio_transcription.completed"))
    types = [e["type"] for e in events]
    assert types.index("input_audio_buffer.cleared") < types.index("input_audio_buffer.committed")
    assert events[1]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert word_error_rate([JFK_TEXT], [events[-1]["transcript"]]) < 0.1


def test_model_aliases_and_the_api_key_as_the_sdk_sends_it(jfk: np.ndarray) -> None:
    with running_server(api_keys="k-one", model_aliases='{"fast": "tiny.en"}') as keyed:
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(_raw_session(keyed.url, [], until="session.created"))
        assert refused.value.response.status_code == 401
        record = asyncio.run(play(keyed.url, jfk[: 16000 * 3], api_key="k-one", speed=0))
        assert record.failure is None and "fellow" in record.hypothesis.lower()
        created = asyncio.run(_raw_session(keyed.url, [{"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"transcription": {"model": "fast"}}}}}], until="session.updated", headers={"Authorization": "Bearer k-one"}))
        assert created[-1]["session"]["audio"]["input"]["transcription"]["model"] == "fast"
