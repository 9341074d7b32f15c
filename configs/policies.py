"""The one step from settings to what the engine runs with: frozen policies, every "0 means the device
default" resolved for the device the model landed on, and the cross-field checks that need it.

The engine never sees :class:`Settings`; it is built from an :class:`EnginePolicy`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from configs.settings import Settings

STAGES = ("features", "acoustic", "decoder", "post")


@dataclass(frozen=True)
class StagePolicy:
    workers: int  # the pool's configured (and least) size
    max_workers: int  # the most the allocator may grow it to
    max_batch_size: int
    max_wait_ms: float
    capacity: int  # most windows waiting in front of the stage
    reserved_final: int  # of which only stream finals may take
    reserved_realtime: int  # ... and only finals and interim steps
    bulk_share: float
    job_share: float


@dataclass(frozen=True)
class GuardsPolicy:
    no_speech_threshold: float = 0.6  # with logprob_threshold: Whisper's rule for a silent window
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4  # text that compresses better than this is looping
    max_repeats: int = 2  # a looping phrase is kept at most this many times in a row


@dataclass(frozen=True)
class DecodingPolicy:
    """How windows are decoded unless a request says otherwise."""

    beam_size: int = 5
    patience: float = 1.0
    length_penalty: float = 1.0
    best_of: int = 5
    temperature_increment: float = 0.2  # 0: no fallback
    seed: int = 0
    stream_beam_size: int = 1
    condition_on_previous_text: bool = True
    stream_fallback: bool = False  # a stream's finals fall back to higher temperatures (interim steps never do)


@dataclass(frozen=True)
class StreamPolicy:
    step_s: float = 1.0
    vad_threshold: float = 0.5
    speech_pad_s: float = 0.2  # audio kept before the first and after the last speech chunk
    max_utterance_s: float = 25.0
    min_speech_s: float = 0.25  # an utterance with less speech (a click, a breath) is not transcribed
    prompt_previous_text: bool = True
    prompt_words: int = 100  # words of earlier finals given to the decoder as its prompt


@dataclass(frozen=True)
class EnginePolicy:
    stages: dict[str, StagePolicy]
    guards: GuardsPolicy
    search: DecodingPolicy
    stream: StreamPolicy
    max_new_tokens: int
    silence_threshold_dbfs: float
    encoder_packing: str  # a workers.packing.PackingMode value
    jobs_yield_to_live: bool  # job windows wait while any live window is in flight (see workers.scheduler.LiveWindows)


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, and the container's cgroup quota (cgroup v2
    ``cpu.max``, or v1's ``cfs_quota_us`` / ``cfs_period_us``), where ``os.cpu_count()`` counts the host's."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(Path("/sys/fs/cgroup"))
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def resolve_engine_policy(settings: Settings, on_gpu: bool) -> EnginePolicy:
    """The engine's policies for a model on a GPU (``on_gpu``) or on the CPU; raises ValueError, saying
    which setting to change, for combinations that cannot work."""
    s = settings
    # on the CPU one encoder or decoder batch already keeps every core busy: a second worker only competes
    model_max = s.model_max_workers or (4 if on_gpu else 1)
    acoustic_batch = s.acoustic_max_batch_size or (16 if on_gpu else 1)
    decoder_batch = s.decoder_max_batch_size or (64 if on_gpu else 16)

    def stage(workers: int, max_workers: int, batch: int, wait_ms: float) -> StagePolicy:
        return StagePolicy(workers, max(workers, max_workers), batch, wait_ms, max(s.queue_capacity, batch),
                           s.queue_reserved_final_windows, s.queue_reserved_realtime_windows, s.bulk_share, s.job_share)

    stages = {
        "features": stage(s.features_workers, s.cpu_stage_max_workers, 1, 0.0),
        "acoustic": stage(s.acoustic_workers, model_max, acoustic_batch, s.acoustic_max_wait_ms),
        "decoder": stage(s.decoder_workers, model_max, decoder_batch, s.decoder_max_wait_ms),
        "post": stage(s.post_workers, s.cpu_stage_max_workers, 1, 0.0),
    }
    for name, policy in stages.items():
        bulk_room = policy.capacity - policy.reserved_final - policy.reserved_realtime
        if bulk_room < policy.max_batch_size:
            raise ValueError(f"the {name} stage's queue leaves bulk work room for {bulk_room} windows, less than one batch "
                             f"({policy.max_batch_size}): raise ASR_QUEUE_CAPACITY or lower ASR_QUEUE_RESERVED_FINAL_WINDOWS "
                             "and ASR_QUEUE_RESERVED_REALTIME_WINDOWS")
    return EnginePolicy(
        stages=stages,
        guards=GuardsPolicy(s.no_speech_threshold, s.logprob_threshold, s.compression_ratio_threshold),
        search=DecodingPolicy(s.beam_size, s.patience, s.length_penalty, s.best_of, s.temperature_increment_on_fallback, s.sampling_seed,
                            s.stream_beam_size, s.condition_on_previous_text, s.stream_temperature_fallback),
        stream=StreamPolicy(step_s=s.stream_step_s, vad_threshold=s.stream_vad_threshold, max_utterance_s=s.stream_max_utterance_s,
                            min_speech_s=s.stream_min_speech_ms / 1000, prompt_previous_text=s.stream_prompt_previous_text,
                            prompt_words=s.stream_prompt_words),
        max_new_tokens=s.max_new_tokens,
        silence_threshold_dbfs=s.silence_threshold_dbfs,
        encoder_packing=s.encoder_packing,
        jobs_yield_to_live=s.job_yield_to_live,
    )
