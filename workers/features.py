"""Log-mel features, computed as openai/whisper does: 25 ms Hann windows every 10 ms, Slaney mel filters."""

from __future__ import annotations

import torch
import torchaudio

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # the encoder always sees 30 s: shorter input is zero-padded
N_FRAMES = N_SAMPLES // HOP_LENGTH


class LogMelSpectrogram:
    def __init__(self, n_mels: int = 80):
        self.window = torch.hann_window(N_FFT)
        self.filters = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
        ).T.contiguous()  # [n_mels, n_freqs]

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [samples] float32 at 16 kHz, at most 30 s -> log-mel [n_mels, 3000] of the zero-padded window."""
        if audio.shape[-1] > N_SAMPLES:
            raise ValueError(f"a window holds at most {N_SAMPLES} samples, got {audio.shape[-1]}")
        audio = torch.nn.functional.pad(audio, (0, N_SAMPLES - audio.shape[-1]))
        stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0
