"""Whisper in plain torch: the encoder is the acoustic stage, the decoder the language-model stage.

The decoder works on a :class:`DecoderCache`: per-hypothesis self-attention keys/values that grow one token
at a time, and cross-attention keys/values computed once per window from its encoder output and shared by all
of that window's hypotheses (its beams). Rows carry their own positions, so a running batch can take in new
rows between tokens and drop finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        # fp16 layer norm loses too much precision; compute in fp32 and cast back (as openai/whisper does)
        return super().forward(x.float()).type(x.dtype)


def _heads(x: Tensor, n_head: int) -> Tensor:
    """[B, T, D] -> [B, H, T, D/H]"""
    return x.unflatten(-1, (n_head, -1)).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, H, T, D/H] -> [B, T, D]"""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_state, 3 * n_state)  # fused q, k, v; the key's bias is zero
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None,
                positions: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, T, D]. With a cache ([B, capacity, D] keys and values), this call's keys and values
        are written at ``positions`` [B, T] and the queries attend to the cache under ``mask``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if cache is not None:
            keys, values = cache
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            keys[rows, positions] = k
            values[rows, positions] = v
            span = mask.shape[-1]
            k, v = keys[:, :span], values[:, :span]
        out = F.scaled_dot_product_attention(
            _heads(q, self.n_head), _heads(k, self.n_head), _heads(v, self.n_head), attn_mask=mask
        )
        return self.out(_merge(out))


class CrossAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_state, n_state)
        self.kv = nn.Linear(n_state, 2 * n_state)  # fused k, v; the key's bias is zero
        self.out = nn.Linear(n_state, n_state)

    def project(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output [B, 1500, D] -> keys transposed [B, H, D/H, 1500] and values [B, H, 1500, D/H],
        once per request. Keys are stored transposed: one query against 1500 keys is a plain matmul."""
        k, v = self.kv(audio).chunk(2, dim=-1)
        return _heads(k, self.n_head).transpose(-1, -2).contiguous(), _heads(v, self.n_head).contiguous()

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], groups: AudioGroups | None = None,
                scores: list[Tensor] | None = None) -> Tensor:
        """x [R, T, D] against keys/values [A, ...]: row i attends to audio i, or, with ``groups`` (one token
        per row), each audio's rows form one query sequence against that audio's keys: beams share them.
        ``scores``, if given, receives the attention logits [R, H, T, frames] (word timestamps align on them)."""
        keys_t, values = kv
        q = _heads(self.q(x), self.n_head)  # [R, H, T, D/H]
        if groups is not None:
            q = q[:, :, 0][groups.rows].transpose(1, 2)  # [A, H, n, D/H]
        logits = (q * q.shape[-1] ** -0.5) @ keys_t
        if scores is not None:
            scores.append(logits)
        weights = torch.softmax(logits, dim=-1)
        out = weights @ values
        if groups is not None:
            out = out.transpose(1, 2).flatten(0, 1)[groups.at][:, :, None]  # back to [R, H, 1, D/H]
        return self.out(_merge(out))


def _mlp(n_state: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn, self.attn_ln = SelfAttention(n_state, n_head), LayerNorm(n_state)
        self.mlp, self.mlp_ln = _mlp(n_state), LayerNorm(n_state)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask)
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn, self.attn_ln = SelfAttention(n_state, n_head), LayerNorm(n_state)
        self.cross_attn, self.cross_attn_ln = CrossAttention(n_state, n_head), LayerNorm(n_state)
        self.mlp, self.mlp_ln = _mlp(n_state), LayerNorm(n_state)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor], cross_kv: tuple[Tensor, Tensor],
                positions: Tensor, mask: Tensor, groups: AudioGroups | None = None, scores: list[Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), cache, positions, mask)
        x = x + self.cross_attn(self.cross_attn_ln(x), cross_kv, groups, scores)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.empty(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(EncoderBlock(dims.n_audio_state, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = LayerNorm(dims.n_audio_state)

    def forward(self, mel: Tensor, mask: Tensor | None = None, positions: Tensor | None = None,
                segments: list[tuple[tuple[int, int], ...]] | None = None) -> Tensor:
        """mel [B, n_mels, 2T] -> audio features [B, T, D] (T = 1500 for 30 s). A packed pass (see
        workers/packing.py) gives ``mask`` [B, 1, T, T] (True: frame i may attend to frame j), each frame's
        ``positions`` [B, T], and per item the mel-frame ``segments`` [start, stop) that are convolved each on
        its own, as if it began a pass: no neighbour reaches a window through the convolutions' edges."""
        if segments is None:
            x = self._convolve(mel)
        else:
            x = torch.stack([torch.cat([self._convolve(m[None, :, a:b])[0] for a, b in spans]) for m, spans in zip(mel, segments)])
        x = x + (self.positional_embedding if positions is None else self.positional_embedding[positions])
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_post(x)


    def _convolve(self, mel: Tensor) -> Tensor:
        """mel [B, n_mels, 2T] -> [B, T, D]"""
        return F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)


