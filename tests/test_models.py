"""Several models in one server: each its own pipeline and allocator budget, chosen per request and per stream.

Only one Whisper checkpoint can be had offline here (the embedded tiny.en), so the second model is the same
weights loaded again under another name; what is tested is that each name gets its own pipeline, that a
request's work runs on the pipeline it named (per-model metrics), and how unknown names are refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from websockets.exceptions import InvalidStatus

from app.audio import decode_audio
from configs import Settings
from loadtest.evalset import normalize
from loadtest.stream import StreamClient, open_stream
from tests.conftest import JFK, JFK_TEXT, Server, running_server, wav_bytes
from tests.test_browser import CHROMIUM, chromium
from workers.runner import embedded_model_path

COPY = "tiny.en-copy"
MODELS = {"tiny.en": "embedded", COPY: {"path": str(embedded_model_path()), "cpu_slots": 1, "gpu_slots": 0}}


@pytest.fixture(scope="module")
def two_models() -> Iterator[Server]:
    with running_server(models=json.dumps(MODELS), allocator_gpu_slots="4", admission_max_waiting="8") as server:
        yield server


def samples(server: Server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def windows_encoded(m: dict, model: str) -> float:
    return m.get(("asr_stage_batch_size_sum", (("model", model), ("stage", "acoustic"))), 0.0)


def test_models_lists_each_with_its_budget(two_models: Server) -> None:
    listing = httpx.get(f"{two_models.url}/v1/models").json()
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert list(by_id) == ["tiny.en", COPY]
    assert by_id["tiny.en"]["default"] is True and by_id[COPY]["default"] is False
    assert by_id["tiny.en"]["budget"] == {"cpu_slots": 1, "gpu_slots": 2}  # no budget of its own: an equal share
    assert by_id[COPY]["budget"] == {"cpu_slots": 1, "gpu_slots": 0}  # its own
    assert all(m["object"] == "model" and m["device"] == "cpu" and m["multilingual"] is False for m in by_id.values())
    assert "path" not in json.dumps(listing)  # paths name this machine's files
    ready = httpx.get(f"{two_models.url}/readyz").json()
    assert ready == {"status": "ready", "models": ["tiny.en", COPY], "default_model": "tiny.en"}


def test_a_request_runs_on_the_pipeline_it_names(two_models: Server) -> None:
    before = samples(two_models)
    r = httpx.post(f"{two_models.url}/v1/transcribe", params={"model": COPY}, files={"file": JFK.open("rb")}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == COPY and normalize(r.json()["text"]) == JFK_TEXT
    after = samples(two_models)
    assert windows_encoded(after, COPY) > windows_encoded(before, COPY)
    assert windows_encoded(after, "tiny.en") == windows_encoded(before, "tiny.en")
    assert after[("asr_audio_processed_seconds_total", (("model", COPY), ("source", "rest")))] >= 11.0

    openai = httpx.post(f"{two_models.url}/v1/audio/transcriptions", data={"model": COPY, "response_format": "verbose_json"},
                        files={"file": JFK.open("rb")}, timeout=120)
    assert openai.status_code == 200 and normalize(openai.json()["text"]) == JFK_TEXT
    default = httpx.post(f"{two_models.url}/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": JFK.open("rb")}, timeout=120)
    assert default.status_code == 200
    assert windows_encoded(samples(two_models), "tiny.en") > windows_encoded(after, "tiny.en")  # whisper-1: the default

    pipelines = {name: httpx.get(f"{two_models.url}/v1/pipeline", params={"model": name}).json() for name in MODELS}
    assert {name: view["model"] for name, view in pipelines.items()} == {name: name for name in MODELS}
    assert pipelines[COPY]["budgets"]["cpu"]["total"] == 1 and pipelines["tiny.en"]["budgets"]["gpu"]["total"] == 2
    assert httpx.get(f"{two_models.url}/v1/pipeline").json()["model"] == "tiny.en"


def test_an_unknown_model_is_404_everywhere(two_models: Server) -> None:
    url = two_models.url
    answers = [
        httpx.post(f"{url}/v1/transcribe", params={"model": "large-v9"}, content=JFK.read_bytes()),  # refused before the body
        httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "large-v9"}, files={"file": JFK.open("rb")}),
        httpx.get(f"{url}/v1/pipeline", params={"model": "large-v9"}),
    ]
    for r in answers:
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert "tiny.en, tiny.en-copy" in r.json()["error"]["message"]

    async def handshake() -> None:
        async with open_stream(f"{url.replace('http', 'ws')}/v1/stream?model=large-v9"):
            pass

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(handshake())
    assert refused.value.response.status_code == 404
    assert json.loads(refused.value.response.body)["error"]["code"] == "model_not_found"


def test_a_backed_up_model_refuses_while_the_other_admits(two_models: Server) -> None:
    eleven_minutes = wav_bytes(np.tile(decode_audio(JFK.read_bytes(), 60), 60))

    async def main() -> tuple[httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=two_models.url, timeout=120) as client:
            flood = asyncio.create_task(client.post("/v1/transcribe", params={"model": COPY}, content=eleven_minutes))
            while (in_flight := samples(two_models).get(("asr_windows_in_flight", (("model", COPY),)), 0)) <= 8:
                await asyncio.sleep(0.1)
            refused = await client.post("/v1/transcribe", params={"model": COPY}, content=JFK.read_bytes())
            admitted = await client.post("/v1/transcribe", content=JFK.read_bytes())
            flood.cancel()  # the client goes: its windows still queued are dropped
            return refused, admitted, in_flight

    refused, admitted, in_flight = asyncio.run(main())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded", refused.text
    assert f"the model {COPY} is at capacity" in refused.json()["error"]["message"]
    assert admitted.status_code == 200 and admitted.json()["model"] == "tiny.en", (in_flight, admitted.text)
    assert normalize(admitted.json()["text"]) == JFK_TEXT


def test_a_stream_chooses_its_model_by_query_or_start_message(two_models: Server) -> None:
    ws = two_models.url.replace("http", "ws") + "/v1/stream"
    jfk = decode_audio(JFK.read_bytes(), 60)

    async def bad_start_then_copy() -> list[dict]:
        async with open_stream(ws, start_options={"model": "large-v9"}) as stream:
            await stream.send_json({"type": "start", "model": COPY})
            await stream.send_json({"type": "close"})
            return [e.data async for e in stream.events()]

    events = asyncio.run(bad_start_then_copy())
    assert [e["type"] for e in events] == ["ready", "error", "started", "closed"]
    assert events[0]["model"] == "tiny.en" and events[1]["code"] == "bad_start" and events[2]["model"] == COPY

    before = samples(two_models)
    by_query = asyncio.run(StreamClient(f"{ws}?model={COPY}", speed=4.0).run_file(jfk))
    by_start = asyncio.run(StreamClient(ws, speed=4.0, start_options={"model": COPY}).run_file(np.concatenate([jfk, jfk[:16000]])))
    after = samples(two_models)
    for record in (by_query, by_start):
        assert record.close_code == 1000 and not record.error_events
    assert normalize(" ".join(by_query.final_texts)) == JFK_TEXT
    # by_start's audio ends with JFK's first second again ("and so"), which a packed window may well hear
    assert normalize(" ".join(by_start.final_texts)) in (JFK_TEXT, JFK_TEXT + " and so")
    assert by_query.events[0].data["model"] == COPY
    assert by_start.events[1].data["type"] == "started" and by_start.events[1].data["model"] == COPY
    assert after[("asr_stream_final_latency_seconds_count", (("model", COPY),))] >= 2
    assert windows_encoded(after, "tiny.en") == windows_encoded(before, "tiny.en")


@pytest.mark.parametrize("models, default, message", [
    ({}, None, "ASR_MODELS is empty"),
    ({"bad name": "embedded"}, None, "is not a model name"),
    ({"whisper-1": "embedded"}, None, "is not a model name"),
    ({"a": "/nonexistent"}, None, "has no model.bin"),
    ({"a": {"path": "embedded", "color": "red"}}, None, "Extra inputs are not permitted"),
    ({"a": "embedded"}, "b", "ASR_DEFAULT_MODEL=b is not one of ASR_MODELS (a)"),
])
def test_model_settings_are_checked_at_start(models: dict, default: str | None, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(models=models, default_model=default)


def test_a_bare_path_is_short_for_a_spec_and_the_first_model_is_the_default() -> None:
    settings = Settings(models={"b": "embedded", "a": {"path": "embedded", "cpu_slots": 3}})
    assert settings.default_model_name == "b"
    assert settings.models["b"].path == "embedded" and settings.models["a"].cpu_slots == 3


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
@pytest.mark.timeout(180)
def test_the_page_offers_the_models_and_streams_to_the_one_picked(two_models: Server, tmp_path: Path) -> None:
    fake_microphone = tmp_path / "jfk.wav"
    fake_microphone.write_bytes(wav_bytes(decode_audio(JFK.read_bytes(), 60)[: 16000 * 3]))
    (profile := tmp_path / "profile").mkdir()
    with chromium(profile, fake_microphone) as page:
        page.call("Page.navigate", url=f"{two_models.url}/")
        options = page.wait_for("document.getElementById('model')?.hidden === false && "
                                "[...document.getElementById('model').options].map((o) => o.value)", 20, "the model picker")
        page.evaluate(f"document.getElementById('model').value = {COPY!r}")
        page.evaluate("document.getElementById('start').click()")
        page.wait_for("document.getElementById('status').dataset.kind === 'live'", 20, "the stream's ready event")
        session = page.evaluate("document.getElementById('session').textContent")
        panel = page.wait_for(f"document.getElementById('pipeline-meta').textContent.includes({COPY!r}) && "
                              "document.getElementById('pipeline-meta').textContent", 10, "the panel on the picked model")
        page.evaluate("document.getElementById('stop').click()")
    assert options == ["tiny.en", COPY]
    assert session.startswith(f"model {COPY} · session "), session
    assert COPY in panel
