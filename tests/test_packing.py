"""Encoder packing: the first-fit policy, and no bleed between windows that share a pass (real model, real speech)."""

from __future__ import annotations

import itertools

import pytest
import torch

from loadtest.evalset import load_rows, normalize
from loadtest.stream import decode_file
from workers.decoding import DecodeRow, DecodingOptions, token_budget
from workers.features import SAMPLE_RATE
from workers.packing import PACKABLE_FRAMES, FirstFitPacker, PackingMode, PassInput, first_fit, packed_frames
from workers.runner import ModelRunner, embedded_model_path
from workers.scheduler import BatchPolicy, DynamicBatchScheduler, Priority

SECOND = SAMPLE_RATE


def test_windows_go_first_fit_into_passes_and_a_long_one_has_a_pass_of_its_own() -> None:
    sizes = [8 * SECOND, 8 * SECOND, 28 * SECOND, 8 * SECOND, 8 * SECOND, 2 * SECOND]
    layouts = first_fit(sizes, [""] * len(sizes), PackingMode.SHARED)
    assert [[i for i, _ in layout.members] for layout in layouts] == [[2], [0, 1, 3], [4, 5]]
    assert [layout.packed for layout in layouts] == [False, True, True]
    offsets = [place.offset for _, place in layouts[1].members]
    assert offsets == [0, packed_frames(8 * SECOND), 2 * packed_frames(8 * SECOND)]
    assert all(layout.used_frames <= PACKABLE_FRAMES for layout in layouts if layout.packed)


def test_per_key_packing_never_puts_two_tenants_in_one_pass_and_off_packs_nothing() -> None:
    sizes, tenants = [3 * SECOND] * 6, ["a", "b", "a", "b", "c", "a"]
    layouts = first_fit(sizes, tenants, PackingMode.PER_KEY)
    assert sorted(sorted(i for i, _ in layout.members) for layout in layouts) == [[0, 2, 5], [1, 3], [4]]
    assert len(first_fit(sizes, tenants, PackingMode.SHARED)) == 1
    off = first_fit(sizes, tenants, PackingMode.OFF)
    assert len(off) == 6 and not any(layout.packed for layout in off)


def test_the_scheduler_takes_what_fits_a_pass_and_a_short_window_fills_the_room_a_long_one_left() -> None:
    packer = FirstFitPacker(1, PackingMode.SHARED, size=lambda seconds: seconds * SECOND, tenant=lambda _: "")
    scheduler: DynamicBatchScheduler[int] = DynamicBatchScheduler(BatchPolicy(1, 0, 64), packer)
    for seconds in (4, 10, 10, 10, 2, 3):
        scheduler.offer(seconds, Priority.BULK)
    scheduler.offer(1, Priority.FINAL)
    scheduler.offer(5, Priority.FINAL)
    assert scheduler.take_ready(64) == [1, 5]  # finals alone: anything else in their pass would delay them
    batch = scheduler.take_ready(64)
    assert packer.fits(batch) and sum(batch) <= PACKABLE_FRAMES / 100
    assert batch == [4, 10, 10]  # a third 10 s window does not fit; 2 s does, but 4 + 10 + 10 + 2 + guards does not
    assert scheduler.take_ready(64) == [10, 2, 3]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())


@pytest.fixture(scope="module")
def utterances() -> list[tuple[str, object]]:
    rows = [r for r in load_rows(sets=["librispeech_test_other_resemblyzer"]) if r.duration_s < 12][:12]
    return [(r.text, decode_file(r.audio)) for r in rows]


def transcribe_packed(runner: ModelRunner, audios: list) -> list[str]:
    """The windows as the acoustic and decoder stages run them: first fit into passes, each row on its own."""
    layouts = first_fit([len(a) for a in audios], [""] * len(audios), PackingMode.SHARED)
    windows = runner.encode_windows(layouts, [runner.features(a) for a in audios], [len(a) for a in audios])
    decoder = runner.new_decoder()
    rows = [DecodeRow(prompt=list(runner.prompt([], None)), max_tokens=token_budget(len(a) / SAMPLE_RATE),
                      last_timestamp=w.last_timestamp) for a, w in zip(audios, windows)]
    decoder.add(rows, torch.stack([w.audio_features for w in windows]))
    while decoder.running:
        decoder.step()
    return [normalize(runner.tokenizer.decode(row.tokens)) for row in rows]


def test_no_word_of_one_packed_utterance_appears_in_another_and_each_transcript_is_its_own(runner, utterances) -> None:
    """Over many pairs (A, B) packed into one pass: no word unique to A is ever in B's transcript, and B's
    transcript is the one B gets in a pass of its own (nothing of its pass-mate reaches it)."""
    alone = {k: transcribe_packed(runner, [audio])[0] for k, (_, audio) in enumerate(utterances)}
    pairs = list(itertools.combinations(range(len(utterances)), 2))[::3]
    assert len(pairs) >= 20
    same = 0
    for a, b in pairs:
        text_a, text_b = transcribe_packed(runner, [utterances[a][1], utterances[b][1]])
        words_a, words_b = set(normalize(utterances[a][0]).split()), set(normalize(utterances[b][0]).split())
        assert not (set(text_b.split()) & (words_a - words_b)), (a, b, text_b)
        assert not (set(text_a.split()) & (words_b - words_a)), (a, b, text_a)
        same += (text_a == alone[a]) + (text_b == alone[b])
    assert same == 2 * len(pairs)


def test_a_packed_pass_transcribes_as_well_as_whisper_s_own_30_s_layout(runner, utterances) -> None:
    from loadtest.evalset import word_error_rate

    refs = [text for text, _ in utterances]
    packed = transcribe_packed(runner, [audio for _, audio in utterances])
    unpacked = []
    for _, audio in utterances:
        features = runner.encode([PassInput.alone(runner.features(audio))])[0]
        decoder, row = runner.new_decoder(), DecodeRow(prompt=list(runner.prompt([], None)))
        decoder.add([row], features[None])
        while decoder.running:
            decoder.step()
        unpacked.append(runner.tokenizer.decode(row.tokens))
    assert word_error_rate(refs, packed) <= word_error_rate(refs, unpacked) + 0.02
