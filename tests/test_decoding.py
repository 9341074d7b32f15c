"""Decoding with a forced prefix: a stream's committed words are fed, and only the rest is generated."""

from __future__ import annotations

from pathlib import Path

import torch

from app.audio import decode_audio
from workers.decoding import DecodeRow, DecodingOptions
from workers.packing import PackingMode, first_fit
from workers.runner import ModelRunner, embedded_model_path

JFK = Path(__file__).resolve().parents[2] / "shared" / "eval" / "audio" / "faster_whisper_tests" / "jfk.flac"


def decode(runner: ModelRunner, audio, forced: tuple[int, ...]) -> DecodeRow:
    window, = runner.encode_windows(first_fit([len(audio)], [""], PackingMode.SHARED), [runner.features(audio)], [len(audio)])
    decoder = runner.new_decoder()
    row = DecodeRow(prompt=list(runner.prompt([], None)), last_timestamp=window.last_timestamp, forced=forced)
    decoder.add([row], window.audio_features[None])
    while decoder.running:
        decoder.step()
    return row


def test_a_forced_prefix_is_the_transcript_s_start_and_only_the_rest_is_decoded() -> None:
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    audio = decode_audio(JFK.read_bytes(), 60)
    free = decode(runner, audio, ())
    text = runner.tokenizer.decode(free.tokens).strip()
    assert text.startswith("And so my fellow Americans")

    forced = runner.forced_prefix("And so my fellow Americans")
    assert forced[0] == runner.tokenizer.timestamp_begin  # the window's first timestamp, then the words
    row = decode(runner, audio, forced)
    assert tuple(row.tokens[: len(forced)]) == forced
    assert runner.tokenizer.decode(row.tokens).strip() == text
    assert len(row.tokens) - len(forced) < len(free.tokens) - 5  # the prefix was not generated again

    assert runner.forced_prefix("  ") == () and runner.forced_prefix(None) == ()
    assert runner.forced_prefix("word " * 200) == ()  # too long to leave room to sample: not forced
