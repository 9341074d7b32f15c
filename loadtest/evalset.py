"""The shared evaluation set and the metrics every load test reports, kept in one place so that the
REST load test, the peer benchmark and the tests all score transcripts the same way."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer

# The eval kit lives beside the checkout (../shared/eval), not inside it, so it is shared between worktrees.
DEFAULT_MANIFEST = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "manifest.jsonl"

_NOT_WORD_CHAR = re.compile(r"[^a-z0-9']")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class EvalRow:
    """One utterance: where its audio is, what was said, which source it came from and how long it is."""

    audio: Path
    text: str
    source_set: str
    duration_s: float


def load_rows(
    manifest_path: Path | str = DEFAULT_MANIFEST,
    *,
    sets: list[str] | None = None,
    wer_only: bool = True,
    limit: int | None = None,
) -> list[EvalRow]:
    """Read the manifest, in file order, with audio paths made absolute.

    `wer_only` drops rows flagged `exclude_from_wer` (the text does not match the whole file) or
    `duplicate_of` (the same speech again in another format), which would skew WER. `sets` keeps only
    those `source_set`s; a name the manifest does not have is an error, so a typo cannot silently
    give an empty or partial run. `limit` keeps the first K rows left, for quick smoke runs.
    """
    manifest_path = Path(manifest_path)
    raw = [json.loads(line) for line in manifest_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if sets is not None:
        unknown = sorted(set(sets) - {r["source_set"] for r in raw})
        if unknown:
            raise ValueError(f"unknown source_set(s) {unknown} in {manifest_path}")
    rows = [
        EvalRow(
            audio=(manifest_path.parent / r["audio"]).resolve(),
            text=r["text"],
            source_set=r["source_set"],
            duration_s=float(r["duration_s"]),
        )
        for r in raw
        if (sets is None or r["source_set"] in sets)
        and not (wer_only and (r.get("exclude_from_wer") or r.get("duplicate_of")))
    ]
    return rows if limit is None else rows[:limit]


def normalize(text: str) -> str:
    """Normalise as the eval kit's README prescribes, so scores are comparable across systems:
    lower-case, anything but a-z, 0-9 and apostrophe becomes a space, apostrophes are dropped
    ("it's" -> "its"), runs of white space collapse to one."""
    text = _NOT_WORD_CHAR.sub(" ", text.lower()).replace("'", "")
    return _SPACES.sub(" ", text).strip()


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER as a fraction: all substitutions, deletions and insertions over all reference words
    (not the mean of per-utterance WERs). Texts are normalised here; an empty hypothesis (a failed
    request) counts every reference word as a deletion instead of making jiwer refuse the input."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    norm_refs = [normalize(r) for r in refs]
    norm_hyps = [normalize(h) for h in hyps]
    ref_words = sum(len(r.split()) for r in norm_refs)
    if ref_words == 0:
        raise ValueError("the references hold no words")
    out = jiwer.process_words(norm_refs, norm_hyps)
    return (out.substitutions + out.deletions + out.insertions) / ref_words


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default). Empty input gives NaN so that a run in which every request failed still prints a summary."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
