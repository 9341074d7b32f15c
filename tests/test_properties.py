"""Property-based attacks: PCM framing (unit), the stream's control messages and the REST API's schema (real server)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import struct
import wave
from urllib.parse import urlencode

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.audio import PCM_ENCODINGS, PcmStream, decode_audio
from loadtest.stream import to_pcm
from tests.conftest import JFK, Server

SAMPLE_RATE = 16000
ENCODINGS = sorted(PCM_ENCODINGS)
RESAMPLED_RATES = [8000, 44100, 48000]
MAX_SAMPLES = 3000
# swresample emits nothing for a stream shorter than its filter delay (about 22 output samples), and an
# 8 kHz stream that short stands for twice as many 16 kHz samples: 3 ms covers both, longer streams land within 1
RESAMPLER_TOLERANCE_SAMPLES = 48


# --- 1. PCM framing (unit level) -------------------------------------------------------------------------------

@st.composite
def pcm_audio(draw: st.DrawFn, encoding: str) -> bytes:
    """Random samples in the encoding, sometimes followed by the first bytes of one more sample."""
    dtype = PCM_ENCODINGS[encoding].dtype
    elements = st.floats(-1, 1, width=32) if dtype.kind == "f" else None  # integers: any value of the type
    samples = draw(hnp.arrays(dtype, st.integers(0, MAX_SAMPLES), elements=elements))
    partial_sample = draw(st.binary(max_size=dtype.itemsize - 1))  # a stream may stop in the middle of a sample
    return samples.tobytes() + partial_sample


@st.composite
def frames_of(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """Any split of ``data`` into frames: fixed small or odd sizes, or cuts anywhere (repeated cuts: empty frames)."""
    if draw(st.booleans()):
        size = draw(st.integers(1, 9) | st.sampled_from([3201, 4097]))
        return [data[i : i + size] for i in range(0, len(data), size)]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=30)))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:])]


def decode_frames(stream: PcmStream, frames: list[bytes]) -> np.ndarray:
    """What a stream yields for these frames, up to the end of the stream."""
    return np.concatenate([*(stream.decode(frame) for frame in frames), stream.flush()])


def expected_length(data: bytes, encoding: str, sample_rate: int) -> float:
    """Samples at 16 kHz that the whole samples of ``data`` stand for."""
    return len(data) // PCM_ENCODINGS[encoding].dtype.itemsize * SAMPLE_RATE / sample_rate


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_framing_at_16k_changes_no_sample(encoding: str, data: st.DataObject) -> None:
    audio = data.draw(pcm_audio(encoding))
    frames = data.draw(frames_of(audio))
    framed = decode_frames(PcmStream(encoding, SAMPLE_RATE), frames)
    whole = decode_frames(PcmStream(encoding, SAMPLE_RATE), [audio])
    assert framed.dtype == np.float32
    np.testing.assert_array_equal(framed, whole)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("sample_rate", RESAMPLED_RATES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_framing_at_other_rates_keeps_the_resampled_length(encoding: str, sample_rate: int, data: st.DataObject) -> None:
    audio = data.draw(pcm_audio(encoding))
    frames = data.draw(frames_of(audio))
    framed = decode_frames(PcmStream(encoding, sample_rate), frames)
    assert abs(len(framed) - expected_length(audio, encoding, sample_rate)) <= RESAMPLER_TOLERANCE_SAMPLES
    # one resampler for the whole stream: where the frames are cut does not change the samples either
    np.testing.assert_allclose(framed, decode_frames(PcmStream(encoding, sample_rate), [audio]), atol=1e-6)


F32_SPECIALS = [struct.pack("<f", v) for v in (math.nan, math.inf, -math.inf, -0.0, 3.4e38, -3.4e38, 1e-45)] + [
    b"\x01\x00\x80\x7f",  # signalling NaN
    b"\xff\xff\xff\xff",  # NaN with the sign bit set
]
# random bytes with the float32 bit patterns that are not numbers, at any alignment
hostile_bytes = st.lists(st.binary(max_size=16) | st.sampled_from(F32_SPECIALS), max_size=400).map(b"".join)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("sample_rate", [SAMPLE_RATE, *RESAMPLED_RATES])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN input is the point
@settings(max_examples=60, deadline=None)
@given(frames=hostile_bytes.flatmap(frames_of))
@example(frames=[b"".join(F32_SPECIALS) * 8])  # every special pattern, aligned for float32
def test_any_bytes_give_finite_samples_within_full_scale(encoding: str, sample_rate: int, frames: list[bytes]) -> None:
    samples = decode_frames(PcmStream(encoding, sample_rate), frames)
    assert samples.dtype == np.float32 and np.isfinite(samples).all()
    assert np.abs(samples).max(initial=0.0) <= 1.0, f"peak {np.abs(samples).max()}"


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("sample_rate", RESAMPLED_RATES)
@settings(max_examples=30, deadline=None)
@given(utterances=st.lists(hnp.arrays(np.float32, st.integers(0, MAX_SAMPLES), elements=st.floats(-1, 1, width=32)), min_size=2, max_size=4))
@example(utterances=[np.zeros(1, np.float32), np.zeros(1, np.float32)])  # found by this test
def test_a_stream_goes_on_after_an_utterance_is_flushed(encoding: str, sample_rate: int, utterances: list[np.ndarray]) -> None:
    # the stream route flushes at every finalize, then the client's audio goes on in the same stream
    stream = PcmStream(encoding, sample_rate)
    total = sum(len(decode_frames(stream, [to_pcm(samples, encoding)])) for samples in utterances)
    expected = sum(len(samples) for samples in utterances) * SAMPLE_RATE / sample_rate
    assert abs(total - expected) <= len(utterances) * RESAMPLER_TOLERANCE_SAMPLES


# --- 2. control messages on a real stream ---------------------------------------------------------------------

KNOWN_EVENTS = {"ready", "started", "partial", "final", "error", "closed"}
# how a stream may end, and the `closed` reason each close code comes with (README; rate_limited: ASR_STREAM_MAX_MESSAGES_PER_S)
CLOSE_REASONS = {1000: {"client_close"}, 1008: {"idle_timeout", "session_too_long", "rate_limited"}, 1009: {"frame_too_large"}}
# the errors that answer a text message the server cannot use
MESSAGE_ERRORS = {"bad_message", "unknown_message", "bad_start"}
CLOSE_MESSAGE = json.dumps({"type": "close"})
VALID_RATES = [SAMPLE_RATE, *RESAMPLED_RATES]

# numbers at the edges: 64-bit overflow, the most digits int() parses by default, float range
edge_numbers = st.sampled_from([2**31, 2**63, -(2**63) - 1, 2**64, 10**4299, 1e308, -1e308, 5e-324])
json_scalars = (st.none() | st.booleans() | st.integers() | edge_numbers | st.floats()  # NaN and infinities included
                | st.text(st.characters(exclude_categories=()), max_size=20))  # lone surrogates too, escaped in JSON
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
extra_fields = st.dictionaries(st.text(max_size=12).filter(lambda key: key != "type"), json_values, max_size=3)


def control(types: st.SearchStrategy, extra: st.SearchStrategy[dict]) -> st.SearchStrategy[str]:
    """JSON objects with a ``type`` from ``types`` and the ``extra`` fields beside it."""
    return st.builds(lambda kind, fields: json.dumps({**fields, "type": kind}), types, extra)


valid_starts = st.fixed_dictionaries({"type": st.just("start")}, optional={
    "sample_rate": st.sampled_from(VALID_RATES),
    "encoding": st.sampled_from(ENCODINGS),
    "language": st.sampled_from(["en", "EN"]),
    "interim_results": st.booleans(),
    "endpoint_silence_ms": st.integers(100, 10_000),
}).map(json.dumps)
# every option any JSON value (sometimes a valid one), and fields that are no option
hostile_starts = st.builds(lambda options, extra: json.dumps({**extra, **options, "type": "start"}), st.fixed_dictionaries({}, optional={
    "sample_rate": st.sampled_from(VALID_RATES) | json_values,
    "encoding": st.sampled_from(ENCODINGS) | json_values,
    "language": st.sampled_from(["en", "fr"]) | json_values,
    "interim_results": json_values,
    "endpoint_silence_ms": json_values,
}), extra_fields)
# JSON the standard parser refuses: nesting past Python's recursion limit, an integer past int()'s digit limit
deep_nesting = st.builds(lambda depth, brackets: brackets[0] * depth + "0" + brackets[1] * depth,
                         st.integers(1, 20_000), st.sampled_from([("[", "]"), ('{"type":', "}")]))
too_many_digits = st.integers(4301, 20_000).map(lambda digits: '{"type": "start", "sample_rate": ' + "9" * digits + "}")
MESSAGE_KINDS = [
    st.binary(max_size=400),  # audio, or what passes for it: twice as likely as each other kind
    st.binary(max_size=400),
    valid_starts,
    hostile_starts,
    control(st.sampled_from(["finalize", "close"]), extra_fields),
    control(json_values, extra_fields),  # a type the server does not know
    st.one_of(st.text(), json_values.map(json.dumps), deep_nesting, too_many_digits),  # no control message at all
]
# a kind first, then a message of that kind: one_of flattens nested one_ofs and would weigh each leaf alike
stream_messages = st.lists(st.sampled_from(MESSAGE_KINDS).flatmap(lambda kind: kind), min_size=1, max_size=12)
stream_options = st.fixed_dictionaries({"sample_rate": st.sampled_from(VALID_RATES), "encoding": st.sampled_from(ENCODINGS)})


async def read_until_closed(ws: ClientConnection) -> list[str | bytes]:
    received: list[str | bytes] = []
    with contextlib.suppress(ConnectionClosed):  # raised when the close code is not 1000
        async for message in ws:
            received.append(message)
    return received


async def exchange(url: str, messages: list[str | bytes]) -> tuple[list[str | bytes], int | None]:
    """Send the messages, then a close if the stream is still open; return what came back and the close code."""
    async with connect(url, max_size=None, open_timeout=30, close_timeout=10) as ws:
        reader = asyncio.create_task(read_until_closed(ws))
        with contextlib.suppress(ConnectionClosed):  # the server may have closed the stream on the way
            for message in [*messages, CLOSE_MESSAGE]:
                await ws.send(message)
        received = await asyncio.wait_for(reader, 60)
        return received, ws.close_code


def control_type(message: str | bytes) -> object:
    """The ``type`` the server reads from a message; None for audio and for text that is no JSON object."""
    if isinstance(message, bytes):
        return None
    try:
        parsed = json.loads(message)
    except (ValueError, RecursionError):
        return None
    return parsed.get("type") if isinstance(parsed, dict) else None


def parse_event(message: str | bytes) -> dict:
    """A server message as the README documents it: a JSON text object of a known type; errors with code and message."""
    assert isinstance(message, str), f"binary message from the server: {message[:80]!r}"
    event = json.loads(message)
    assert isinstance(event, dict) and event.get("type") in KNOWN_EVENTS, message[:200]
    if event["type"] == "error":
        assert isinstance(event.get("code"), str) and event["code"], event
        assert isinstance(event.get("message"), str) and event["message"], event
    return event


def check_every_text_message_is_answered(sent: list[str | bytes], events: list[dict]) -> None:
    """The server reads up to the first close; each finalize before it gets a final, each other text message a
    `started` or an error."""
    kinds = [control_type(message) for message in sent if isinstance(message, str)]
    read = kinds[: kinds.index("close")] if "close" in kinds else kinds
    finals = [e for e in events if e["type"] == "final" and e["reason"] == "finalize"]
    answers = [e for e in events if e["type"] == "started" or (e["type"] == "error" and e["code"] in MESSAGE_ERRORS)]
    assert len(finals) == read.count("finalize"), events
    assert len(answers) == len(read) - read.count("finalize"), events


def stream_url(server: Server, options: dict) -> str:
    return server.url.replace("http://", "ws://") + "/v1/stream?" + urlencode(options)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(options=stream_options, messages=stream_messages)
# found by this test: audio after a finalize at a resampled rate, and JSON nested deeper than the recursion limit
@example(options={"sample_rate": 48000, "encoding": "pcm_f32le"}, messages=[b"\0" * 400, '{"type": "finalize"}', b"\0" * 400])
@example(options={"sample_rate": SAMPLE_RATE, "encoding": "pcm_s16le"}, messages=["[" * 2000 + "]" * 2000])
def test_any_control_messages_leave_the_stream_in_a_documented_state(server: Server, options: dict, messages: list[str | bytes]) -> None:
    received, close_code = asyncio.run(exchange(stream_url(server, options), messages))
    events = [parse_event(message) for message in received]
    assert events and events[0]["type"] == "ready", events
    errors = [e for e in events if e["type"] == "error"]
    assert close_code != 1011, f"internal error on the stream: {errors}, after {options} {messages!r:.400}"
    assert [e["type"] for e in events].count("closed") == 1 and events[-1]["type"] == "closed", events
    assert events[-1]["reason"] in CLOSE_REASONS.get(close_code, set()), (close_code, events[-1])
    if close_code == 1000:
        check_every_text_message_is_answered([*messages, CLOSE_MESSAGE], events)


# --- 3. the REST API against its OpenAPI schema ---------------------------------------------------------------

# not status_code_conformance: the schema lists 200 and 422 only, the README documents the other statuses; not
# content_type_conformance: the schema declares JSON only, FastAPI cannot see the plain-text response formats
RESPONSE_CHECKS = [not_a_server_error, response_schema_conformance, response_headers_conformance]
# schemathesis takes a body it did not generate for invalid data, so only generated cases are held to rejecting it
GENERATED_CASE_CHECKS = [*RESPONSE_CHECKS, negative_data_rejection]
# the README's response formats of /v1/audio/transcriptions
FORMAT_CONTENT_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain", "srt": "text/plain",
                        "vtt": "text/vtt"}


def content_type(response: Response) -> str:
    return next((values[0] for name, values in response.headers.items() if name.lower() == "content-type"), "")


def check_documented_shape(case: Case, response: Response) -> None:
    """README: every error is ``{"error": {"code", "message"}}`` in JSON; a transcript comes in the format asked for."""
    if response.status_code >= 400:
        assert content_type(response).startswith("application/json"), (response.status_code, content_type(response))
        error = response.json().get("error", {})
        assert isinstance(error.get("code"), str) and isinstance(error.get("message"), str), response.text
    elif case.path == "/v1/audio/transcriptions" and isinstance(case.body, dict):
        response_format = case.body.get("response_format", "json")
        expected = "text/event-stream" if case.body.get("stream") is True else FORMAT_CONTENT_TYPES[response_format]
        assert content_type(response).startswith(expected), (response_format, content_type(response))


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    """The first 3 s of the JFK clip as a WAV file: audio that gets past decoding to the model."""
    samples = decode_audio(JFK.read_bytes(), 60)[: 3 * SAMPLE_RATE]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api_schema(server: Server) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def with_speech(case: Case, speech: bytes) -> Case | None:
    """The case with real speech in place of its generated file, or None when it has no file to replace."""
    if case.media_type == "application/octet-stream":
        body = speech
    elif isinstance(case.body, dict) and "file" in case.body:
        body = {**case.body, "file": speech}
    else:
        return None
    speaking = case.derive()
    speaking.body = body
    return speaking


# schemathesis's pytest integration cannot take this schema: schema.parametrize() needs it at import time, before the
# server fixture runs, and schemathesis.pytest.from_fixture breaks on pytest 9 (it sets Item._nodeid, which is gone).
# The schema's Hypothesis strategy generates the same cases (its fuzzing phase) under a plain @given.
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_rest_api_never_fails_with_5xx_and_keeps_to_its_schema(api_schema: BaseSchema, speech_wav: bytes, data: st.DataObject) -> None:
    mode = data.draw(st.sampled_from(list(GenerationMode)))
    case = data.draw(api_schema.as_strategy(mode), label=mode.value)
    check_documented_shape(case, case.call_and_validate(checks=GENERATED_CASE_CHECKS, timeout=120))
    # generated bytes almost never decode as audio: a valid case goes once more with speech, so that its random
    # query and form fields reach the model and the response formats
    speaking = with_speech(case, speech_wav) if mode.is_positive else None
    if speaking is not None:
        check_documented_shape(speaking, speaking.call_and_validate(checks=RESPONSE_CHECKS, timeout=120))
