"""Encoder packing: several short windows share one encoder pass, each still decoded on its own.

Whisper's encoder sees 30 s (1500 encoder frames); a LibriSpeech utterance is 7.7 s, so an unpacked pass
spends three quarters of its work on padding. A packed pass lays windows end to end, each followed by a guard
of its own silence, and ends in a tail of silence; then

- each window is convolved on its own, its encoder self-attention sees only its own frames and the tail, and
  the tail sees only itself (a block mask): no frame of one window is computed from another's;
- each window's frames carry positions counted from 0, as if it began its own pass, so its timestamps are its own;
- its decoder row sees its own frames followed by the encoder's output for 30 s of silence from there on (one
  constant, computed at start), as an unpacked window is followed by padding; its timestamps stop at its end.

A window's transcript is then a function of its own audio only: the same whichever windows share its pass,
and the same as in a pass of its own (tests/test_packing.py). The pass is only as long as its windows and
the tail: nothing attends to the room after the last window, so it is not computed at all.

Why the tail and the silence: Whisper finds the end of speech by attending to the padding after it. Without
a tail in the encoder and silence in the decoder, a window loops on its last phrase (WER 37 % against 19 %
unpacked on ``../shared/eval``); with the 4 s tail alone in both, short clips still repeat their last word.

:class:`FirstFitPacker` is the acoustic stage's batching policy: which windows go together, first fit in
the order the scheduler offers them. :func:`first_fit` and :class:`PassInput` are the batch as data.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from workers.features import HOP_LENGTH, N_FRAMES

T = TypeVar("T")

TAIL_FRAMES = 400  # 4 s of silence ending every packed pass
GUARD_FRAMES = 50  # 0.5 s of a window's own silence after it
TAIL_VALUE = -1.5  # the log-mel of digital silence, as the features normalise an all-zero window
PACKABLE_FRAMES = N_FRAMES - TAIL_FRAMES  # room for windows and their guards in one pass
ENCODER_STRIDE = 2  # mel frames per encoder frame (conv2's stride); one encoder frame is one timestamp, 20 ms


class PackingMode(enum.StrEnum):
    SHARED = "shared"  # any windows may share a pass
    PER_KEY = "per_key"  # only windows of the same API key share a pass
    OFF = "off"  # every window has its own pass, padded to 30 s (Whisper's own layout)


def packed_frames(samples: int) -> int:
    """Mel frames a window of ``samples`` takes in a pass: its audio and guard, rounded up to whole encoder frames."""
    frames = math.ceil(samples / HOP_LENGTH) + GUARD_FRAMES
    return frames + frames % ENCODER_STRIDE


@dataclass(frozen=True)
class Placement:
    """Where one window sits in its pass, in mel frames."""

    offset: int
    frames: int  # its audio and guard

    @property
    def encoder_span(self) -> tuple[int, int]:
        return self.offset // ENCODER_STRIDE, (self.offset + self.frames) // ENCODER_STRIDE


@dataclass(frozen=True)
class PassLayout:
    """One encoder pass: its windows (indices into the batch) and where each sits; ``packed`` False is the
    unpacked layout of a single window (a window too long to pack, or packing off)."""

    members: tuple[tuple[int, Placement], ...]
    packed: bool

    @property
    def used_frames(self) -> int:
        return sum(p.frames for _, p in self.members)


@dataclass(frozen=True)
class EncodedWindow:
    """What the decoder needs of one window: encoder output [1500, D] (its own frames, then silence) and the
    last timestamp (in encoder frames, 20 ms, from its start) it may emit."""

    audio_features: torch.Tensor
    last_timestamp: int

    @classmethod
    def alone(cls, audio_features: torch.Tensor) -> EncodedWindow:
        """A window that had its pass to itself, padded to 30 s (Whisper's own layout)."""
        return cls(audio_features, audio_features.shape[0])


def first_fit(sizes: Sequence[int], tenants: Sequence[str], mode: PackingMode) -> list[PassLayout]:
    """Windows of ``sizes`` samples into passes, each into the first pass it fits (and, per key, whose
    windows share its tenant), in the order given."""
    passes: list[tuple[list[tuple[int, Placement]], str, int]] = []  # members, tenant, used frames
    layouts: list[PassLayout] = []
    for index, (samples, tenant) in enumerate(zip(sizes, tenants)):
        frames = packed_frames(samples)
        if mode is PackingMode.OFF or frames > PACKABLE_FRAMES:
            layouts.append(PassLayout(((index, Placement(0, N_FRAMES)),), packed=False))
            continue
        for k, (members, owner, used) in enumerate(passes):
            if used + frames <= PACKABLE_FRAMES and (mode is PackingMode.SHARED or owner == tenant):
                members.append((index, Placement(used, frames)))
                passes[k] = (members, owner, used + frames)
                break
        else:
            passes.append(([(index, Placement(0, frames))], tenant, frames))
    return layouts + [PassLayout(tuple(members), packed=True) for members, _, _ in passes]


class FirstFitPacker(Generic[T]):
    """The acoustic stage's batching policy: a batch is at most ``passes`` encoder passes of windows packed
    first fit. ``size`` and ``tenant`` read an item's samples and its API key's tenant."""

    def __init__(self, passes: int, mode: PackingMode, size: Callable[[T], int], tenant: Callable[[T], str]):
        self.passes, self.mode, self.size, self.tenant = passes, mode, size, tenant

    def layout(self, items: Sequence[T]) -> list[PassLayout]:
        return first_fit([self.size(i) for i in items], [self.tenant(i) for i in items], self.mode)

    def fits(self, items: Sequence[T]) -> bool:
        frames = [packed_frames(self.size(i)) for i in items]
        packable = [f for f in frames if f <= PACKABLE_FRAMES]
        if sum(packable) > (self.passes - (len(frames) - len(packable))) * PACKABLE_FRAMES:
            return False  # cannot fit, whatever the layout: a queue of hundreds is answered without laying it out
        return len(self.layout(items)) <= self.passes


@dataclass(frozen=True)
class PassInput:
    """What the encoder runs for one pass."""

    mel: torch.Tensor  # [n_mels, 2T]: 3000 mel frames unpacked, its windows and tail packed
    mask: torch.Tensor | None  # [T, T], True where encoder frame i may attend to frame j; None: all to all
    positions: torch.Tensor  # [T]: each encoder frame's position embedding
    segments: tuple[tuple[int, int], ...]  # mel-frame ranges convolved each on its own: the windows and the tail

    @classmethod
    def alone(cls, mel: torch.Tensor) -> PassInput:
        """One window's log-mel [n_mels, 3000] padded to 30 s, all frames attending to all (Whisper's own layout)."""
        return cls(mel, None, torch.arange(mel.shape[-1] // ENCODER_STRIDE), ((0, mel.shape[-1]),))


def encoder_input(mels: Sequence[torch.Tensor], layout: PassLayout) -> PassInput:
    """One pass's input from the windows' own log-mels (each [n_mels, 3000], computed alone: Whisper's
    normalisation is per window). A packed pass is only as long as its windows and the tail: no frame
    attends to the room left after the last window, so computing it would change nothing."""
    if not layout.packed:
        (index, _), = layout.members
        return PassInput.alone(mels[index])
    used = layout.used_frames
    ctx, tail = (used + TAIL_FRAMES) // ENCODER_STRIDE, used // ENCODER_STRIDE
    mel = torch.full((mels[0].shape[0], used + TAIL_FRAMES), TAIL_VALUE)
    mask = torch.zeros(ctx, ctx, dtype=torch.bool)
    mask[:, tail:] = True  # every frame sees the tail; the tail sees only itself
    positions = torch.empty(ctx, dtype=torch.long)
    positions[tail:] = torch.arange(N_FRAMES // ENCODER_STRIDE - (ctx - tail), N_FRAMES // ENCODER_STRIDE)  # where a 30 s pass ends
    for index, place in layout.members:
        mel[:, place.offset : place.offset + place.frames] = mels[index][:, : place.frames]
        start, stop = place.encoder_span
        mask[start:stop, start:stop] = True
        positions[start:stop] = torch.arange(stop - start)
    segments = tuple((place.offset, place.offset + place.frames) for _, place in layout.members) + ((used, used + TAIL_FRAMES),)
    return PassInput(mel, mask, positions, segments)


def stack(passes: Sequence[PassInput]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[tuple[tuple[int, int], ...]]]:
    """A batch of passes as the encoder takes it: log-mels [B, n_mels, L], mask [B, 1, L/2, L/2] (None when
    every pass is unpacked), positions [B, L/2] and segments, shorter passes padded to the longest. Padding
    frames attend only to themselves and nothing attends to them."""
    length = max(p.mel.shape[-1] for p in passes)
    ctx = length // ENCODER_STRIDE
    mel = torch.stack([torch.nn.functional.pad(p.mel, (0, length - p.mel.shape[-1]), value=TAIL_VALUE) for p in passes])
    positions = torch.stack([torch.cat([p.positions, torch.arange(len(p.positions), ctx)]) for p in passes])
    segments = [p.segments + (((p.mel.shape[-1], length),) if p.mel.shape[-1] < length else ()) for p in passes]
    if all(p.mask is None for p in passes):
        return mel, None, positions, segments
    mask = torch.eye(ctx, dtype=torch.bool).repeat(len(passes), 1, 1)
    for k, p in enumerate(passes):
        n = len(p.positions)
        mask[k, :n, :n] = True if p.mask is None else p.mask
    return mel, mask[:, None], positions, segments


def encoded_windows(audio_features: torch.Tensor, layout: PassLayout, samples: Sequence[int],
                    silence: torch.Tensor) -> list[tuple[int, EncodedWindow]]:
    """Each window of a pass (encoder output ``audio_features``) with what its decoder row needs; ``silence``
    is the encoder's output [1500, D] for 30 s of digital silence."""
    if not layout.packed:
        (index, _), = layout.members
        return [(index, EncodedWindow.alone(audio_features))]
    out = []
    for index, place in layout.members:
        start, stop = place.encoder_span
        features = torch.cat([audio_features[start:stop], silence[stop - start :]])
        out.append((index, EncodedWindow(features, math.ceil(samples[index] / HOP_LENGTH / ENCODER_STRIDE))))
    return out
