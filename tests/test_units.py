"""Pure pieces: window planning, segment parsing, repetition guard, model file checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from workers.decoding import DecodeRow
from workers.features import SAMPLE_RATE
from workers.pipeline import WindowRate, plan_windows
from configs.policies import GuardsPolicy
from workers.postprocess import PostProcessor, collapse_repeats
from workers.runner import embedded_model_path
from workers.tokenizer import WhisperTokenizer
from workers.weights import ModelFormatError, load_whisper


def test_windows_cover_long_audio_at_quiet_points() -> None:
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(SAMPLE_RATE * 75)).astype(np.float32)
    audio[int(26.0 * SAMPLE_RATE) : int(26.3 * SAMPLE_RATE)] = 0  # a pause inside the first window's cut zone
    windows = plan_windows(audio)
    assert windows[0][0] == 0 and windows[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(0 < end - start <= 30 * SAMPLE_RATE for start, end in windows)
    assert 26.0 <= windows[0][1] / SAMPLE_RATE <= 26.3
    assert plan_windows(audio[: SAMPLE_RATE * 12]) == [(0, SAMPLE_RATE * 12)]


@pytest.fixture(scope="module")
def tokenizer() -> WhisperTokenizer:
    return WhisperTokenizer(embedded_model_path() / "tokenizer.json", 51864)


def test_segments_from_timestamp_tokens(tokenizer: WhisperTokenizer) -> None:
    ts = lambda s: tokenizer.timestamp_begin + round(s / 0.02)  # noqa: E731
    hello, world = tokenizer.encode(" Hello."), tokenizer.encode(" World.")
    post = PostProcessor(tokenizer, GuardsPolicy())
    row = DecodeRow(prompt=[tokenizer.sot], tokens=[ts(0), *hello, ts(2), ts(2), *world, ts(4)], no_speech_prob=0.01)
    result = post.window_result(row, duration_s=10.0, offset_s=30.0)
    assert [(s.start, s.end, s.text) for s in result.segments] == [(30.0, 32.0, "Hello."), (32.0, 34.0, "World.")]
    assert result.covered_s == 10.0  # ended on a single timestamp: the whole window is accounted for
    row.tokens = [ts(0), *hello, ts(2), ts(2), *world, ts(4), ts(4)]
    assert post.window_result(row, duration_s=10.0, offset_s=0).covered_s == 4.0  # decode again from 4 s


def test_silent_window_gives_nothing(tokenizer: WhisperTokenizer) -> None:
    row = DecodeRow(prompt=[tokenizer.sot], tokens=tokenizer.encode(" Thank you."), no_speech_prob=0.9, sum_logprob=-8.0)
    assert PostProcessor(tokenizer, GuardsPolicy()).window_result(row, 5.0, 0.0).segments == []


def test_repetition_loops_are_cut() -> None:
    assert collapse_repeats("a b a b a b a b c".split(), 2) == "a b a b c".split()
    assert collapse_repeats("the the the the cat".split(), 2) == "the the cat".split()
    assert collapse_repeats("I said no no I said no".split(), 2) == "I said no no I said no".split()


def test_model_dir_errors_say_what_is_wrong(tmp_path: Path) -> None:
    import torch

    with pytest.raises(ModelFormatError, match="no model.bin"):
        load_whisper(tmp_path, torch.device("cpu"), torch.float32)
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00garbage")
    with pytest.raises(ModelFormatError, match="not a CTranslate2 model|WhisperSpec"):
        load_whisper(tmp_path, torch.device("cpu"), torch.float32)


def test_embedded_weights_map_onto_whisper() -> None:
    import torch

    model, config = load_whisper(embedded_model_path(), torch.device("cpu"), torch.float32)
    assert (model.dims.n_audio_layer, model.dims.n_text_state, model.dims.n_vocab) == (4, 384, 51864)
    assert math.isclose(float(model.encoder.positional_embedding[0, 192]), 1.0, abs_tol=1e-3)  # [sin | cos] at 0
    assert len(config["suppress_ids"]) > 50


def test_the_window_rate_s_warm_up_guess_gives_way_to_the_first_windows_served() -> None:
    rate = WindowRate(5.0)  # a warm-up slowed by a neighbour: 5 s a window
    assert rate.seconds_per_window == 5.0
    for _ in range(8):
        rate.started()
    for _ in range(8):
        rate.finished(True)  # the first 8 windows served take no time at all
    assert rate.seconds_per_window < 0.01 and rate.in_flight == 0
