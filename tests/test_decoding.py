"""The decoder: forced prefixes, beam search against CTranslate2's, seeded sampling and the temperature fallback."""

from __future__ import annotations

from pathlib import Path

import torch

from app.audio import decode_audio
from workers.decoding import DecodeRow, DecodingOptions, SearchOptions, temperature_schedule
from workers.packing import PackingMode, first_fit
from workers.runner import ModelRunner, embedded_model_path

JFK = Path(__file__).resolve().parents[2] / "shared" / "eval" / "audio" / "faster_whisper_tests" / "jfk.flac"


def decode(runner: ModelRunner, audio, forced: tuple[int, ...]) -> DecodeRow:
    window, = runner.encode_windows(first_fit([len(audio)], [""], PackingMode.SHARED), [runner.features(audio)], [len(audio)])
    decoder = runner.new_decoder()
    row = DecodeRow(prompt=list(runner.prompt([], None)), last_timestamp=window.last_timestamp, forced=forced)
    decoder.add([row], window.audio_features[None])
    while decoder.running:
        decoder.step()
    return row


def test_a_forced_prefix_is_the_transcript_s_start_and_only_the_rest_is_decoded() -> None:
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    audio = decode_audio(JFK.read_bytes(), 60)
    free = decode(runner, audio, ())
    text = runner.tokenizer.decode(free.tokens).strip()
    assert text.startswith("And so my fellow Americans")

    forced = runner.forced_prefix("And so my fellow Americans")
    assert forced[0] == runner.tokenizer.timestamp_begin  # the window's first timestamp, then the words
    row = decode(runner, audio, forced)
    assert tuple(row.tokens[: len(forced)]) == forced
    assert runner.tokenizer.decode(row.tokens).strip() == text
    assert len(row.tokens) - len(forced) < len(free.tokens) - 5  # the prefix was not generated again

    assert runner.forced_prefix("  ") == () and runner.forced_prefix(None) == ()
    assert runner.forced_prefix("word " * 200) == ()  # too long to leave room to sample: not forced


def _windows(runner: ModelRunner, audios: list) -> list:
    """Each window alone in a pass padded to 30 s: the layout CTranslate2 decodes."""
    return runner.encode_windows(first_fit([len(a) for a in audios], [""] * len(audios), PackingMode.OFF),
                                 [runner.features(a) for a in audios], [len(a) for a in audios])


def test_beam_search_in_the_running_batch_is_ctranslate2_s_token_for_token() -> None:
    """Windows with different searches (greedy, beam 2, 3 and 5, patience and length penalty as faster-whisper
    defines them) join one running batch in three waves, between tokens; each comes out exactly as
    CTranslate2's own beam search decodes it alone."""
    import ctranslate2
    import numpy as np

    from loadtest.evalset import load_rows
    from workers.features import N_SAMPLES

    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    rows = load_rows(sets=["librispeech_test_other_resemblyzer"], limit=12)
    audios = [decode_audio(r.audio.read_bytes(), 60) for r in rows]
    windows = _windows(runner, audios)
    searches = [SearchOptions(beam_size=b, patience=p, length_penalty=lp)
                for b, p, lp in [(5, 1.0, 1.0), (1, 1.0, 1.0), (3, 2.0, 0.0), (2, 1.5, 0.5)] * 3]
    decoder = runner.new_decoder()
    decoded = [DecodeRow(prompt=list(runner.prompt([], None)), search=s) for s in searches]
    for wave in (range(0, 4), range(4, 8), range(8, 12)):
        decoder.add([decoded[i] for i in wave], torch.stack([windows[i].audio_features for i in wave]))
        for _ in range(6):
            decoder.step()
    while decoder.running:
        decoder.step()

    model = ctranslate2.models.Whisper(str(embedded_model_path()), device="cpu", compute_type="float32")
    for audio, row, search in zip(audios, decoded, searches):
        mel = runner.features(np.pad(audio, (0, N_SAMPLES - len(audio))))
        reference = model.generate(ctranslate2.StorageView.from_array(mel[None].numpy()), [list(runner.prompt([], None))],
                                   beam_size=search.beam_size, patience=search.patience, length_penalty=search.length_penalty,
                                   max_initial_timestamp_index=50)[0]
        assert row.tokens == reference.sequences_ids[0], (search, runner.tokenizer.decode(row.tokens))
        assert row.attempts and row.attempts[0].temperature == 0.0


