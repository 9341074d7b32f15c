"""Silero VAD (16 kHz) in plain torch, with the recurrent state kept outside the module.

The weights are those of the TorchScript model the ``silero-vad`` package ships (``silero_vad.jit``).
That model hides its LSTM state inside itself, so one instance can serve one stream only; here the
state is an argument and one module serves every stream.
``import silero_vad`` is avoided on purpose: it calls ``torch.set_num_threads(1)`` at import time,
which would slow the whole process down. (The package's ``silero_vad_16k.safetensors`` holds older
weights than its TorchScript model, so it is not used.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_SAMPLES = 512  # the model takes 32 ms of new audio at a time ...
CONTEXT_SAMPLES = 64  # ... after the last 4 ms of the chunk before it
STATE_SIZE = 128

# TorchScript name (its 16 kHz sub-model) -> ours
_NAMES = {
    "stft.forward_basis_buffer": "stft_conv.weight",
    **{f"encoder.{i}.reparam_conv.{p}": f"conv{i + 1}.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"decoder.rnn.{p}": f"lstm_cell.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "decoder.decoder.2.weight": "final_conv.weight",
    "decoder.decoder.2.bias": "final_conv.bias",
}


def shipped_model() -> Path:
    """The TorchScript model inside the installed ``silero-vad`` package, found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed: pip install silero-vad")
    return Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.jit"


class SileroVAD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_bins = 129
        self.stft_conv = nn.Conv1d(1, 2 * self.n_bins, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, STATE_SIZE)
        self.final_conv = nn.Conv1d(128, 1, 1)

    @classmethod
    def load(cls, path: Path | None = None) -> SileroVAD:
        scripted = torch.jit.load(str(path or shipped_model()), map_location="cpu")
        model = cls()
        model.load_state_dict({ours: scripted._model.state_dict()[theirs] for theirs, ours in _NAMES.items()})
        return model.eval()

    @staticmethod
    def initial_state() -> Tensor:
        """[2, 1, 128]: the LSTM's h and c for a stream that has not started."""
        return torch.zeros(2, 1, STATE_SIZE)

    def _encode(self, x: Tensor) -> Tensor:
        """[N, 64 + 512] -> [N, 128]: everything before the recurrent cell, for any number of chunks."""
        x = F.pad(x, (0, 64), mode="reflect").unsqueeze(1)
        x = self.stft_conv(x)
        x = (x[:, : self.n_bins] ** 2 + x[:, self.n_bins :] ** 2).sqrt()
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.relu(self.conv4(x)).squeeze(-1)

    def _probability(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.final_conv(F.relu(h).unsqueeze(-1))).flatten()

    @torch.inference_mode()
    def forward(self, audio: Tensor, context: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """T consecutive chunks of one stream: audio [T * 512], context [64] (the samples before it),
        state [2, 1, 128]. Returns each chunk's speech probability [T] and the next state. The
        convolutions run on all chunks at once (6x cheaper than chunk by chunk); only the cell steps."""
        chunks = torch.cat([context, audio]).unfold(0, CONTEXT_SAMPLES + CHUNK_SAMPLES, CHUNK_SAMPLES)
        features = self._encode(chunks)
        h, c = state[0], state[1]
        hidden = []
        for feature in features:
            h, c = self.lstm_cell(feature[None], (h, c))
            hidden.append(h)
        return self._probability(torch.cat(hidden)), torch.stack([h, c])
