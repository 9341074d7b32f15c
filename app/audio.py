"""Uploaded audio files -> float32 mono PCM at 16 kHz, with PyAV (ffmpeg), and raw PCM streams likewise.

An upload is hostile until proven otherwise. ffmpeg left to probe a file would pick any of its 400
demuxers, some of which open what the file names: ``concat`` and playlists read local files, ``sdp``
and ``hls`` open sockets. So the container is recognised here from its first bytes, among audio
containers only (:data:`CONTAINERS`), and opened with that demuxer alone; a nested open is refused
whatever the demuxer; and decoding stops at a deadline.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
import numpy as np

from app.errors import APIError
from workers.engine import SAMPLE_RATE

# a file that decodes to less than this share of the duration its container declares was cut short
TRUNCATION_TOLERANCE = 0.9
READ_CHUNK_BYTES = 32 * 1024  # PyAV's buffer for Python file objects

# the containers accepted, as ffmpeg demuxer -> what users call them (the README lists these)
CONTAINERS = {
    "wav": "WAV, RF64, BW64", "w64": "Sony Wave64", "flac": "FLAC", "mp3": "MP3", "aac": "AAC (ADTS)",
    "ogg": "Ogg (Opus, Vorbis, FLAC, Speex)", "matroska": "WebM, Matroska (mka, mkv)",
    "mov": "MP4, M4A, MOV, 3GP", "aiff": "AIFF, AIFF-C", "au": "Sun AU (.snd)", "caf": "Core Audio (CAF)",
    "amr": "AMR, AMR-WB", "wv": "WavPack", "asf": "WMA, ASF",
}
# per demuxer: what must be off whatever a file says (QuickTime's data references name other files)
DEMUXER_OPTIONS = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}}
ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
MP4_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}


def _skip_id3v2(data: bytes) -> int:
    """Where the audio starts after an ID3v2 tag (MP3, AAC and FLAC files may begin with one)."""
    if len(data) >= 10 and data[:3] == b"ID3":
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        return 10 + size + (10 if data[5] & 0x10 else 0)  # the footer flag adds 10 bytes
    return 0


def _frame_sync(head: bytes) -> str | None:
    """An MPEG audio frame header (MP3) or an ADTS header (AAC) at the start of ``head``."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    version, layer = (head[1] >> 3) & 3, (head[1] >> 1) & 3
    if layer == 0:
        return "aac" if head[1] & 0xF6 == 0xF0 else None
    if version == 1 or head[2] >> 4 == 0xF or (head[2] >> 2) & 3 == 3:  # reserved values
        return None
    return "mp3"


def sniff_container(data: bytes) -> str | None:
    """The demuxer of one of :data:`CONTAINERS` that ``data`` starts like, or None."""
    head = data[:16]
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"riff" and head[4:8] == bytes.fromhex("2e91cf11"):
        return "w64"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[4:8] in MP4_FIRST_BOXES:
        return "mov"
    simple = {b"OggS": "ogg", b"\x1a\x45\xdf\xa3": "matroska", b".snd": "au", b"caff": "caf", b"wvpk": "wv", b"fLaC": "flac"}
    if (found := simple.get(head[:4])) is not None:
        return found
    if head.startswith(b"#!AMR"):
        return "amr"
    if head == ASF_GUID:
        return "asf"
    start = _skip_id3v2(data)
    if data[start : start + 4] == b"fLaC":
        return "flac"
    return _frame_sync(data[start : start + 4])


def _refuse_nested_open(url: str, flags: int, options: dict) -> None:
    """ffmpeg's io_open for every file or URL a container names: none is ever opened."""
    raise PermissionError("an uploaded file may not refer to other files or URLs")


class DecodeDeadline(Exception):
    pass


class _DeadlineReader(io.BytesIO):
    """The upload's bytes for ffmpeg, readable until the deadline: every demuxer reads through here (PyAV
    calls ``read``), so none can keep a thread past it."""

    def __init__(self, data: bytes, deadline: float):
        super().__init__(data)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise DecodeDeadline
        return super().read(size)


