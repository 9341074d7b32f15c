"""Any audio file -> float32 mono PCM at 16 kHz, with PyAV (ffmpeg): wav, flac, mp3, ogg/opus, m4a, webm..."""

from __future__ import annotations

import io
import struct

import av
import numpy as np

from app.errors import APIError
from workers.features import SAMPLE_RATE

# a file that decodes to less than this share of the duration its container declares was cut short
TRUNCATION_TOLERANCE = 0.9


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


def decode_audio(data: bytes, max_audio_s: float) -> np.ndarray:
    """Decode an uploaded file; raises :class:`APIError` (400, 413, 415) with a reason."""
    if not data:
        raise APIError(400, "empty_audio", "the request has no audio: send the file as the multipart field 'file' or as the raw body")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError) as exc:
        raise APIError(415, "unsupported_audio", "the data is not an audio file ffmpeg can read (wav, flac, mp3, ogg/opus, m4a, webm, ...)") from exc
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
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    samples += chunks[-1].shape[0]
                if samples > limit:
                    raise APIError(413, "audio_too_long", f"the audio is longer than the limit of {max_audio_s:g} s (ASR_MAX_AUDIO_S)")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise APIError(400, "corrupt_audio", f"the audio stream could not be decoded: {exc.strerror or 'invalid data'}") from exc
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise APIError(400, "corrupt_audio", "the file decodes to no audio samples")
    if wav_is_truncated(data) or (declared_s and audio.size / SAMPLE_RATE < TRUNCATION_TOLERANCE * declared_s):
        raise APIError(400, "truncated_audio", f"the file holds only {audio.size / SAMPLE_RATE:.1f} s of the audio its header declares; it was cut short")
    if not np.isfinite(audio).all():
        audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)


PCM_ENCODINGS = {"pcm_s16le": (np.dtype("<i2"), 32768.0), "pcm_f32le": (np.dtype("<f4"), 1.0)}


class PcmStream:
    """Raw mono PCM in frames of any size -> float32 at 16 kHz.

    Bytes of a sample split across two frames are carried to the next one. Other sample rates go
    through one swresample context for the whole stream, so frame edges leave no clicks.
    """

    def __init__(self, encoding: str, sample_rate: int):
        self.dtype, self.scale = PCM_ENCODINGS[encoding]
        self.sample_rate = sample_rate
        self.carry = b""
        self.samples_in = 0
        self.resampler = None if sample_rate == SAMPLE_RATE else self._new_resampler()

    @staticmethod
    def _new_resampler() -> av.AudioResampler:
        return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def decode(self, data: bytes) -> np.ndarray:
        data = self.carry + data
        whole = len(data) // self.dtype.itemsize * self.dtype.itemsize
        self.carry = data[whole:]
        audio = np.frombuffer(data[:whole], dtype=self.dtype).astype(np.float32) / self.scale
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