@dataclass(frozen=True)
class AudioGroups:
    """Which rows (hypothesis slots) attend to which audio slot, when that is not row i to audio i: audio ``a``'s
    rows are ``rows[a, :count]`` (the rest repeat one of them and are ignored), and row ``r`` reads its output
    at ``at[r]`` of the flattened [A * n] result."""

    rows: Tensor  # [A, n]
    at: Tensor  # [R]


class DecoderCache:
    """The running decode batch's memory, in slots.

    Hypothesis slots (live ones fill ``0..live-1``), per layer: self-attention keys/values [R, L, D] that grow
    one token at a time. Audio slots (live ones fill ``0..audio-1``), per layer: the cross-attention keys
    [A, H, D/H, 1500] and values [A, H, 1500, D/H] of each window's encoder output, computed once when it joins
    and shared by all of its hypotheses. A freed slot is filled with the last live one (one slot copied), so
    joining and leaving never copy the whole batch.
    """

    def __init__(self, decoder: TextDecoder, rows: int, length: int, audio_rows: int, audio_ctx: int):
        weight = decoder.token_embedding.weight
        d, n_head, n_layer = weight.shape[1], decoder.blocks[0].attn.n_head, len(decoder.blocks)
        new = lambda *shape: weight.new_zeros(shape)  # noqa: E731
        self.keys = [new(rows, length, d) for _ in range(n_layer)]
        self.values = [new(rows, length, d) for _ in range(n_layer)]
        self.cross = [(new(audio_rows, n_head, d // n_head, audio_ctx), new(audio_rows, n_head, audio_ctx, d // n_head))
                      for _ in range(n_layer)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=weight.device)

    @property
    def capacity(self) -> tuple[int, int, int]:
        """Hypothesis slots, positions, audio slots."""
        return self.keys[0].shape[0], self.keys[0].shape[1], self.cross[0][0].shape[0]

    def reserve(self, rows: int, length: int, audio_rows: int) -> None:
        """Grow (doubling) so that ``rows`` hypothesis slots of ``length`` positions and ``audio_rows`` audio slots fit."""
        have_rows, have_length, have_audio = self.capacity
        grown = lambda want, have: have if want <= have else max(want, 2 * have)  # noqa: E731
        rows, length, audio_rows = grown(rows, have_rows), grown(length, have_length), grown(audio_rows, have_audio)
        if (rows, length) != (have_rows, have_length):
            pad = (0, 0, 0, length - have_length, 0, rows - have_rows)
            self.keys = [F.pad(k, pad) for k in self.keys]
            self.values = [F.pad(v, pad) for v in self.values]
            self.lengths = F.pad(self.lengths, (0, rows - have_rows))
        if audio_rows != have_audio:
            pad = (0, 0, 0, 0, 0, 0, 0, audio_rows - have_audio)
            self.cross = [(F.pad(k, pad), F.pad(v, pad)) for k, v in self.cross]

    def move(self, src: int, dst: int) -> None:
        """Hypothesis slot ``src`` into ``dst``."""
        self.copy([src], [dst])

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Hypothesis slots ``src`` into ``dst`` (a beam that continues another's text takes its keys and values)."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def move_audio(self, src: int, dst: int) -> None:
        for pair in self.cross:
            for t in pair:
                t[dst] = t[src]

    def state(self, rows: tuple[int, int], audio: tuple[int, int], groups: AudioGroups | None = None) -> DecoderState:
        """Views of hypothesis slots ``rows`` [start, stop) and audio slots ``audio`` [start, stop)."""
        (start, stop), (a, b) = rows, audio
        return DecoderState(
            keys=[k[start:stop] for k in self.keys],
            values=[v[start:stop] for v in self.values],
            cross=[(k[a:b], v[a:b]) for k, v in self.cross],
            lengths=self.lengths[start:stop],
            groups=groups,
        )


@dataclass
class DecoderState:
    """Views of some slots of a :class:`DecoderCache`; writes go through to the cache. Without ``groups``,
    row i attends to audio i."""

    keys: list[Tensor]
    values: list[Tensor]
    cross: list[tuple[Tensor, Tensor]]
    lengths: Tensor
    groups: AudioGroups | None = None


class TextDecoder(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.n_ctx = dims.n_text_ctx
        self.token_embedding = nn.Embedding(dims.n_vocab, dims.n_text_state)
        self.register_buffer("positional_embedding", torch.empty(dims.n_text_ctx, dims.n_text_state))
        self.blocks = nn.ModuleList(DecoderBlock(dims.n_text_state, dims.n_text_head) for _ in range(dims.n_text_layer))
        self.ln = LayerNorm(dims.n_text_state)

    def project_audio(self, audio: Tensor, state: DecoderState) -> None:
        """Write the cross-attention keys/values of encoder output [B, 1500, D] into ``state``'s slots."""
        for block, (keys, values) in zip(self.blocks, state.cross):
            k, v = block.cross_attn.project(audio)
            keys.copy_(k)
            values.copy_(v)

    def forward(self, tokens: Tensor, counts: Tensor, state: DecoderState, scores: list[Tensor] | None = None) -> Tensor:
        """Feed ``tokens`` [B, T] (row i's first ``counts[i]`` are real, the rest padding) after each
        row's filled positions; returns the final hidden states [B, T, D]. ``scores``, if given, receives each
        layer's cross-attention logits [B, H, T, frames]."""
        width = tokens.shape[1]
        offsets = torch.arange(width, device=tokens.device)
        positions = (state.lengths[:, None] + offsets).clamp_(max=self.n_ctx - 1)
        # padding is written past a row's end too: masked now, overwritten by that row's next tokens
        span = int((state.lengths + width).max().clamp(max=self.n_ctx))
        keys_at = torch.arange(span, device=tokens.device)
        mask = (keys_at[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, span]

        x = self.token_embedding(tokens) + self.positional_embedding[positions]
        for i, block in enumerate(self.blocks):
            x = block(x, (state.keys[i], state.values[i]), state.cross[i], positions, mask, state.groups, scores)
        state.lengths += counts
        return self.ln(x)

    def freeze(self) -> None:
        """Lay the weights out for inference once they are loaded. On the CPU, every linear layer and the
        tied output projection run from fp16-packed weights (see :class:`Fp16Linear`)."""
        weight = self.token_embedding.weight
        if weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            parents = [m for m in self.blocks.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
            for parent in parents:
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, Fp16Linear(child.weight, child.bias))
            self.output_projection = Fp16Linear(weight, None)
        else:
            self.output_projection = lambda hidden: F.linear(hidden, weight)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., D] -> logits [..., V]"""
        return self.output_projection(hidden)


class Fp16Linear(nn.Module):
    """A linear layer whose weight is stored in fp16, packed for fbgemm; inputs and outputs stay fp32.

    A CPU decode step multiplies a few rows by every decoder weight, so it is bound by reading them:
    fbgemm's fp16 kernel halves the bytes and avoids MKL's slow skinny GEMMs. The output projection
    (51864 x 384) at batch 8 on 2 cores takes 4.6 ms instead of 14.4 ms. The weights lose what fp16
    loses (2e-4 relative), the precision the CUDA path runs at anyway; activations are not quantised, so
    a row's result does not depend on its batch mates.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)
