"""The server as an attacker meets it: uploads that name other files or open sockets, clients that send
their headers or their body a little at a time, idle WebSockets, floods from one client, foreign origins.
Each against a real server on a loopback port, next to good requests and streams that must go on."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import av
import httpx
import numpy as np
import pytest
import websockets

from app.audio import AudioDecoder, decode_audio, sniff_container
from app.errors import APIError
from loadtest.abuse import udp_sockets_of
from loadtest.evalset import normalize, word_error_rate
from loadtest.stream import StreamClient
from tests.conftest import JFK, JFK_TEXT, Server, running_server, wav_bytes
from tests.test_stream import metrics

SLACK_S = 3.0  # a deadline is kept when the cut comes within this much of it, on a loaded 2-core machine
SHORT = {"header_timeout_s": "2", "body_grace_s": "2", "body_min_rate_bytes_s": "4096", "upload_timeout_s": "6",
         "max_connections": "40", "stream_first_audio_timeout_s": "2"}


# --- only audio containers are opened --------------------------------------------------------------------

def _encode(container: str, codec: str, rate: int = 16000) -> bytes:
    """Two seconds of a tone, encoded as ``container`` / ``codec`` with PyAV."""
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
    out = io.BytesIO()
    with av.open(out, "w", format=container) as muxer:
        stream = muxer.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone[None, :], format="flt", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono", rate=rate)
        for resampled in resampler.resample(frame) + resampler.resample(None):
            muxer.mux(stream.encode(resampled))
        muxer.mux(stream.encode(None))
    return out.getvalue()


@pytest.mark.parametrize(("container", "codec", "rate", "demuxer"), [
    ("wav", "pcm_s16le", 16000, "wav"), ("w64", "pcm_s16le", 16000, "w64"), ("flac", "flac", 16000, "flac"),
    ("mp3", "libmp3lame", 16000, "mp3"), ("adts", "aac", 16000, "aac"), ("ogg", "libopus", 48000, "ogg"),
    ("webm", "libopus", 48000, "matroska"), ("mp4", "aac", 16000, "mov"), ("ipod", "aac", 16000, "mov"),
    ("3gp", "aac", 16000, "mov"), ("mov", "pcm_s16le", 16000, "mov"), ("aiff", "pcm_s16be", 16000, "aiff"),
    ("au", "pcm_s16be", 16000, "au"), ("caf", "pcm_s16le", 16000, "caf"), ("amr", "libopencore_amrnb", 8000, "amr"),
    ("wv", "wavpack", 16000, "wv"),
])
def test_every_listed_container_is_recognised_and_decodes(container: str, codec: str, rate: int, demuxer: str) -> None:
    data = _encode(container, codec, rate)
    assert sniff_container(data) == demuxer
    assert abs(len(decode_audio(data, 60)) / 16000 - 2.0) < 0.2


def test_every_eval_file_is_recognised() -> None:
    files = [f for f in (JFK.parents[1]).rglob("*") if f.suffix in {".flac", ".wav", ".mp3", ".ogg", ".webm", ".mp4", ".aac", ".aiff", ".m4a"}]
    assert len(files) > 50
    assert [f.name for f in files if sniff_container(f.read_bytes()[:64 * 1024]) is None] == []


def test_a_decode_past_its_deadline_is_refused() -> None:
    long_wav = wav_bytes(np.zeros(16000 * 600, np.float32))
    with pytest.raises(APIError) as refused:
        decode_audio(long_wav, 1800, timeout_s=0.001)
    assert (refused.value.status, refused.value.code) == (400, "decode_timeout")


def test_decoding_is_bounded_and_refuses_past_its_queue() -> None:
    decoder = AudioDecoder(workers=1, max_waiting=1, timeout_s=30, max_audio_s=1800)
    long_wav = wav_bytes(np.zeros(16000 * 900, np.float32))

    async def three_at_once() -> list:
        return await asyncio.gather(*(decoder.decode(long_wav) for _ in range(3)), return_exceptions=True)

    try:
        results = asyncio.run(three_at_once())
    finally:
        decoder.close()
    assert [r.shape[0] if isinstance(r, np.ndarray) else (r.status, r.code) for r in results] == [16000 * 900, 16000 * 900, (429, "overloaded")]
    assert decoder.in_flight == 0


class TcpListener:
    """A local TCP port that records every connection made to it (none may be)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted = 0
        self.socket.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            with contextlib.suppress(TimeoutError, OSError):
                self.socket.accept()[0].close()
                self.accepted += 1

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.socket.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server run in a folder that holds speech.flac (what a nested open would find), with per-client
    limits and an origin list."""
    cwd = tmp_path_factory.mktemp("server-cwd")
    shutil.copy(JFK, cwd / "speech.flac")
    with running_server(cwd, cors_origins="https://app.example", stream_max_sessions_per_client="1",
                        client_max_requests_per_s="1", client_request_burst="40", stream_first_audio_timeout_s="2") as s:
        yield s


def _nested_resource_files(tcp_port: int, udp_port: int) -> dict[str, bytes]:
    url = f"http://127.0.0.1:{tcp_port}/speech.flac"
    return {
        "ffconcat naming a local file": b"ffconcat version 1.0\nfile 'speech.flac'\n",
        "ffconcat naming a URL": f"ffconcat version 1.0\nfile '{url}'\n".encode(),
        "HLS playlist naming a local file": b"#EXTM3U\n#EXT-X-TARGETDURATION:11\n#EXTINF:11,\nspeech.flac\n#EXT-X-ENDLIST\n",
        "HLS playlist naming a URL": f"#EXTM3U\n#EXT-X-TARGETDURATION:11\n#EXTINF:11,\n{url}\n#EXT-X-ENDLIST\n".encode(),
        "m3u playlist naming a local file": b"#EXTM3U\n#EXTINF:11,speech\nspeech.flac\n",
        "pls playlist naming a local file": b"[playlist]\nNumberOfEntries=1\nFile1=speech.flac\n",
        "SDP opening a UDP port": f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio {udp_port} RTP/AVP 0\n".encode(),
        "RTSP URL as the body": f"rtsp://127.0.0.1:{tcp_port}/speech".encode(),
    }


def test_files_that_name_other_resources_are_refused_at_once(guarded: Server) -> None:
    listener = TcpListener()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    try:
        with httpx.Client(base_url=guarded.url, timeout=60) as client:
            for name, body in _nested_resource_files(listener.port, udp.getsockname()[1]).items():
                started = time.monotonic()
                answer = client.post("/v1/transcribe", content=body)
                took = time.monotonic() - started
                assert (answer.status_code, answer.json()["error"]["code"]) == (415, "unsupported_audio"), name
                assert took < 5, f"{name}: answered after {took:.1f} s"  # before: about 20 s for SDP
            multipart = client.post("/v1/audio/transcriptions", files={"file": ("a.m3u8", b"#EXTM3U\nspeech.flac\n")}, data={"model": "whisper-1"})
            assert multipart.status_code == 415
            assert udp_sockets_of(guarded.process.pid) == 0
            assert normalize(client.post("/v1/transcribe", content=JFK.read_bytes()).json()["text"]) == JFK_TEXT
    finally:
        listener.close()
    with pytest.raises(BlockingIOError):
        udp.recv(2048)
    udp.close()
    assert listener.accepted == 0


# --- per-client limits and origins -------------------------------------------------------------------------

def test_one_client_over_its_request_rate_gets_429_and_others_go_on(guarded: Server) -> None:
    flood = httpx.Client(base_url=guarded.url, transport=httpx.HTTPTransport(local_address="127.0.0.3"))
    other = httpx.Client(base_url=guarded.url, transport=httpx.HTTPTransport(local_address="127.0.0.4"))
    with flood, other:
        statuses = [flood.get("/v1/models").status_code for _ in range(45)]
        refused = flood.get("/v1/models")
        assert statuses.count(200) >= 40 and refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
        assert flood.get("/healthz").status_code == 200  # outside /v1/: no limit
        assert other.get("/v1/models").status_code == 200


async def _handshake(url: str, **kwargs) -> tuple[int, dict]:
    """Opens a stream; (101, ready message) or (HTTP status, JSON body) when refused."""
    try:
        async with websockets.connect(url, **kwargs) as ws:
            return 101, json.loads(await ws.recv())
    except websockets.InvalidStatus as refused:
        return refused.response.status_code, json.loads(refused.response.body)


def test_stream_origins_are_checked(guarded: Server) -> None:
    url = guarded.url.replace("http", "ws") + "/v1/stream"
    host = guarded.url.removeprefix("http://")

    async def run() -> list:
        return [await _handshake(url, origin=o, local_addr=(f"127.0.0.{5 + i}", 0))
                for i, o in enumerate(["https://evil.example", "https://app.example", f"http://{host}", None])]

    (evil, evil_body), (listed, _), (own, _), (none, _) = asyncio.run(run())
    assert (evil, evil_body["error"]["code"]) == (403, "origin_not_allowed")
    assert (listed, own, none) == (101, 101, 101)  # a listed origin, the server's own page, a client that sends none


def test_idle_streams_are_closed_and_one_client_cannot_take_every_slot(guarded: Server) -> None:
    url = guarded.url.replace("http", "ws") + "/v1/stream"

    async def run() -> tuple:
        async with websockets.connect(url, local_addr=("127.0.0.9", 0)) as idle:
            started = time.monotonic()
            second = await _handshake(url, local_addr=("127.0.0.9", 0))  # the same client: over its limit of 1
            other = await _handshake(url, local_addr=("127.0.0.10", 0))
            messages = []
            with contextlib.suppress(websockets.ConnectionClosed):
                async for message in idle:
                    messages.append(json.loads(message))
            closed_after = time.monotonic() - started
        return second, other, messages, idle.close_code, closed_after

    (status, body), (other, _), messages, code, closed_after = asyncio.run(run())
    assert (status, body["error"]["code"], other) == (429, "too_many_streams", 101)
    assert [m["type"] for m in messages] == ["ready", "error", "closed"] and messages[1]["code"] == "no_audio"
    assert code == 1008 and closed_after < 2 + SLACK_S


# --- slow clients are cut off -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_deadlines() -> Iterator[Server]:
    with running_server(**SHORT) as s:
        yield s


async def _slow_client(port: int, first: bytes, then: bytes, every_s: float) -> tuple[float, bytes]:
    """Sends ``first``, then ``then`` every ``every_s`` until the server closes; (seconds open, what it answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started, answer = time.monotonic(), b""
    writer.write(first)
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), every_s)
            except TimeoutError:
                writer.write(then)
                continue
            if not chunk:
                break
            answer += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started, answer


