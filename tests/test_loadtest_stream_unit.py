"""The streaming load test's bookkeeping, without a server: PCM framing, pacing, latency definitions, summary."""

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.stream import (
    Event,
    FileResult,
    StreamRecord,
    assign,
    format_event,
    format_summary,
    frame_due,
    main,
    refusal_text,
    summarize,
    to_pcm,
    with_query,
)


def test_to_pcm_clips_and_rounds_to_little_endian_int16() -> None:
    pcm = to_pcm(np.array([0.0, 0.5, -0.5, 1.5, -1.5, 1.0 / 32768], np.float32), "pcm_s16le")
    assert np.frombuffer(pcm, "<i2").tolist() == [0, 16384, -16384, 32767, -32768, 1]
    f32 = to_pcm(np.array([0.25, -2.0], np.float32), "pcm_f32le")
    assert np.frombuffer(f32, "<f4").tolist() == [0.25, -2.0]
    with pytest.raises(ValueError):
        to_pcm(np.zeros(1, np.float32), "mulaw")


def test_with_query_adds_parameters_and_keeps_those_in_the_url() -> None:
    assert with_query("ws://h:1/v1/stream", {"sample_rate": 16000}) == "ws://h:1/v1/stream?sample_rate=16000"
    url = with_query("ws://h:1/v1/stream?language=en&sample_rate=8000", {"sample_rate": 16000, "encoding": "pcm_s16le"})
    assert url.startswith("ws://h:1/v1/stream?")
    assert dict(p.split("=") for p in url.split("?")[1].split("&")) == {
        "sample_rate": "8000",
        "encoding": "pcm_s16le",
        "language": "en",
    }


def test_frame_due_is_an_absolute_schedule_scaled_by_speed() -> None:
    assert frame_due(10.0, 0, 0.1, 1.0) == 10.0
    assert frame_due(10.0, 30, 0.1, 1.0) == pytest.approx(13.0)
    assert frame_due(10.0, 30, 0.1, 2.0) == pytest.approx(11.5)
    assert frame_due(10.0, 30, 0.1, 0) is None


def test_assign_deals_round_robin_and_repeats_a_short_list() -> None:
    assert assign(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert assign(["x"], 3) == [["x"], ["x"], ["x"]]
    assert assign(["x", "y"], 3) == [["x"], ["y"], ["x"]]
    assert assign([], 2) == [[], []]


def test_refusal_text_reads_the_error_body() -> None:
    body = json.dumps({"error": {"code": "server_busy", "message": "try later"}}).encode()
    assert refusal_text(body) == "server_busy: try later"
    assert refusal_text(b"Service Unavailable") == "Service Unavailable"
    assert refusal_text(None) == ""


def _record() -> StreamRecord:
    """3 s of audio sent as 1 s frames at t = 1, 2, 3; ready at 0.5; partials, an endpoint final, a finalize final."""
    rec = StreamRecord(audio_s=3.0, started_at=0.0, sent=[(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)])
    for t, data in [
        (0.5, {"type": "ready", "session_id": "s1"}),
        (1.4, {"type": "partial", "utterance": 0, "text": "hello"}),
        (1.7, {"type": "partial", "utterance": 0, "text": "hello there"}),
        (2.6, {"type": "final", "utterance": 0, "text": "Hello there.", "end": 1.5, "reason": "endpoint"}),
        (2.8, {"type": "partial", "utterance": 1, "text": "gen"}),
        (3.1, {"type": "partial", "utterance": 1, "text": "general"}),
        (3.5, {"type": "final", "utterance": 1, "text": "General Kenobi", "end": 2.9, "reason": "finalize"}),
        (3.6, {"type": "final", "utterance": 2, "text": "", "reason": "close"}),
        (3.7, {"type": "closed", "reason": "client"}),
    ]:
        rec.events.append(Event(t, data))
    return rec


def test_latencies_follow_the_documented_definitions() -> None:
    rec = _record()
    assert rec.sent_at(0.0) == 1.0 and rec.sent_at(1.5) == 2.0 and rec.sent_at(2.0) == 2.0 and rec.sent_at(9.0) == 3.0
    assert rec.first_partial_latency_s == pytest.approx(0.4)  # 1.4 - first frame at 1.0
    # intervals within utterance 0 and within utterance 1; none across the final between them
    assert rec.partial_intervals_s == pytest.approx([0.3, 0.3])
    # endpoint final: from the frame holding second 1.5 (sent at 2.0); client-caused: from the last frame (3.0)
    assert rec.final_latencies_s == pytest.approx([0.6, 0.5, 0.6])
    assert rec.latency(0) is None and rec.latency(8) is None
    assert rec.hypothesis == "Hello there. General Kenobi"
    assert StreamRecord(audio_s=1.0, started_at=0.0).first_partial_latency_s is None


def test_summary_scores_finals_and_counts_failures() -> None:
    refused = StreamRecord(audio_s=2.0, started_at=0.0, handshake_status=503, error="HTTP 503: server_busy: full")
    ok = _record()
    ok.close_code, ok.frames_behind = 1000, 1
    ok.events.insert(1, Event(0.6, {"type": "error", "code": "bad_frame", "message": "odd length"}))
    results = [
        FileResult(0, Path("a.wav"), "hello there general kenobi", ok),
        FileResult(1, Path("b.wav"), "one two", refused),
        FileResult(1, Path("c.wav"), None, StreamRecord(audio_s=1.0, started_at=0.0, close_code=1006)),
    ]
    summary = summarize(results, streams=2, wall_s=4.0)
    assert summary["wer"] == pytest.approx(2 / 6)  # the refused file's two words are deletions
    assert summary["wer_files"] == 2
    assert summary["audio_s"] == 3.0
    assert summary["close_codes"] == {"1000": 1, "HTTP 503": 1, "1006": 1}
    assert summary["error_events"] == {"bad_frame": 1}
    assert summary["failed_sessions"] == 1
    assert (summary["frames_behind"], summary["frames_sent"]) == (1, 3)
    assert summary["first_partial_p50_s"] == pytest.approx(0.4)
    text = format_summary(summary)
    assert "WER %                     33.33 (2 files with a reference)" in text
    assert "close codes               1000: 1, 1006: 1, HTTP 503: 1" in text
    json.dumps({"summary": summary, "files": [r.to_json() for r in results]}, allow_nan=False)


def test_summary_of_nothing_measured_says_n_a() -> None:
    summary = summarize([FileResult(0, Path("a.wav"), None, StreamRecord(audio_s=1.0, started_at=0.0))], streams=1, wall_s=1.0)
    assert summary["wer"] is None and summary["final_latency_p50_s"] is None
    assert "final latency p50/p95 s   n/a / n/a" in format_summary(summary)


def test_format_event_shows_type_latency_and_text() -> None:
    rec = _record()
    assert format_event(2, "a.wav", rec, 1) == "[2] a.wav  partial   0.40s  hello"
    assert format_event(2, "a.wav", rec, 6) == "[2] a.wav  final     0.50s  (finalize) General Kenobi"
    assert format_event(2, "a.wav", rec, 0) == "[2] a.wav  ready   " + " " * 7 + "  s1"


def test_main_needs_files_or_a_set() -> None:
    with pytest.raises(SystemExit):
        main([])