def wav_is_truncated(data: bytes) -> bool:
    """True for a RIFF/WAVE file whose data chunk declares more bytes than the file holds. ffmpeg
    derives a WAV's duration from the file size, so the general check below cannot see this."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"data":
            return size != 0xFFFFFFFF and offset + 8 + size > len(data)  # 0xFFFFFFFF: streamed, unknown size
        offset += 8 + size + (size & 1)
    return False


def decode_audio(data: bytes, max_audio_s: float, timeout_s: float = 30.0) -> np.ndarray:
    """Decode an uploaded file within ``timeout_s``; raises :class:`APIError` (400, 413, 415) with a reason."""
    if not data:
        raise APIError(400, "empty_audio", "the request has no audio: send the file as the multipart field 'file' or as the raw body")
    if (demuxer := sniff_container(data)) is None:
        raise APIError(415, "unsupported_audio", f"the data is not an audio file of a supported container: {', '.join(CONTAINERS.values())}")
    deadline = time.monotonic() + timeout_s
    try:
        return _decode(_DeadlineReader(data, deadline), demuxer, max_audio_s, deadline, wav_is_truncated(data))
    except DecodeDeadline:
        raise APIError(400, "decode_timeout", f"decoding the file took over {timeout_s:g} s (ASR_DECODE_TIMEOUT_S); send a plainer encoding") from None


def _decode(reader: _DeadlineReader, demuxer: str, max_audio_s: float, deadline: float, truncated_wav: bool) -> np.ndarray:
    try:
        container = av.open(reader, mode="r", format=demuxer, options=DEMUXER_OPTIONS.get(demuxer, {}), metadata_errors="ignore",
                            buffer_size=READ_CHUNK_BYTES, io_open=_refuse_nested_open)
    except (av.error.FFmpegError, ValueError, PermissionError) as exc:
        raise APIError(415, "unsupported_audio", f"the data is not a readable {CONTAINERS[demuxer]} file") from exc
    with container:
        if not container.streams.audio:
            raise APIError(415, "no_audio_stream", "the file has no audio stream")
        stream = container.streams.audio[0]
        declared_s = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if declared_s is None and container.duration:
            declared_s = container.duration / av.time_base
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, samples, limit = [], 0, int(max_audio_s * SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                if time.monotonic() > deadline:
                    raise DecodeDeadline
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    samples += chunks[-1].shape[0]
                if samples > limit:
                    raise APIError(413, "audio_too_long", f"the audio is longer than the limit of {max_audio_s:g} s (ASR_MAX_AUDIO_S)")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except (av.error.FFmpegError, PermissionError) as exc:
            raise APIError(400, "corrupt_audio", f"the audio stream could not be decoded: {getattr(exc, 'strerror', None) or 'invalid data'}") from exc
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise APIError(400, "corrupt_audio", "the file decodes to no audio samples")
    if truncated_wav or (declared_s and audio.size / SAMPLE_RATE < TRUNCATION_TOLERANCE * declared_s):
        raise APIError(400, "truncated_audio", f"the file holds only {audio.size / SAMPLE_RATE:.1f} s of the audio its header declares; it was cut short")
    if not np.isfinite(audio).all():
        audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)


class AudioDecoder:
    """Decodes uploads on threads of its own, ``workers`` at a time with ``max_waiting`` more queued; past
    that, uploads are refused (429), before their body is read when admission asks :meth:`refusal`.
    Sharing asyncio's default pool let a few slow files hold every other request's decoding."""

    def __init__(self, workers: int, max_waiting: int, timeout_s: float, max_audio_s: float):
        self.workers, self.max_waiting, self.timeout_s, self.max_audio_s = workers, max_waiting, timeout_s, max_audio_s
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="audio-decode")
        self.in_flight = 0  # decoding or waiting for a thread

    def refusal(self) -> APIError | None:
        if self.in_flight < self.workers + self.max_waiting:
            return None
        return APIError(429, "overloaded", f"{self.in_flight} uploads are being decoded or wait for it, the limit is "
                        f"{self.workers + self.max_waiting} (ASR_DECODE_WORKERS + ASR_DECODE_MAX_WAITING); retry later",
                        {"Retry-After": str(max(1, round(self.timeout_s / 10)))})

    async def decode(self, data: bytes) -> np.ndarray:
        if (refusal := self.refusal()) is not None:
            raise refusal
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, decode_audio, data, self.max_audio_s, self.timeout_s)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _g711_table(law: str) -> np.ndarray:
    """The 256 linear values of G.711 mu-law or A-law bytes (ITU-T G.711, as ffmpeg's pcm_mulaw / pcm_alaw
    decode them), as float32 in [-1, 1]."""
    code = np.arange(256, dtype=np.int32) ^ (0xFF if law == "mulaw" else 0x55)  # both laws send their bits inverted
    exponent, mantissa = (code >> 4) & 7, code & 0x0F
    if law == "mulaw":
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        negative = code & 0x80 != 0
    else:
        magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
        negative = code & 0x80 == 0
    return (np.where(negative, -magnitude, magnitude) / 32768.0).astype(np.float32)


@dataclass(frozen=True)
class PcmEncoding:
    dtype: np.dtype  # of one sample as sent
    to_float: Callable[[np.ndarray], np.ndarray]  # samples as sent -> float32 in [-1, 1]


PCM_ENCODINGS = {
    "pcm_s16le": PcmEncoding(np.dtype("<i2"), lambda samples: samples.astype(np.float32) / 32768.0),
    "pcm_f32le": PcmEncoding(np.dtype("<f4"), lambda samples: samples.astype(np.float32)),
    "pcm_mulaw": PcmEncoding(np.dtype("u1"), _g711_table("mulaw").__getitem__),  # G.711, telephony's 8 kHz
    "pcm_alaw": PcmEncoding(np.dtype("u1"), _g711_table("alaw").__getitem__),
}


class PcmStream:
    """Raw mono PCM in frames of any size -> float32 at 16 kHz.

    Bytes of a sample split across two frames are carried to the next one. Other sample rates go
    through one swresample context for the whole stream, so frame edges leave no clicks.
    """

    def __init__(self, encoding: str, sample_rate: int):
        self.encoding = PCM_ENCODINGS[encoding]
        self.sample_rate = sample_rate
        self.carry = b""
        self.samples_in = 0
        self.resampler = None if sample_rate == SAMPLE_RATE else self._new_resampler()

    @staticmethod
    def _new_resampler() -> av.AudioResampler:
        return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def decode(self, data: bytes) -> np.ndarray:
        data = self.carry + data
        size = self.encoding.dtype.itemsize
        whole = len(data) // size * size
        self.carry = data[whole:]
        audio = self.encoding.to_float(np.frombuffer(data[:whole], dtype=self.encoding.dtype))
        # a float stream may carry NaN, infinities or values past full scale; they must not reach the model
        audio = np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        return self._resample(audio)

    def flush(self) -> np.ndarray:
        """What the resampler still holds, at the end of the stream (or of an utterance); audio may follow."""
        if self.resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._frames(self.resampler.resample(None))
        self.resampler, self.samples_in = self._new_resampler(), 0  # a flushed filter graph takes no more input
        return tail

    def _resample(self, audio: np.ndarray) -> np.ndarray:
        if self.resampler is None or not len(audio):
            return audio
        frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples_in
        self.samples_in += len(audio)
        return self._frames(self.resampler.resample(frame))

    @staticmethod
    def _frames(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.float32)
        # resampling a full-scale signal overshoots full scale: clip again
        return np.clip(np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), -1.0, 1.0)
