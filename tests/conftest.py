"""Shared fixtures: the evaluation kit, and real servers (``python -m app``) on loopback ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.harness import free_port, wav_bytes  # noqa: F401 - the tests' helpers too

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "eval"
JFK = EVAL / "audio" / "faster_whisper_tests" / "jfk.flac"
JFK_TEXT = "and so my fellow americans ask not what your country can do for you ask what you can do for your country"


LIMITED_SETTINGS = {"max_upload_bytes": 2_000_000, "max_audio_s": 20, "stream_max_sessions": 2, "stream_idle_timeout_s": 2,
                    "stream_max_session_s": 5, "stream_max_frame_bytes": 65536}


class Quiet:
    """A StageObserver that ignores everything, for stages tested without the service around them."""

    def batch_done(self, stage, size, busy_s): ...
    def window_done(self, stage, waited_s, worked_s, audio_s): ...
    def windows_failed(self, stage, count): ...
    def windows_abandoned(self, stage, count): ...
    def worker_restarted(self, stage): ...


class Server:
    """A real server process; ``url`` is its base URL."""

    def __init__(self, cwd: Path = ROOT, preexec_fn: Callable[[], None] | None = None, **settings: str):
        settings.setdefault("data_dir", tempfile.mkdtemp(prefix="asr-jobs-"))  # each server its own job store
        self.data_dir = Path(settings["data_dir"])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ASR_HOST": "127.0.0.1", "ASR_PORT": str(self.port), "ASR_LOG_LEVEL": "warning",
               **{f"ASR_{k.upper()}": v for k, v in settings.items()}}
        self.process = subprocess.Popen([sys.executable, "-m", "app"], cwd=cwd, env=env, preexec_fn=preexec_fn)  # the package is installed: any cwd works

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server not ready in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextlib.contextmanager
def running_server(cwd: Path = ROOT, **settings: str) -> Iterator[Server]:
    """A ready server with these settings, run in ``cwd``, stopped on exit."""
    s = Server(cwd, **settings)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with running_server() as s:
        yield s


@pytest.fixture(scope="session")
def limited_server() -> Iterator[Server]:
    """Small limits, to test refusals without huge uploads or long waits."""
    with running_server(**{name: str(value) for name, value in LIMITED_SETTINGS.items()}) as s:
        yield s


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
