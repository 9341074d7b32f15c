"""Whisper in plain torch: the encoder is the acoustic stage, the decoder the language-model stage.

The decoder works on a :class:`DecoderCache`: per-row self-attention keys/values that grow one token at
a time, and cross-attention keys/values computed once per request from its encoder output. Rows carry
their own positions, so a running batch can take in new rows between tokens and drop finished ones.
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

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        keys_t, values = kv
        q = _heads(self.q(x), self.n_head)
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ keys_t, dim=-1)
        return self.out(_merge(weights @ values))


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
                positions: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x), cache, positions, mask)
        x = x + self.cross_attn(self.cross_attn_ln(x), cross_kv)
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


class DecoderCache:
    """The running decode batch's memory, in row slots: live rows fill slots ``0..live-1``.

    Per layer: self-attention keys/values [R, L, D] that grow one token at a time, and the
    cross-attention keys [R, H, D/H, 1500] and values [R, H, 1500, D/H] of each row's audio, computed once when it joins.
    A finished row is replaced by the last live row (one row copied), so joining and leaving never
    copy the whole batch.
    """

    def __init__(self, decoder: TextDecoder, rows: int, length: int, audio_ctx: int):
        weight = decoder.token_embedding.weight
        d, n_head, n_layer = weight.shape[1], decoder.blocks[0].attn.n_head, len(decoder.blocks)
        new = lambda *shape: weight.new_zeros(shape)  # noqa: E731
        self.keys = [new(rows, length, d) for _ in range(n_layer)]
        self.values = [new(rows, length, d) for _ in range(n_layer)]
        self.cross = [(new(rows, n_head, d // n_head, audio_ctx), new(rows, n_head, audio_ctx, d // n_head))
                      for _ in range(n_layer)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=weight.device)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.keys[0].shape[0], self.keys[0].shape[1]

    def reserve(self, rows: int, length: int) -> None:
        """Grow (doubling) so that ``rows`` slots of ``length`` positions fit."""
        have_rows, have_length = self.capacity
        if rows <= have_rows and length <= have_length:
            return
        rows, length = max(rows, have_rows), max(length, have_length)
        if rows > have_rows:
            rows = max(rows, 2 * have_rows)
        if length > have_length:
            length = max(length, 2 * have_length)
        grow = lambda t, *dims: F.pad(t, dims)  # noqa: E731
        self.keys = [grow(k, 0, 0, 0, length - have_length, 0, rows - have_rows) for k in self.keys]
        self.values = [grow(v, 0, 0, 0, length - have_length, 0, rows - have_rows) for v in self.values]
        self.cross = [(grow(k, 0, 0, 0, 0, 0, 0, 0, rows - have_rows), grow(v, 0, 0, 0, 0, 0, 0, 0, rows - have_rows))
                      for k, v in self.cross]
        self.lengths = F.pad(self.lengths, (0, rows - have_rows))

    def move(self, src: int, dst: int) -> None:
        for tensors in (self.keys, self.values, *self.cross):
            for t in tensors:
                t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def slots(self, start: int, stop: int) -> DecoderState:
        return DecoderState(
            keys=[k[start:stop] for k in self.keys],
            values=[v[start:stop] for v in self.values],
            cross=[(k[start:stop], v[start:stop]) for k, v in self.cross],
            lengths=self.lengths[start:stop],
        )


@dataclass
class DecoderState:
    """Views of some slots of a :class:`DecoderCache`; writes go through to the cache."""

    keys: list[Tensor]
    values: list[Tensor]
    cross: list[tuple[Tensor, Tensor]]
    lengths: Tensor


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

    def forward(self, tokens: Tensor, counts: Tensor, state: DecoderState) -> Tensor:
        """Feed ``tokens`` [B, T] (row i's first ``counts[i]`` are real, the rest padding) after each
        row's filled positions; returns the final hidden states [B, T, D]."""
        width = tokens.shape[1]
        offsets = torch.arange(width, device=tokens.device)
        positions = (state.lengths[:, None] + offsets).clamp_(max=self.n_ctx - 1)
        # padding is written past a row's end too: masked now, overwritten by that row's next tokens
        span = int((state.lengths + width).max().clamp(max=self.n_ctx))
        keys_at = torch.arange(span, device=tokens.device)
        mask = (keys_at[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, span]

        x = self.token_embedding(tokens) + self.positional_embedding[positions]
        for i, block in enumerate(self.blocks):
            x = block(x, (state.keys[i], state.values[i]), state.cross[i], positions, mask)
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
