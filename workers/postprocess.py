"""Tokens -> text and timed segments, with Whisper's guards against hallucinated text."""

from __future__ import annotations

from configs.policies import GuardsPolicy
from workers.decoding import SECONDS_PER_TIMESTAMP, DecodeRow, compression_ratio
from workers.jobs import Segment, WindowResult
from workers.timing import WordTiming, segment_words
from workers.tokenizer import WhisperTokenizer


def collapse_repeats(words: list[str], max_repeats: int, longest_phrase: int = 20) -> list[str]:
    """Cut any phrase (1..longest_phrase words) that repeats more than ``max_repeats`` times in a row."""
    for size in range(1, longest_phrase + 1):
        out: list[str] = []
        i = 0
        while i < len(words):
            phrase = words[i : i + size]
            repeats = 1
            while len(phrase) == size and words[i + repeats * size : i + (repeats + 1) * size] == phrase:
                repeats += 1
            if repeats > 1:
                out += phrase * min(repeats, max_repeats)
                i += repeats * size
            else:
                out.append(words[i])
                i += 1
        words = out
    return words


class PostProcessor:
    def __init__(self, tokenizer: WhisperTokenizer, guards: GuardsPolicy):
        self.tokenizer = tokenizer
        self.guards = guards

    def window_result(self, row: DecodeRow, duration_s: float, offset_s: float) -> WindowResult:
        """Split a decoded window at its timestamp tokens into segments, in seconds of the request."""
        guards = self.guards
        if row.no_speech_prob > guards.no_speech_threshold and row.avg_logprob < guards.logprob_threshold:
            return WindowResult(segments=[], covered_s=duration_s, temperature=row.temperature, language=row.language)
        begin = self.tokenizer.timestamp_begin
        tokens = row.tokens
        spans: list[tuple[float, float, list[int]]] = []
        start, pending, last_time = 0.0, [], 0.0
        for token in tokens:
            if token < begin:
                pending.append(token)
                continue
            last_time = min((token - begin) * SECONDS_PER_TIMESTAMP, duration_s)
            if pending:
                spans.append((start, last_time, pending))
                pending = []
            start = last_time
        ends_inside = len(tokens) >= 2 and tokens[-1] >= begin and tokens[-2] >= begin
        if pending:
            spans.append((start, duration_s, pending))
        # a window that ends on a closed segment (two timestamps) may have more speech after it
        covered_s = last_time if ends_inside else duration_s

        if row.alignment is None:
            timed: list[tuple[float, float, list[WordTiming] | None]] = [(a, b, None) for a, b, _ in spans]
        else:
            timed = segment_words(spans, row.alignment, self.tokenizer.decode_with_specials, self.tokenizer.eot, 0.0)

        segments = []
        loops = compression_ratio(self.tokenizer.decode(tokens)) > guards.compression_ratio_threshold
        for (_, _, seg_tokens), (seg_start, seg_end, words) in zip(spans, timed):
            text = self.tokenizer.decode(seg_tokens).strip()
            if loops:
                text = " ".join(collapse_repeats(text.split(), guards.max_repeats))
                if compression_ratio(text) > guards.compression_ratio_threshold:
                    continue  # a loop inside a word ("Aaaaaa..."): nothing of it can be kept
            if not text or (loops and segments and text == segments[-1].text):
                continue
            segments.append(Segment(
                start=round(offset_s + seg_start, 3), end=round(offset_s + min(max(seg_end, seg_start), covered_s), 3),
                text=text, tokens=seg_tokens, avg_logprob=row.avg_logprob, no_speech_prob=row.no_speech_prob,
                temperature=row.temperature,
                words=None if words is None else [
                    WordTiming(w.word, round(offset_s + min(w.start, covered_s), 3), round(offset_s + min(max(w.end, w.start), covered_s), 3),
                               round(w.probability, 4)) for w in words],  # what follows covered_s is decoded again
            ))
        return WindowResult(segments=segments, covered_s=covered_s, temperature=row.temperature, language=row.language)
