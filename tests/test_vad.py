"""Silero VAD in plain torch against the TorchScript model the silero-vad package ships."""

from __future__ import annotations

import numpy as np
import torch

from app.audio import decode_audio
from tests.conftest import JFK
from workers.streaming import VoiceActivity, agreed_prefix
from workers.vad import CHUNK_SAMPLES, SileroVAD, shipped_model


def test_same_probabilities_as_the_shipped_model_whatever_the_frame_sizes() -> None:
    audio = decode_audio(JFK.read_bytes(), 60)
    chunks = len(audio) // CHUNK_SAMPLES
    scripted = torch.jit.load(str(shipped_model()))
    threads = torch.get_num_threads()
    reference = np.array([scripted(torch.from_numpy(audio[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES])[None], 16000).item()
                          for i in range(chunks)])
    vad = VoiceActivity(SileroVAD.load())
    cuts = np.cumsum(np.random.default_rng(0).integers(1, 5000, size=200))
    pieces = np.split(audio[: chunks * CHUNK_SAMPLES], cuts[cuts < chunks * CHUNK_SAMPLES])
    got = np.concatenate([vad(piece) for piece in pieces])
    assert torch.get_num_threads() == threads  # loading it must not touch the process's threads
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < 1e-4
    assert reference.max() > 0.9 and reference.min() < 0.1  # JFK has both speech and pauses


def test_local_agreement_ignores_case_and_punctuation() -> None:
    assert agreed_prefix(["And", "so", "my", "fellow"], ["and", "so,", "my", "friends"]) == 3
    assert agreed_prefix([], ["anything"]) == 0
    assert agreed_prefix(["Ask", "not!"], ["Ask", "not", "what"]) == 2