def _status(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def _body(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def test_slow_headers_and_bodies_are_cut_while_good_work_goes_on(short_deadlines: Server) -> None:
    port, url = short_deadlines.port, short_deadlines.url

    async def run() -> tuple:
        slow_headers = [_slow_client(port, b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\n", b"X-Pad: 1\r\n", 0.5) for _ in range(20)]
        silent = [_slow_client(port, b"", b"", 60) for _ in range(5)]
        trickle = _slow_client(port, b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                               b"Content-Length: 1000000\r\n\r\n", b"x" * 512, 0.5)  # 1 KB/s
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            good_rest = client.post("/v1/transcribe", content=JFK.read_bytes())
            good_stream = StreamClient(url.replace("http", "ws") + "/v1/stream", speed=4.0).run_file(decode_audio(JFK.read_bytes(), 60))
            return await asyncio.gather(asyncio.gather(*slow_headers), asyncio.gather(*silent), trickle, good_rest, good_stream)

    slow_headers, silent, (trickle_s, trickle_answer), rest, stream = asyncio.run(run())
    for open_s, answer in slow_headers:
        assert 2 - 0.1 <= open_s < 2 + SLACK_S and _status(answer) == 408 and _body(answer)["error"]["code"] == "request_timeout"
    assert all(2 - 0.1 <= open_s < 2 + SLACK_S and answer == b"" for open_s, answer in silent)  # nothing sent: closed, no answer
    assert 2 - 0.1 <= trickle_s < 2 + SLACK_S and _status(trickle_answer) == 408
    assert "ASR_BODY_MIN_RATE_BYTES_S" in _body(trickle_answer)["error"]["message"]
    assert rest.status_code == 200 and normalize(rest.json()["text"]) == JFK_TEXT
    assert stream.close_code == 1000 and word_error_rate([JFK_TEXT], [stream.hypothesis]) <= 0.15
    cut = {labels: value for (name, labels), value in metrics(short_deadlines).items() if name == "asr_connections_cut_total"}
    assert cut[(("reason", "header_timeout"),)] >= 25 and cut[(("reason", "body_too_slow"),)] >= 1


def test_an_upload_past_its_deadline_is_cut_whatever_its_rate(short_deadlines: Server) -> None:
    # 8 KB/s is over the least rate, but 1 MB at that rate would take 2 minutes: the 6 s deadline ends it
    open_s, answer = asyncio.run(_slow_client(short_deadlines.port, b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\n"
                                              b"Content-Length: 1000000\r\n\r\n", b"x" * 4096, 0.5))
    assert 6 - 0.1 <= open_s < 6 + SLACK_S and _status(answer) == 408
    assert "ASR_UPLOAD_TIMEOUT_S" in _body(answer)["error"]["message"]


def test_at_the_connection_cap_the_slowest_header_makes_room(short_deadlines: Server) -> None:
    port, url = short_deadlines.port, short_deadlines.url

    async def run() -> tuple:
        hold = [asyncio.ensure_future(_slow_client(port, b"GET /healthz HTTP/1.1\r\n", b"X-Pad: 1\r\n", 0.3)) for _ in range(40)]
        await asyncio.sleep(1.5)  # past the age at which a waiting connection may be evicted
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            good = await client.get("/v1/models")
        return good, await asyncio.gather(*hold)

    good, held = asyncio.run(run())
    assert good.status_code == 200
    evicted = [answer for open_s, answer in held if open_s < 2 - 0.1]
    assert evicted and all(_status(a) == 408 and "ASR_MAX_CONNECTIONS" in _body(a)["error"]["message"] for a in evicted)
