"""Transcript renderings: the service's JSON, OpenAI's json, text, srt, vtt and verbose_json, and the
Server-Sent Events of OpenAI's streamed transcription."""

from __future__ import annotations

import json
from enum import Enum

from workers.engine import LANGUAGES, Segment, Transcript, WordTiming, compression_ratio


class ResponseFormat(str, Enum):
    json = "json"
    text = "text"
    srt = "srt"
    vtt = "vtt"
    verbose_json = "verbose_json"


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_srt(segments: list[Segment]) -> str:
    blocks = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n" for i, s in enumerate(segments, 1)]
    return "\n".join(blocks)


def to_vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "\n".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n" for s in segments)


def word_json(w: WordTiming) -> dict:
    return {"word": w.word.strip(), "start": w.start, "end": w.end, "probability": w.probability}


def segment_json(i: int, s: Segment) -> dict:
    out = {"id": i, "start": s.start, "end": s.end, "text": s.text,
           "avg_logprob": round(s.avg_logprob, 4), "no_speech_prob": round(s.no_speech_prob, 4)}
    if s.words is not None:
        out["words"] = [word_json(w) for w in s.words]
    return out


def service_json(t: Transcript, model: str) -> dict:
    return {"text": t.text, "duration": round(t.duration_s, 3), "language": t.language, "model": model,
            "segments": [segment_json(i, s) for i, s in enumerate(t.segments)]}


def verbose_json(t: Transcript, granularities: set[str], task: str = "transcribe") -> dict:
    """OpenAI's verbose_json: the language by name (``english``), ``segments`` for the ``segment`` granularity,
    ``words`` (word, start, end) for ``word``."""
    language = None if t.language is None else LANGUAGES.get(t.language, t.language)
    out: dict = {"task": task, "language": language, "duration": round(t.duration_s, 3), "text": t.text}
    if "segment" in granularities:
        out["segments"] = [{**{k: v for k, v in segment_json(i, s).items() if k != "words"}, "seek": 0, "tokens": s.tokens,
                            "temperature": s.temperature, "compression_ratio": round(compression_ratio(s.text), 4)}
                           for i, s in enumerate(t.segments)]
    if "word" in granularities:
        out["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for s in t.segments for w in s.words or []]
    return out


AUDIO_TOKENS_PER_S = 50  # Whisper's encoder makes one state per 20 ms of audio (1500 per 30 s window): the audio's input tokens


def sse_event(kind: str, **fields: object) -> bytes:
    """One Server-Sent Event as OpenAI's streams send it: ``kind`` is its name and the JSON data's ``type``."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def token_usage(t: Transcript, prompt_tokens: int) -> dict:
    """The ``usage`` of OpenAI's ``transcript.text.done`` (the openai SDK's type has only the ``tokens`` kind): the
    audio's encoder states and the prompt's tokens in, the transcript's text tokens out."""
    audio = round(t.duration_s * AUDIO_TOKENS_PER_S)
    output = sum(len(s.tokens) for s in t.segments)
    return {"type": "tokens", "input_tokens": audio + prompt_tokens, "output_tokens": output, "total_tokens": audio + prompt_tokens + output,
            "input_token_details": {"audio_tokens": audio, "text_tokens": prompt_tokens}}
