"""The official ``openai`` Python client, used unchanged, against a real server."""

from __future__ import annotations

import openai
from prometheus_client.parser import text_string_to_metric_families

from loadtest.evalset import normalize, word_error_rate
from tests.conftest import JFK, JFK_TEXT, Server


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_the_openai_client_transcribes_with_a_temperature(server: Server) -> None:
    client = _client(server)
    with JFK.open("rb") as audio:
        plain = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert normalize(plain.text) == JFK_TEXT
    with JFK.open("rb") as audio:
        sampled = client.audio.transcriptions.create(model="whisper-1", file=audio, temperature=0.2, response_format="verbose_json")
    assert word_error_rate([JFK_TEXT], [sampled.text]) < 0.2  # sampled at 0.2: close to, not always exactly, the text
    assert sampled.language == "english" and sampled.duration > 10
    assert sampled.segments and all(s.temperature >= 0.2 for s in sampled.segments)


def test_temperature_fallbacks_are_counted(server: Server) -> None:
    import httpx

    with JFK.open("rb") as audio:
        _client(server).audio.transcriptions.create(model="whisper-1", file=audio, response_format="text")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    temperatures = {s.labels["temperature"] for s in families["asr_decoder_fallbacks"].samples if s.name.endswith("_total")}
    assert {"0.2", "0.4", "0.6", "0.8", "1"} <= temperatures
    assert any(s.value > 0 for s in families["asr_decoder_windows"].samples if s.name.endswith("_total"))


def test_the_openai_client_gets_word_timestamps(server: Server) -> None:
    client = _client(server)
    with JFK.open("rb") as audio:
        answer = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                                    timestamp_granularities=["word", "segment"])
    words = answer.words
    assert [normalize(w.word) for w in words if normalize(w.word)] == JFK_TEXT.split()
    assert all(0 <= w.start <= w.end <= answer.duration + 0.01 for w in words)
    assert all(a.start <= b.start for a, b in zip(words, words[1:]))
    # faster-whisper 1.2.1's word_timestamps on the same weights: "ask" 2.26-3.88 s, "country." 10.22-10.52 s
    ask, last = next(w for w in words if normalize(w.word) == "ask"), words[-1]
    assert abs(ask.start - 2.26) <= 0.1 and abs(last.start - 10.22) <= 0.1
    assert all(any(s.start - 0.01 <= w.start and w.end <= s.end + 0.01 for s in answer.segments) for w in words)  # each in a segment
    with JFK.open("rb") as audio:
        only_words = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                                        timestamp_granularities=["word"])
    assert only_words.words and not only_words.segments
