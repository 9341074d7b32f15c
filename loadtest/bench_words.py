"""Word timestamps: how close they are to faster-whisper's on the same weights and files, whether they are
ordered and inside their segments, and what asking for them costs per window.

Accuracy: every WER row of the eval set through the engine's pipeline (the server's code, in this process,
its default decoding) with word timestamps, against faster-whisper's ``word_timestamps=True`` with its
defaults. Words are matched by aligning the two transcripts' normalised words; the figure is the median
absolute difference of matched words' start times. Cost: each LibriSpeech window decoded with and without
words, alternating, in one decoder; the difference of the medians is what words cost per window.

Run: python -m loadtest.bench_words
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import statistics
import sys
import time

import numpy as np
import torch

from configs.policies import resolve_engine_policy
from configs.settings import Settings
from loadtest.bench_rest import log
from loadtest.evalset import DEFAULT_MANIFEST, load_rows, normalize
from loadtest.rest import positive_int
from workers.decoding import DecodeRow, DecodingOptions, SearchOptions, audio_frames, token_budget
from workers.engine import load_engine
from workers.features import SAMPLE_RATE
from workers.packing import PackingMode, first_fit
from workers.postprocess import PostProcessor
from workers.runner import ModelRunner, embedded_model_path


class _Quiet:
    def batch_done(self, *args): ...
    def window_done(self, *args): ...
    def windows_failed(self, *args): ...
    def windows_abandoned(self, *args): ...
    def worker_restarted(self, *args): ...


def ours(rows) -> list[list[tuple[str, float, float, float, float]]]:
    """(word, start, end, segment start, segment end) per row, from the engine with its default decoding."""
    from app.audio import decode_audio

    async def run() -> list:
        engine = await asyncio.to_thread(load_engine, "tiny.en", "embedded", Settings(), _Quiet())
        engine.start()
        out = []
        try:
            for done, row in enumerate(rows, 1):
                audio = decode_audio(row.audio.read_bytes(), 1800)
                transcript = await engine.transcribe(audio, engine.options("en", None, word_timestamps=True))
                out.append([(w.word, w.start, w.end, s.start, s.end) for s in transcript.segments for w in s.words or []])
                log(f"[{done}/{len(rows)}] server words {row.audio.name}")
        finally:
            await engine.stop()
        return out

    return asyncio.run(run())


def theirs(rows) -> list[list[tuple[str, float, float, float, float]]]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(embedded_model_path()), device="cpu", compute_type="int8", cpu_threads=2, num_workers=1)
    out = []
    for done, row in enumerate(rows, 1):
        segments, _ = model.transcribe(str(row.audio), language="en", word_timestamps=True)
        out.append([(w.word, w.start, w.end, s.start, s.end) for s in segments for w in s.words])
        log(f"[{done}/{len(rows)}] faster-whisper words {row.audio.name}")
    return out


def matched_start_differences(a: list, b: list) -> list[float]:
    """|start difference| of the words the two transcripts share, matched in order by their normalised text."""
    keys_a, keys_b = [normalize(w[0]) for w in a], [normalize(w[0]) for w in b]
    matcher = difflib.SequenceMatcher(a=keys_a, b=keys_b, autojunk=False)
    return [abs(a[block.a + k][1] - b[block.b + k][1]) for block in matcher.get_matching_blocks() for k in range(block.size)]


def ordered_and_inside(words: list) -> tuple[int, int]:
    """Words out of order (a start before the previous word's), and words outside their segment."""
    disorder = sum(1 for p, w in zip(words, words[1:]) if w[1] < p[1] - 1e-6)
    outside = sum(1 for w in words if w[1] < w[3] - 0.01 or w[2] > w[4] + 0.01)
    return disorder, outside


def cost_per_window(rows, repeats: int) -> tuple[float, float]:
    """Median ms to decode a window (beam 5) without words and with them, same decoder, alternating."""
    from app.audio import decode_audio

    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    post = PostProcessor(runner.tokenizer, resolve_engine_policy(Settings(), on_gpu=False).guards)
    plain, worded = [], []
    for done, row in enumerate(rows, 1):
        audio = decode_audio(row.audio.read_bytes(), 60)
        window, = runner.encode_windows(first_fit([len(audio)], [""], PackingMode.SHARED), [runner.features(audio)], [len(audio)])
        for _ in range(repeats):
            for words, times in ((False, plain), (True, worded)):
                decoder = runner.new_decoder()
                duration = len(audio) / SAMPLE_RATE
                decoded = DecodeRow(prompt=list(runner.prompt([], "en")), max_tokens=token_budget(duration), last_timestamp=window.last_timestamp,
                                    search=SearchOptions(beam_size=5), word_timestamps=words, frames=min(window.last_timestamp, audio_frames(duration)))
                started = time.perf_counter()
                decoder.add([decoded], window.audio_features[None])
                while decoder.running:
                    decoder.step()
                post.window_result(decoded, duration, 0.0)
                times.append(1000 * (time.perf_counter() - started))
        log(f"[{done}/{len(rows)}] cost {row.audio.name}: {plain[-1]:.0f} ms plain, {worded[-1]:.0f} ms with words")
    return statistics.median(plain), statistics.median(worded)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_words", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=positive_int, help="only the first K rows (a smoke run)")
    parser.add_argument("--cost-rows", type=positive_int, default=20, help="LibriSpeech windows timed for the cost (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timings of each window each way (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = load_rows(DEFAULT_MANIFEST, limit=args.limit)
    mine, peer = ours(rows), theirs(rows)
    differences, disorder, outside, words = [], 0, 0, 0
    for a, b in zip(mine, peer):
        differences += matched_start_differences(a, b)
        d, o = ordered_and_inside(a)
        disorder, outside, words = disorder + d, outside + o, words + len(a)
    print(f"rows {len(rows)}, words {words} (faster-whisper {sum(map(len, peer))}), matched {len(differences)}")
    print(f"start time |server - faster-whisper|: median {statistics.median(differences):.3f} s, "
          f"p90 {float(np.percentile(differences, 90)):.3f} s, mean {statistics.fmean(differences):.3f} s")
    print(f"words out of order: {disorder}; words outside their segment: {outside}")
    plain, worded = cost_per_window(load_rows(DEFAULT_MANIFEST, sets=["librispeech_test_other_resemblyzer"], limit=args.cost_rows), args.repeats)
    print(f"a window decoded (beam 5) and post-processed: median {plain:.0f} ms without words, {worded:.0f} ms with them: "
          f"words cost {worded - plain:.0f} ms per window ({100 * (worded - plain) / plain:.0f} %)")


if __name__ == "__main__":
    sys.exit(main())
