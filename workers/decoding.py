"""Batched greedy decoding with iteration-level batching.

:class:`GreedyDecoder` keeps one running batch. ``add`` brings new rows in between tokens (their prompts
are fed in one padded forward pass and their cross-attention K/V computed once); ``step`` samples one
token for every row and hands back the rows that finished, so short utterances leave early and new ones
need not wait for the longest row. The token policy is a list of small logit filters, as in
openai/whisper: blank suppression, suppressed tokens, and the timestamp rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.model import DecoderCache, Whisper
from workers.tokenizer import WhisperTokenizer

SECONDS_PER_TIMESTAMP = 0.02
INITIAL_CACHE = (8, 64)  # rows, positions: a decoder's cache starts this small and doubles as its batch needs


@dataclass(frozen=True)
class DecodingOptions:
    sample_len: int = 224  # most tokens sampled for one window (half the text context, as openai/whisper)
    max_initial_timestamp_s: float = 1.0  # the first segment may not start later than this
    suppress_blank: bool = True  # no blank or end-of-text as the first text token
    max_prompt_tokens: int = 223  # previous-text prompt is cut to its last tokens to leave room to sample


@dataclass
class DecodeRow:
    """One window being decoded: its prompt in, its sampled tokens and scores out."""

    prompt: list[int]
    owner: Any = None  # what the stage attaches (the job); the decoder never looks at it
    max_tokens: int = 224  # a window's budget; a short window gets a small one (see token_budget)
    last_timestamp: int = 1500  # in encoder frames (20 ms): its window's end; decoding stops there
    forced: tuple[int, ...] = ()  # what its transcript must begin with (a stream's committed words): fed, not sampled
    tokens: list[int] = field(default_factory=list)
    sum_logprob: float = 0.0
    no_speech_prob: float = math.nan
    finished: bool = False

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) - len(self.forced) + 1)


def token_budget(duration_s: float) -> int:
    """Most tokens a window of this length can need: fast speech is about 5 tokens a second, plus its
    timestamps. A decoder caught in a repetition loop on a short window stops here instead of at 224,
    which bounds the time the loop can cost (a 1 s window: 36 steps instead of 224)."""
    return 24 + math.ceil(12 * duration_s)


class TimestampRules:
    """openai/whisper's ApplyTimestampRules: the first token is a timestamp no later than the initial
    limit; timestamps come in pairs (except right before end-of-text) and never go backwards. And a row's
    timestamps stop at its window's end, after which only end-of-text may follow (what a packed window's
    row sees past its end is the encoding of silence, not of its own padding)."""

    def __init__(self, tokenizer: WhisperTokenizer, max_initial_timestamp_s: float):
        self.begin = tokenizer.timestamp_begin
        self.eot = tokenizer.eot
        self.no_timestamps = tokenizer.no_timestamps
        self.max_initial = round(max_initial_timestamp_s / SECONDS_PER_TIMESTAMP)

    def apply(self, logits: Tensor, rows: list[DecodeRow]) -> None:
        logits[:, self.no_timestamps] = -math.inf
        for k, row in enumerate(rows):
            last = self.begin + row.last_timestamp
            logits[k, last + 1 :] = -math.inf
            seq = row.tokens
            if not seq:
                logits[k, : self.begin] = -math.inf
                logits[k, self.begin + self.max_initial + 1 :] = -math.inf
                continue
            last_was_timestamp = seq[-1] >= self.begin
            penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= self.begin
            if last_was_timestamp:
                if penultimate_was_timestamp:
                    logits[k, self.begin :] = -math.inf
                else:
                    logits[k, : self.eot] = -math.inf
            last_timestamp = next(t for t in reversed(seq) if t >= self.begin)
            if last_timestamp >= last:  # the window's end: nothing can follow
                logits[k, : self.eot] = -math.inf
                logits[k, self.eot + 1 :] = -math.inf
                continue
            # a segment must have non-zero length, or decoding could loop on empty segments
            floor = last_timestamp if (last_was_timestamp and not penultimate_was_timestamp) else last_timestamp + 1
            logits[k, self.begin : floor] = -math.inf
        # when timestamps together are likelier than any single text token, sample a timestamp
        logprobs = F.log_softmax(logits.float(), dim=-1)
        timestamp_wins = logprobs[:, self.begin :].logsumexp(-1) > logprobs[:, : self.begin].max(-1).values
        logits[timestamp_wins, : self.begin] = -math.inf


class GreedyDecoder:
    def __init__(self, model: Whisper, tokenizer: WhisperTokenizer, options: DecodingOptions,
                 suppress_tokens: list[int], suppress_at_begin: list[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        device = model.decoder.token_embedding.weight.device
        self.suppress = torch.tensor(sorted(set(suppress_tokens)), dtype=torch.long, device=device)
        self.suppress_at_begin = torch.tensor(suppress_at_begin, dtype=torch.long, device=device)
        self.timestamp_rules = TimestampRules(tokenizer, options.max_initial_timestamp_s)
        self.rows: list[DecodeRow] = []  # rows[i] lives in slot i of the cache
        self.cache = self._new_cache()

    def _new_cache(self) -> DecoderCache:
        return DecoderCache(self.model.decoder, rows=INITIAL_CACHE[0], length=INITIAL_CACHE[1], audio_ctx=self.model.dims.n_audio_ctx)

    @property
    def running(self) -> int:
        return len(self.rows)

    @torch.inference_mode()  # retiring moves rows within the cache, whose tensors are inference tensors once it grew
    def remove(self, rows: list[DecodeRow]) -> None:
        """Drop ``rows`` from the running batch (their callers have gone) without finishing them."""
        for row in rows:
            row.finished = True
        self._retire()

    def release_memory(self) -> None:
        """With no row running: give back the cache a large batch grew (it would otherwise stay at its peak)."""
        if not self.rows and self.cache.capacity > INITIAL_CACHE:
            self.cache = self._new_cache()

    @torch.inference_mode()
    def add(self, rows: list[DecodeRow], audio_features: Tensor) -> list[DecodeRow]:
        """Join ``rows`` (encoder output ``audio_features`` [len(rows), 1500, D]) to the running batch:
        feed their prompts and sample their first token. Returns rows that already finished."""
        decoder, device = self.model.decoder, audio_features.device
        start, stop = len(self.rows), len(self.rows) + len(rows)
        width = max(len(r.prompt) + len(r.forced) for r in rows)
        self._reserve(stop, width)
        state = self.cache.slots(start, stop)
        state.lengths.zero_()
        decoder.project_audio(audio_features, state)
        tokens = torch.full((len(rows), width), self.tokenizer.eot, dtype=torch.long)
        for i, row in enumerate(rows):
            row.tokens = list(row.forced)
            tokens[i, : len(row.prompt) + len(row.forced)] = torch.tensor([*row.prompt, *row.forced])
        counts = torch.tensor([len(r.prompt) + len(r.forced) for r in rows], device=device)
        hidden = decoder(tokens.to(device), counts, state)
        self.rows.extend(rows)
        index = torch.arange(len(rows), device=device)
        # no-speech probability is read at the start-of-transcript token (openai/whisper)
        sot_at = torch.tensor([r.prompt.index(self.tokenizer.sot) for r in rows], device=device)
        no_speech = decoder.logits(hidden[index, sot_at]).float().softmax(-1)[:, self.tokenizer.no_speech]
        for row, p in zip(rows, no_speech.tolist()):
            row.no_speech_prob = p
        return self._sample(decoder.logits(hidden[index, counts - 1]), rows)

    @torch.inference_mode()
    def step(self) -> list[DecodeRow]:
        """Sample one more token for every running row; returns the rows that finished."""
        if not self.rows:
            return []
        self._reserve(len(self.rows), 1)
        state = self.cache.slots(0, len(self.rows))
        device = state.lengths.device
        tokens = torch.tensor([[r.tokens[-1]] for r in self.rows], device=device)
        hidden = self.model.decoder(tokens, torch.ones(len(self.rows), dtype=torch.long, device=device), state)
        return self._sample(self.model.decoder.logits(hidden[:, 0]), self.rows)

    def _reserve(self, rows: int, width: int) -> None:
        longest = int(self.cache.lengths[: len(self.rows)].max()) if self.rows else 0
        self.cache.reserve(rows, min(longest + width, self.model.decoder.n_ctx))

    def _sample(self, logits: Tensor, rows: list[DecodeRow]) -> list[DecodeRow]:
        """Choose the next token of each of ``rows`` (one row of ``logits`` each); retire finished rows."""
        logits = logits.float()
        logits[:, self.suppress] = -math.inf
        if self.options.suppress_blank:
            for k, row in enumerate(rows):
                if not any(t < self.tokenizer.eot for t in row.tokens) and row.tokens:
                    logits[k, self.suppress_at_begin] = -math.inf
        self.timestamp_rules.apply(logits, rows)
        logprobs = F.log_softmax(logits, dim=-1)
        chosen = logits.argmax(-1)
        chosen_logprob = logprobs.gather(1, chosen[:, None])[:, 0]
        max_length = self.model.decoder.n_ctx - 1
        for row, token, logprob in zip(rows, chosen.tolist(), chosen_logprob.tolist()):
            row.sum_logprob += logprob
            if token == self.tokenizer.eot:
                row.finished = True
                continue
            row.tokens.append(token)
            if len(row.tokens) >= min(self.options.sample_len, row.max_tokens) or len(row.prompt) + len(row.tokens) >= max_length:
                row.finished = True
        return self._retire()

    def _retire(self) -> list[DecodeRow]:
        finished = [r for r in self.rows if r.finished]
        slot = 0
        while slot < len(self.rows):
            if self.rows[slot].finished:
                last = len(self.rows) - 1
                if slot != last:
                    self.cache.move(last, slot)
                    self.rows[slot] = self.rows[last]
                self.rows.pop()
            else:
                slot += 1
        return finished
