"""The scoring helpers every load test relies on: if these drift, every WER figure drifts with them."""

import asyncio
import math

import httpx
import pytest

from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, normalize, percentile, word_error_rate
from loadtest.rest import run_rest_load

needs_eval_data = pytest.mark.skipif(not DEFAULT_MANIFEST.exists(), reason=f"eval kit not found at {DEFAULT_MANIFEST}")


def test_normalize_lowercases_strips_punctuation_and_apostrophes() -> None:
    assert normalize("Hello, World! It's") == "hello world its"
    assert normalize("  Mr. SMITH-Jones\tsaid:\n'42'  ") == "mr smith jones said 42"
    assert normalize("¿Qué?") == "qu"


def test_word_error_rate_is_over_the_whole_corpus() -> None:
    # 1 substitution in 4 words plus 0 errors in 1 word: 1/5, not the mean of per-utterance 1/4 and 0.
    assert word_error_rate(["the cat sat down", "yes"], ["the cat sat town", "Yes."]) == pytest.approx(0.2)
    assert word_error_rate(["a b"], ["a b c d"]) == pytest.approx(1.0)


def test_word_error_rate_counts_an_empty_hypothesis_as_deletions() -> None:
    assert word_error_rate(["one two three", "four"], ["", "four"]) == pytest.approx(0.75)
    assert word_error_rate(["one two"], [""]) == pytest.approx(1.0)


def test_word_error_rate_rejects_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])
    with pytest.raises(ValueError):
        word_error_rate(["..."], ["a"])


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


@needs_eval_data
def test_load_rows_gives_the_wer_set() -> None:
    rows = load_rows()
    assert len(rows) == 99
    assert all(row.audio.is_absolute() and row.audio.exists() for row in rows)
    assert all(row.text and row.duration_s > 0 for row in rows)
    librispeech = load_rows(sets=["librispeech_test_other_resemblyzer"])
    assert len(librispeech) == 50
    assert {row.source_set for row in librispeech} == {"librispeech_test_other_resemblyzer"}
    assert len(load_rows(limit=3)) == 3
    assert len(load_rows(wer_only=False)) > 99


@needs_eval_data
def test_load_rows_rejects_an_unknown_set() -> None:
    with pytest.raises(ValueError, match="unknown source_set"):
        load_rows(sets=["no_such_set"])


def test_run_rest_load_counts_failures_without_crashing(tmp_path) -> None:
    rows = []
    for i, text in enumerate(["hello world", "good morning", "bad file"]):
        audio = tmp_path / f"{i}.wav"
        audio.write_bytes(b"RIFF")
        rows.append(EvalRow(audio=audio, text=text, source_set="t", duration_s=2.0))

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        if b'filename="0.wav"' in body:
            return httpx.Response(200, json={"text": "Hello, world.", "duration": 2.0})
        if b'filename="1.wav"' in body:
            error = {"error": {"code": "overloaded", "message": "busy"}}
            return httpx.Response(503, json=error, headers={"Retry-After": "1"})
        raise httpx.ConnectError("refused", request=request)

    result = asyncio.run(run_rest_load("http://test", rows, 2, transport=httpx.MockTransport(handler)))
    assert [r.index for r in result.records] == [0, 1, 2]
    assert result.records[0].hypothesis == "Hello, world."
    assert result.records[1].error == "overloaded: busy"
    assert result.errors_by_status == {"503": 1, "no response": 1}
    assert result.audio_s == 2.0
    assert result.wer == pytest.approx(4 / 6)  # the failed rows' four words are deletions
