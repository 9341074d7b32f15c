"""Multilingual models: language detection when none is given, task=translate, OpenAI's translations endpoint,
and English-only models refusing translation.

The multilingual model is made here from the embedded tiny.en (tests/ct2_files.py: its vocabulary and weights laid
out as a multilingual Whisper's). tiny.en was never trained on language or task tokens, so what it detects and how
it "translates" say nothing of quality: these tests check the mechanics against CTranslate2 running the same
directory, and the service's answers around them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import ctranslate2
import httpx
import numpy as np
import openai
import pytest
import torch

from app.audio import decode_audio
from loadtest.evalset import load_rows
from loadtest.stream import StreamClient
from tests.conftest import JFK, JFK_TEXT, Server, running_server
from tests.ct2_files import multilingual_model_dir
from workers.decoding import DecodeRow, DecodingOptions, SearchOptions
from workers.features import N_SAMPLES
from workers.packing import PackingMode, first_fit
from workers.runner import ModelRunner, embedded_model_path
from workers.tokenizer import LANGUAGES


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multilingual_model_dir(embedded_model_path(), tmp_path_factory.mktemp("tiny-multilingual"))


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    rows = load_rows(sets=["librispeech_test_other_resemblyzer"], limit=5)
    return [decode_audio(JFK.read_bytes(), 60)] + [decode_audio(r.audio.read_bytes(), 60) for r in rows]


def test_detection_and_translation_in_the_running_batch_are_ctranslate2_s(multilingual: Path, audios: list[np.ndarray]) -> None:
    """Windows with no language (transcribe and translate, greedy and beam) join one running batch beside windows
    whose language is given; each detects what CTranslate2's ``detect_language`` detects, with its probability,
    and then decodes token for token what CTranslate2 generates with that language and task in the prompt."""
    runner = ModelRunner(multilingual, torch.device("cpu"), DecodingOptions())
    tokenizer = runner.tokenizer
    assert tokenizer.multilingual and len(tokenizer.languages) == 99 and tokenizer.languages[:3] == ["en", "zh", "de"]
    windows = runner.encode_windows(first_fit([len(a) for a in audios], [""] * len(audios), PackingMode.OFF),
                                    [runner.features(a) for a in audios], [len(a) for a in audios])
    cases = [(None, "transcribe", 1), (None, "translate", 1), ("en", "transcribe", 1), (None, "transcribe", 3),
             ("de", "translate", 1), (None, "translate", 2)]
    rows = [DecodeRow(prompt=list(runner.prompt([], language, task)), task=task, search=SearchOptions(beam_size=beam))
            for language, task, beam in cases]
    decoder = runner.new_decoder()
    decoder.add(rows[:3], torch.stack([w.audio_features for w in windows[:3]]))
    decoder.step()  # the others join while the first wave is still feeding its languages and tasks
    decoder.add(rows[3:], torch.stack([w.audio_features for w in windows[3:]]))
    while decoder.running:
        decoder.step()

    model = ctranslate2.models.Whisper(str(multilingual), device="cpu", compute_type="float32")
    assert model.is_multilingual
    for audio, row, (language, task, beam) in zip(audios, rows, cases):
        mel = ctranslate2.StorageView.from_array(runner.features(np.pad(audio, (0, N_SAMPLES - len(audio))))[None].numpy())
        if language is None:
            (best, probability), *_ = model.detect_language(mel)[0]
            assert f"<|{row.language}|>" == best and abs(row.language_probability - probability) < 1e-3
            language = row.language
        else:
            assert row.language is None  # given, not detected
        prompt = [tokenizer.sot, tokenizer.language_token(language), tokenizer.task_token(task)]
        assert row.prompt == prompt
        reference = model.generate(mel, [prompt], beam_size=beam, max_initial_timestamp_index=50)[0]
        assert row.tokens == reference.sequences_ids[0], (language, task, beam, tokenizer.decode(row.tokens))


def test_an_english_only_model_keeps_its_prompt_and_detects_nothing(audios: list[np.ndarray]) -> None:
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    assert runner.prompt([], None) == runner.prompt([], "en", "translate") == (runner.tokenizer.sot,)
    window, = runner.encode_windows(first_fit([len(audios[0])], [""], PackingMode.OFF), [runner.features(audios[0])], [len(audios[0])])
    row = DecodeRow(prompt=list(runner.prompt([], None)))
    decoder = runner.new_decoder()
    decoder.add([row], window.audio_features[None])
    while decoder.running:
        decoder.step()
    assert row.language is None and runner.tokenizer.decode(row.tokens).strip().startswith("And so my fellow Americans")


@pytest.fixture(scope="module")
def both(multilingual: Path) -> Iterator[Server]:
    """A server with the embedded tiny.en (the default) and the multilingual model beside it."""
    with running_server(models=json.dumps({"tiny.en": "embedded", "tiny-multi": str(multilingual)})) as server:
        yield server


def _detected(multilingual: Path, audio: np.ndarray) -> tuple[str, float]:
    model = ctranslate2.models.Whisper(str(multilingual), device="cpu", compute_type="float32")
    runner = ModelRunner(multilingual, torch.device("cpu"), DecodingOptions())
    mel = runner.features(np.pad(audio, (0, N_SAMPLES - len(audio))))[None].numpy()
    best, probability = model.detect_language(ctranslate2.StorageView.from_array(mel))[0][0]
    return best[2:-2], probability


def test_the_service_reports_the_detected_language_and_translates(both: Server, multilingual: Path, audios: list[np.ndarray]) -> None:
    detected, _ = _detected(multilingual, audios[0])
    with httpx.Client(base_url=both.url, timeout=120) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert set(models) >= {"tiny.en", "tiny-multi"}

        answer = client.post("/v1/transcribe", params={"model": "tiny-multi"}, content=JFK.read_bytes())
        assert answer.status_code == 200, answer.text
        assert answer.json()["language"] == detected
        named = client.post("/v1/transcribe", params={"model": "tiny-multi", "language": "English"}, content=JFK.read_bytes())
        assert named.status_code == 200 and named.json()["language"] == "en"  # openai-whisper's names are taken too
        assert named.json()["text"].strip().startswith("And so my fellow Americans")
        translated = client.post("/v1/transcribe", params={"model": "tiny-multi", "task": "translate", "language": "en"}, content=JFK.read_bytes())
        assert translated.status_code == 200 and translated.json()["language"] == "en" and translated.json()["text"]

        unknown = client.post("/v1/transcribe", params={"model": "tiny-multi", "language": "xx"}, content=JFK.read_bytes())
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unsupported_language"
        english_only = client.post("/v1/transcribe", params={"task": "translate"}, content=JFK.read_bytes())
        assert english_only.status_code == 400 and english_only.json()["error"]["code"] == "unsupported_task"
        assert "English-only" in english_only.json()["error"]["message"]
        default = client.post("/v1/transcribe", content=JFK.read_bytes())  # the English-only default: en, as before
        assert default.status_code == 200 and default.json()["language"] == "en"


def test_the_openai_client_translates_on_a_multilingual_model_and_is_refused_on_an_english_only_one(both: Server, multilingual: Path,
                                                                                                    audios: list[np.ndarray]) -> None:
    client = openai.OpenAI(base_url=f"{both.url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    with JFK.open("rb") as audio:
        text = client.audio.translations.create(model="tiny-multi", file=audio)
    assert text.text
    with JFK.open("rb") as audio:
        verbose = client.audio.translations.create(model="tiny-multi", file=audio, response_format="verbose_json")
    detected, _ = _detected(multilingual, audios[0])
    assert verbose.task == "translate" and verbose.language == LANGUAGES[detected] and verbose.duration > 10
    assert verbose.segments and verbose.text == text.text
    with JFK.open("rb") as audio:
        transcribed = client.audio.transcriptions.create(model="tiny-multi", file=audio, response_format="verbose_json")
    assert transcribed.language == LANGUAGES[detected]
    with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as refused:
        client.audio.translations.create(model="whisper-1", file=audio)
    assert refused.value.status_code == 400 and refused.value.code == "unsupported_task"


async def _stream(url: str, audio: np.ndarray) -> list:
    record = await StreamClient(url, frame_ms=100, speed=0).run_file(audio)
    return [event.data for event in record.events if event.type == "final"]


def test_a_stream_without_a_language_gets_the_one_detected_in_each_utterance(both: Server, audios: list[np.ndarray]) -> None:

    url = both.url.replace("http", "ws") + "/v1/stream"
    finals = asyncio.run(_stream(url + "?model=tiny-multi", audios[0]))
    assert finals and all(f["language"] in LANGUAGES for f in finals if f["text"])  # an utterance's own: not the whole file's
    german = asyncio.run(_stream(url + "?model=tiny-multi&language=de", audios[0]))
    assert german and all(f["language"] == "de" for f in german)
    english = asyncio.run(_stream(url, audios[0]))
    assert english and all(f["language"] == "en" for f in english)
    assert JFK_TEXT.split()[:4] == " ".join(f["text"] for f in english).lower().replace(",", "").split()[:4]
