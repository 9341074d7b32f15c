"""Word timestamps from the decoder's cross-attention, as openai-whisper's ``timing.py`` finds them.

A window's transcript is fed again after its start-of-transcript sequence and ``<|notimestamps|>``; the
attention of the model's alignment heads (listed in its ``config.json``) over the window's own frames is
normalised per head, median-filtered along time, averaged over the heads, and dynamic time warping finds the
monotonic path of tokens through frames. A word starts where the path enters its first token and ends where
it enters the next word's. Punctuation is merged into its word, and the same guards as openai-whisper's keep
a word after a pause or at a sentence's end from stretching over silence.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MEDIAN_FILTER_WIDTH = 7
FRAMES_PER_SECOND = 50  # encoder frames: 20 ms each
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds from the start of the request's audio
    end: float
    probability: float


@dataclass
class TokenAlignment:
    """What the decoder stage finds for one window: per text token, where the path first reaches it (in
    seconds of the window; one more for end-of-text) and its probability."""

    tokens: list[int]  # the window's text tokens
    jump_times: list[float]  # len(tokens) + 1
    probabilities: list[float]  # len(tokens)


@dataclass
class _Word:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """A median filter of odd ``width`` along the last dimension of ``x`` [..., T] (reflect padding)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    x = F.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect")
    return x.unfold(-1, width, 1).sort()[0][..., pad].reshape(shape)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost`` [N, M] from (0, 0) to (N-1, M-1) as (rows, columns):
    openai-whisper's ``dtw_cpu``, its ties broken the same way, computed one anti-diagonal at a time."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    total[0, 0] = 0
    x = cost.astype(np.float32)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2)).astype(np.int8)
        total[i, j] = x[i - 1, j - 1] + np.choose(step, [c0, c1, c2])
        trace[i, j] = step
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    rows, columns = np.array(path[::-1]).T
    return rows, columns


def token_alignment(scores: torch.Tensor, start: int, tokens: list[int], token_probabilities: list[float]) -> TokenAlignment:
    """``scores`` [heads, fed, frames]: the alignment heads' attention logits for the fed sequence (start-of-
    transcript sequence, no-timestamps, the ``tokens``, end-of-text) over the window's own frames; ``start`` is
    where no-timestamps is."""
    weights = scores.float().softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, MEDIAN_FILTER_WIDTH)
    matrix = weights.mean(dim=0)[start:-1]  # the rows that predict each text token, then end-of-text
    rows, columns = dtw(-matrix.double().cpu().numpy())
    jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    return TokenAlignment(tokens, (columns[jumps] / FRAMES_PER_SECOND).tolist(), token_probabilities)


def split_words(tokens: list[int], decode: Callable[[list[int]], str], eot: int) -> tuple[list[str], list[list[int]]]:
    """Tokens -> words (openai-whisper's split_tokens_on_spaces): a word begins at a token that starts with a
    space, at punctuation and at a special token (``>= eot``); a piece ends at a token that completes its
    characters' bytes. ``decode``: token ids -> text, special tokens kept."""
    pieces, piece_tokens, current = [], [], []
    full = decode(tokens)
    offset = 0
    for token in tokens:
        current.append(token)
        text = decode(current)
        if "\ufffd" not in text or full[offset + text.index("\ufffd")] == "\ufffd":
            pieces.append(text)
            piece_tokens.append(current)
            offset += len(text)
            current = []
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for piece, ids in zip(pieces, piece_tokens):
        if ids[0] >= eot or piece.startswith(" ") or piece.strip() in string.punctuation or not words:
            words.append(piece)
            word_tokens.append(list(ids))
        else:
            words[-1] += piece
            word_tokens[-1].extend(ids)
    return words, word_tokens


def merge_punctuations(words: list[_Word]) -> None:
    """Opening punctuation joins the word after it, closing punctuation the word before (openai-whisper)."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        previous, following = words[i], words[j]
        if previous.word.startswith(" ") and previous.word.strip() in PREPEND_PUNCTUATIONS:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        previous, following = words[i], words[j]
        if not previous.word.endswith(" ") and following.word in APPEND_PUNCTUATIONS:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def segment_words(spans: list[tuple[float, float, list[int]]], alignment: TokenAlignment, decode: Callable[[list[int]], str],
                  eot: int, last_speech_s: float) -> list[tuple[float, float, list[WordTiming]]]:
    """openai-whisper's add_word_timestamps for one window: its segments ``spans`` (start, end, text tokens, in
    seconds of the window) -> each segment's start and end, adjusted to its words, and its words. A word at a
    sentence's end, or the first after a pause (``last_speech_s``: where speech last ended), is kept from
    stretching past twice the median word's length."""
    words, word_tokens = split_words([*alignment.tokens, eot], decode, eot)
    if len(word_tokens) <= 1:
        return [(start, end, []) for start, end, _ in spans]
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.array(alignment.jump_times)
    timings = [_Word(word, tokens, float(start), float(end), float(np.mean(alignment.probabilities[i:j])))
               for word, tokens, start, end, i, j in zip(words, word_tokens, jumps[boundaries[:-1]], jumps[boundaries[1:]],
                                                         boundaries[:-1], boundaries[1:])]
    durations = np.array([w.end - w.start for w in timings])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for previous, word in zip(timings, timings[1:]):
            if word.end - word.start > longest:
                if word.word in SENTENCE_END_MARKS:
                    word.end = word.start + longest
                elif previous.word in SENTENCE_END_MARKS:
                    word.start = word.end - longest
    merge_punctuations(timings)

    out = []
    index = 0
    for span_start, span_end, tokens in spans:
        text_tokens = [t for t in tokens if t < eot]
        saved, kept = 0, []
        while index < len(timings) and saved < len(text_tokens):
            timing = timings[index]
            if timing.word:
                kept.append(_Word(timing.word, timing.tokens, round(timing.start, 2), round(timing.end, 2), timing.probability))
            saved += len(timing.tokens)
            index += 1
        if kept:
            first, last = kept[0], kept[-1]
            # the first word after a pause is not longer than twice the median word
            if first.end - last_speech_s > median * 4 and (
                first.end - first.start > longest or (len(kept) > 1 and kept[1].end - first.start > longest * 2)
            ):
                if len(kept) > 1 and kept[1].end - kept[1].start > longest:
                    boundary = max(kept[1].end / 2, kept[1].end - longest)
                    first.end = kept[1].start = boundary
                first.start = max(0.0, first.end - longest)
            # the segment's own timestamps win over a first or last word that is too long
            if span_start < first.end and span_start - 0.5 > first.start:
                first.start = max(0.0, min(first.end - median, span_start))
            else:
                span_start = first.start
            if span_end > last.start and span_end + 0.5 < last.end:
                last.end = max(last.start + median, span_end)
            else:
                span_end = last.end
            last_speech_s = span_end
        out.append((span_start, span_end, kept))
    return _ordered_and_contained(out)


def _ordered_and_contained(segments: list[tuple[float, float, list[_Word]]]) -> list[tuple[float, float, list[WordTiming]]]:
    """Where openai-whisper's guards leave a word starting before the one it follows, or past its segment's
    timestamps, the word starts with the one before and the segment widens to hold its words."""
    out, previous = [], 0.0
    for start, end, words in segments:
        for word in words:
            word.start = previous = max(word.start, previous)
            word.end = max(word.end, word.start)
        if words:
            start, end = min(start, words[0].start), max(end, words[-1].end)
        out.append((start, end, [WordTiming(w.word, w.start, w.end, w.probability) for w in words]))
    return out
