"""``/v1/stream``: a real server on a loopback port, a real WebSocket client, real speech."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import numpy as np
import pytest
import torch
import torchaudio
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.audio import decode_audio
from loadtest.evalset import DEFAULT_MANIFEST, load_rows, normalize, word_error_rate
from loadtest.stream import LiveStream, StreamClient, StreamRecord, open_stream
from tests.conftest import JFK, JFK_TEXT, Server


def ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/stream"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return decode_audio(JFK.read_bytes(), 60)


@pytest.fixture(scope="module")
def libri():
    row = load_rows(DEFAULT_MANIFEST, sets=["librispeech_test_other_resemblyzer"], limit=1)[0]
    return decode_audio(row.audio.read_bytes(), 60), row.text


def types(record: StreamRecord) -> list[str]:
    return [e.type for e in record.events]


async def collect(stream: LiveStream, timeout_s: float = 60) -> list[dict]:
    """Every message until the server closes the socket."""
    async def read() -> list[dict]:
        return [event.data async for event in stream.events()]

    return await asyncio.wait_for(read(), timeout_s)


def metrics(server: Server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_happy_path_events_in_order_and_text_right(server: Server, jfk: np.ndarray) -> None:
    # real time: faster, an utterance can end before its first step is back, and then it has no partial
    record = run(StreamClient(ws_url(server), speed=1.0).run_file(jfk))
    kinds = types(record)
    assert kinds[0] == "ready" and kinds[-1] == "closed" and record.close_code == 1000, kinds
    assert "partial" in kinds and "error" not in kinds
    # every partial of an utterance comes before that utterance's final; finals come in order
    finals_seen: list[int] = []
    for event in record.events:
        if event.type == "partial":
            assert event.data["utterance"] not in finals_seen
        if event.type == "final":
            finals_seen.append(event.data["utterance"])
    assert finals_seen == sorted(finals_seen) and len(set(finals_seen)) == len(finals_seen)
    assert word_error_rate([JFK_TEXT], [record.hypothesis]) <= 0.15, record.hypothesis
    previous_end = 0.0
    for final in record.finals:
        data = final.data
        assert previous_end <= data["start"] < data["end"] <= 11.1
        for segment in data["segments"]:
            assert data["start"] - 0.01 <= segment["start"] <= segment["end"] <= data["end"] + 0.5
        previous_end = data["end"]


def test_start_message_f32_at_48k_is_resampled(server: Server, jfk: np.ndarray) -> None:
    audio_48k = torchaudio.functional.resample(torch.from_numpy(jfk), 16000, 48000).numpy()
    client = StreamClient(ws_url(server), sample_rate=48000, encoding="pcm_f32le", speed=0,
                          start_options={"interim_results": False, "endpoint_silence_ms": 2000})
    record = run(client.run_file(audio_48k))
    started = [e.data for e in record.events if e.type == "started"]
    assert started and started[0]["sample_rate"] == 48000 and started[0]["encoding"] == "pcm_f32le"
    assert "partial" not in types(record)
    assert word_error_rate([JFK_TEXT], [record.hypothesis]) <= 0.15, record.hypothesis


def test_odd_sized_frames_lose_no_sample(server: Server, libri) -> None:
    audio, text = libri
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()

    async def main() -> list[dict]:
        async with open_stream(ws_url(server)) as stream:
            for i in range(0, len(pcm), 3201):  # every other frame ends in the middle of a sample
                await stream.ws.send(pcm[i : i + 3201])
            await stream.send_json({"type": "finalize"})
            await stream.send_json({"type": "close"})
            return await collect(stream)

    finals = [m for m in run(main()) if m["type"] == "final"]
    assert finals and finals[-1]["end"] == pytest.approx(len(audio) / 16000, abs=0.01)
    assert word_error_rate([text], [" ".join(f["text"] for f in finals)]) <= 0.3


@pytest.mark.parametrize("level_dbfs", [None, -50.0, -30.0])
def test_silence_and_noise_give_no_text(server: Server, level_dbfs: float | None) -> None:
    rng = np.random.default_rng(0)
    audio = np.zeros(16000 * 30, np.float32) if level_dbfs is None else \
        (rng.standard_normal(16000 * 30) * 10 ** (level_dbfs / 20)).astype(np.float32)
    record = run(StreamClient(ws_url(server), speed=0).run_file(audio))
    assert record.close_code == 1000 and "partial" not in types(record)
    assert [f.data["text"] for f in record.finals] == [""]  # finalize is always answered, here with nothing


def test_bad_control_messages_get_errors_and_the_stream_goes_on(server: Server, jfk: np.ndarray) -> None:
    async def main() -> list[dict]:
        async with open_stream(ws_url(server)) as stream:
            await stream.ws.send("this is not json")
            await stream.send_json({"kind": "finalize"})
            await stream.send_json({"type": "dance"})
            await stream.send_json({"type": "start", "sample_rate": 3})
            await stream.send_audio(jfk)
            await stream.send_json({"type": "start"})  # too late: audio has started
            await stream.send_json({"type": "finalize"})
            await stream.send_json({"type": "close"})
            return await collect(stream)

    messages = run(main())
    errors = [m["code"] for m in messages if m["type"] == "error"]
    assert errors == ["bad_message", "bad_message", "unknown_message", "bad_start", "bad_message"]
    finals = [m["text"] for m in messages if m["type"] == "final"]
    assert word_error_rate([JFK_TEXT], [" ".join(finals)]) <= 0.15
    assert messages[-1]["type"] == "closed"


@pytest.mark.parametrize("query", ["sample_rate=5", "encoding=mp3", "language=fr", "endpoint_silence_ms=1", "colour=red"])
def test_bad_options_refuse_the_handshake(server: Server, query: str) -> None:
    async def main() -> None:
        async with open_stream(f"{ws_url(server)}?{query}", start_options={}):
            pass

    with pytest.raises(InvalidStatus) as refused:
        run(main())
    assert refused.value.response.status_code == 400
    assert json.loads(refused.value.response.body)["error"]["code"] == "bad_options"


def test_session_limit_refuses_with_503_and_frees_the_slot(limited_server: Server) -> None:
    async def main() -> tuple[int, str, str]:
        url = ws_url(limited_server)
        async with open_stream(url) as a, open_stream(url) as b:
            for stream in (a, b):
                assert json.loads(await stream.ws.recv())["type"] == "ready"
            try:
                async with open_stream(url):
                    pass
            except InvalidStatus as exc:
                status, code = exc.response.status_code, json.loads(exc.response.body)["error"]["code"]
        await asyncio.sleep(0.5)  # both slots are given back once the server has seen the closes
        async with open_stream(url) as c:
            again = json.loads(await c.ws.recv())["type"]
        return status, code, again

    assert run(main()) == (503, "server_busy", "ready")


def test_frame_over_the_limit_closes_with_1009(limited_server: Server) -> None:
    async def main():
        async with open_stream(ws_url(limited_server)) as stream:
            await stream.ws.send(b"\0" * 100_000)
            return await collect(stream), stream.close_code

    messages, code = run(main())
    assert [m["type"] for m in messages] == ["ready", "error", "closed"]
    assert messages[1]["code"] == "frame_too_large" and code == 1009


def test_message_flood_is_closed_with_1008(server: Server) -> None:
    """2000 frames of 2 ms as fast as the client can send them: far past 200 messages per second."""
    async def main():
        async with open_stream(ws_url(server)) as stream:
            with contextlib.suppress(ConnectionClosed):
                for _ in range(2000):
                    await stream.ws.send(b"\0" * 64)
            return await collect(stream), stream.close_code

    messages, code = run(main())
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"] and "ASR_STREAM_MAX_MESSAGES_PER_S" in errors[0]["message"]
    assert messages[-1] == {"type": "closed", "reason": "rate_limited"} and code == 1008


def test_idle_stream_is_closed_with_1008(limited_server: Server) -> None:
    async def main():
        async with open_stream(ws_url(limited_server)) as stream:
            started = time.monotonic()
            messages = await collect(stream)
            return messages, stream.close_code, time.monotonic() - started

    messages, code, waited = run(main())
    assert [m.get("code") for m in messages if m["type"] == "error"] == ["idle_timeout"]
    assert messages[-1] == {"type": "closed", "reason": "idle_timeout"} and code == 1008
    assert 1.5 < waited < 10


def test_stream_longer_than_the_session_limit_is_closed(limited_server: Server) -> None:
    async def main():
        async with open_stream(ws_url(limited_server)) as stream:
            async def keep_sending() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:  # silence, so the idle timeout never fires
                        await stream.send_audio(np.zeros(8000, np.float32))
                        await asyncio.sleep(0.5)

            sender = asyncio.create_task(keep_sending())
            try:
                messages = await collect(stream)
            finally:
                sender.cancel()
            return messages, stream.close_code

    messages, code = run(main())
    assert messages[-2]["code"] == "session_too_long" and messages[-1]["reason"] == "session_too_long"
    assert code == 1008


def test_client_gone_mid_utterance_leaves_nothing_behind(server: Server, libri) -> None:
    audio, _ = libri

    async def main() -> None:
        async with open_stream(ws_url(server)) as stream:
            await stream.send_audio(audio)  # several steps' worth of speech, then the client vanishes
            await asyncio.sleep(0.3)
            stream.ws.transport.abort()

    run(main())
    deadline = time.monotonic() + 20
    while True:
        m = metrics(server)
        held = {key: v for key, v in m.items()
                if key[0] in ("asr_streams_active", "asr_stream_sessions_held", "asr_stage_queue_depth", "asr_stage_busy_workers")}
        if not any(held.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not any(held.values()), held
    assert m[("asr_stream_sessions_total", (("reason", "client_gone"),))] >= 1


def test_stream_metrics_are_exported(server: Server, jfk: np.ndarray) -> None:
    record = run(StreamClient(ws_url(server), speed=4.0).run_file(jfk))
    assert record.close_code == 1000
    m = metrics(server)
    assert m[("asr_stream_final_latency_seconds_count", (("model", "tiny.en"),))] >= 1
    assert ("asr_stream_first_partial_latency_seconds_count", (("model", "tiny.en"),)) in m
    assert m[("asr_stream_sessions_total", (("reason", "client_close"),))] >= 1
    assert m[("asr_audio_processed_seconds_total", (("model", "tiny.en"), ("source", "stream")))] >= 11.0
    assert m[("asr_streams_active", ())] == 0


def test_long_speech_without_pauses_is_cut_before_30_s(server: Server) -> None:
    row = next(r for r in load_rows(DEFAULT_MANIFEST) if r.audio.name == "sonnet001.mp3")
    audio = decode_audio(row.audio.read_bytes(), 120)
    # an endpoint silence longer than any pause in the reading: only the length limit can end utterances
    client = StreamClient(ws_url(server), speed=4.0, start_options={"endpoint_silence_ms": 10_000})
    record = run(client.run_file(audio))
    finals = [f.data for f in record.finals]
    assert "max_length" in [f["reason"] for f in finals], finals
    assert all(f["end"] - f["start"] <= 25.0 + 0.01 for f in finals)
    assert all(a["end"] <= b["start"] + 0.01 for a, b in zip(finals, finals[1:]))  # cut, not overlapped
    assert word_error_rate([row.text], [record.hypothesis]) <= 0.35, record.hypothesis


def test_finals_carry_word_timestamps_when_asked(server: Server, jfk: np.ndarray) -> None:
    client = StreamClient(ws_url(server), speed=0, start_options={"word_timestamps": True, "interim_results": False})
    record = run(client.run_file(jfk))
    started = [e.data for e in record.events if e.type == "started"]
    assert started and started[0]["word_timestamps"] is True
    words = [w for final in record.finals for w in final.data["words"]]
    assert [normalize(w["word"]) for w in words if normalize(w["word"])] == normalize(record.hypothesis).split()
    for final in record.finals:  # in seconds of the stream, inside their final, in order
        for w in final.data["words"]:
            assert final.data["start"] - 0.01 <= w["start"] <= w["end"] <= final.data["end"] + 0.01
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))
    plain = run(StreamClient(ws_url(server), speed=0, start_options={"interim_results": False}).run_file(jfk))
    assert plain.finals and all("words" not in final.data for final in plain.finals)
