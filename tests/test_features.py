"""Log-mel features against an independent numpy implementation of Whisper's recipe (librosa's Slaney
mel filters, periodic Hann window, reflect-padded centred frames)."""

from __future__ import annotations

import numpy as np
import torch

from app.audio import decode_audio
from tests.conftest import JFK
from workers.features import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, LogMelSpectrogram


def slaney_mel_filters(n_mels: int) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    fdiff, ramps = np.diff(mel_f), np.subtract.outer(mel_f, fft_freqs)
    weights = np.stack([np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1])) for i in range(n_mels)])
    return weights * (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]


def reference_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    audio = np.pad(audio.astype(np.float64), (0, N_SAMPLES - len(audio)))
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = slaney_mel_filters(n_mels) @ power[:-1].T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def test_log_mel_matches_reference() -> None:
    audio = decode_audio(JFK.read_bytes(), max_audio_s=60)
    ours = LogMelSpectrogram(80)(torch.from_numpy(audio)).numpy()
    assert ours.shape == (80, N_FRAMES)
    assert np.abs(ours - reference_log_mel(audio)).max() < 1e-4


def test_log_mel_of_a_full_window() -> None:
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(N_SAMPLES)).astype(np.float32)
    assert np.abs(LogMelSpectrogram(80)(torch.from_numpy(audio)).numpy() - reference_log_mel(audio)).max() < 1e-4