def test_a_window_s_beams_share_its_audio() -> None:
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    audio = decode_audio(JFK.read_bytes(), 60)
    window, = _windows(runner, [audio])
    decoder = runner.new_decoder()
    rows = [DecodeRow(prompt=list(runner.prompt([], None)), search=SearchOptions(beam_size=5)) for _ in range(3)]
    decoder.add(rows, torch.stack([window.audio_features] * 3))
    decoder.step()
    assert len(decoder.rows) == 3 and len(decoder.slots) == 15  # 3 audio slots, 15 beams
    assert all(len(row.live) == 5 and {h.row for h in row.live} == {row} for row in rows)
    while decoder.running:
        decoder.step()
    assert len({tuple(r.tokens) for r in rows}) == 1 and runner.tokenizer.decode(rows[0].tokens).strip().startswith("And so my fellow Americans")


def test_sampling_is_seeded_per_window_and_the_quality_rules_send_a_window_up_the_schedule() -> None:
    """At a temperature above 0 a window draws best_of samples from its own seeded generator: the same result
    alone or beside others. A result that fails the quality rules is decoded again at the next temperature,
    and when every temperature fails, the attempt of best average log-probability is kept."""
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    audio = decode_audio(JFK.read_bytes(), 60)
    window, = _windows(runner, [audio])
    sampled = SearchOptions(temperatures=(0.8,), best_of=3, seed=7)

    def run(decoder, searches: list[SearchOptions]) -> list[DecodeRow]:
        rows = [DecodeRow(prompt=list(runner.prompt([], None)), search=s) for s in searches]
        decoder.add(rows, torch.stack([window.audio_features] * len(rows)))
        while decoder.running:
            decoder.step()
        return rows

    alone, = run(runner.new_decoder(), [sampled])
    beside = run(runner.new_decoder(), [SearchOptions(beam_size=4), sampled, SearchOptions(temperatures=(0.5,), seed=1)])
    assert alone.tokens == beside[1].tokens and alone.temperature == 0.8
    assert [a.temperature for a in alone.attempts] == [0.8]

    schedule = temperature_schedule(0.0, 0.2)
    assert schedule == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and temperature_schedule(0.3, 0.0) == (0.3,)
    fine, = run(runner.new_decoder(), [SearchOptions(temperatures=schedule)])
    assert len(fine.attempts) == 1 and fine.temperature == 0.0  # JFK passes the rules at once

    strict = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions(logprob_threshold=0.0))  # nothing passes
    failing, = run(strict.new_decoder(), [SearchOptions(temperatures=schedule, best_of=2)])
    assert [a.temperature for a in failing.attempts] == list(schedule) and failing.temperature == 1.0
    best = max(failing.attempts, key=lambda a: a.avg_logprob)
    assert failing.tokens == best.tokens and failing.avg_logprob == best.avg_logprob


def test_word_alignment_is_ctranslate2_s() -> None:
    """Each text token's place in the audio (the path through the alignment heads' attention) is where
    CTranslate2's own ``align`` (what faster-whisper's word timestamps use) puts it, on the same tokens."""
    import ctranslate2
    import numpy as np

    from loadtest.evalset import load_rows
    from workers.decoding import audio_frames
    from workers.features import N_SAMPLES, SAMPLE_RATE

    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    rows = load_rows(sets=["librispeech_test_other_resemblyzer"], limit=4)
    audios = [decode_audio(r.audio.read_bytes(), 60) for r in rows]
    windows = _windows(runner, audios)
    decoder = runner.new_decoder()
    decoded = [DecodeRow(prompt=list(runner.prompt([], None)), word_timestamps=True, frames=audio_frames(len(a) / SAMPLE_RATE)) for a in audios]
    decoder.add(decoded, torch.stack([w.audio_features for w in windows]))
    while decoder.running:
        decoder.step()

    model = ctranslate2.models.Whisper(str(embedded_model_path()), device="cpu", compute_type="float32")
    for audio, row in zip(audios, decoded):
        mel = runner.features(np.pad(audio, (0, N_SAMPLES - len(audio))))
        reference, = model.align(ctranslate2.StorageView.from_array(mel[None].numpy()), [runner.tokenizer.sot],
                                 [row.alignment.tokens], [2 * row.frames])
        text_indices, time_indices = np.array(reference.alignments).T
        jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
        expected = time_indices[jumps] / 50
        assert len(row.alignment.jump_times) == len(expected) == len(row.alignment.tokens) + 1
        assert np.abs(np.array(row.alignment.jump_times) - expected).max() <= 0.021  # at most one 20 ms frame apart
        assert np.allclose(row.alignment.probabilities, reference.text_token_probs, atol=2e-3)
