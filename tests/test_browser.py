"""The web page at ``/``, end to end: headless Chromium records JFK from a fake microphone, streams it to the
real server, and the page shows the partials, the finals and the pipeline panel.

Chromium is Debian's (``make test`` installs it) and is driven over the Chrome DevTools Protocol with the
``websockets`` client the service already depends on: no browser download, no driver process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import ClientConnection, connect

from app.audio import decode_audio
from tests.conftest import JFK, ROOT, Server, wav_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "loadtest" / "results" / "browser.png"
VIEWPORT = {"width": 1280, "height": 800}
STAGES = ["features", "acoustic", "decoder", "post"]
# Without the background-networking flags Chromium's own connections, refused on a closed network, pile up.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
         f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}", "--remote-debugging-port=0"]
# Records what the transcript shows at each change: the partial line's text and how many finals are above it.
RECORD_TRANSCRIPT = """
window.transcriptSeen = [];
new MutationObserver(() => window.transcriptSeen.push({
  partial: document.getElementById('partial').textContent.trim(),
  finals: document.querySelectorAll('#finals li').length,
})).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
"""

class DevTools:
    """The Chrome DevTools Protocol over one WebSocket, synchronously: a call waits for its reply and keeps
    the events that arrive before it (console messages, exceptions)."""

    def __init__(self, socket: ClientConnection):
        self.socket = socket
        self.last_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session_id: str | None = None, timeout_s: float = 30, **params: Any) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        self.socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while (reply := json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))).get("id") != self.last_id:
            self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error'].get('message')}")
        return reply["result"]


class Page:
    """One tab of the browser."""

    def __init__(self, devtools: DevTools, session_id: str):
        self.devtools = devtools
        self.session_id = session_id

    def call(self, method: str, **params: Any) -> dict:
        return self.devtools.call(method, self.session_id, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.2)
        raise AssertionError(f"{what} not within {timeout_s:g} s; the page says {self.evaluate(STATUS)!r}; "
                             f"script errors: {self.script_errors()}")

    def script_errors(self) -> list[str]:
        """Uncaught exceptions and console.error calls so far (failed fetches are the page's own business)."""
        errors = []
        for event in self.devtools.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params.get("args", [])))
        return errors

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


STATUS = "document.getElementById('status').textContent"
FINALS = "[...document.querySelectorAll('#finals li span')].map((line) => line.textContent)"
CLOCK_S = "document.getElementById('clock').textContent.split(':').reduce((seconds, part) => 60 * seconds + Number(part), 0)"
PARTIAL = "document.getElementById('partial').textContent.trim()"
STAGE_ROWS = ("[...document.querySelectorAll('#stages tbody tr')].map((row) => "
              "({stage: row.dataset.stage, workers: row.querySelector('td.workers').textContent}))")


@contextlib.contextmanager
def chromium(profile: Path, fake_microphone: Path) -> Iterator[Page]:
    """Headless Chromium with a fresh profile, whose microphone plays ``fake_microphone`` once; yields a blank tab."""
    process = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--use-file-for-fake-audio-capture={fake_microphone}%noloop", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=(profile.parent / "chromium.log").open("wb"), start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its debugging port and path here once it listens
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(lines := port_file.read_text().split()) == 2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start; see {profile.parent / 'chromium.log'}")
            time.sleep(0.1)
        with connect(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_size=None, open_timeout=30) as socket:
            devtools = DevTools(socket)
            target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
            page = Page(devtools, devtools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])
            page.call("Emulation.setDeviceMetricsOverride", **VIEWPORT, deviceScaleFactor=1, mobile=False)
            page.call("Runtime.enable")
            yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the browser and its renderer, GPU and audio processes
        process.wait(10)


def test_page_and_its_files_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, media_type in [("app.js", "text/javascript"), ("pipeline.js", "text/javascript"),
                             ("pcm-worklet.js", "text/javascript"), ("style.css", "text/css")]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type), name
        assert response.headers["cache-control"] == "no-cache"
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    for missing in ["/static/nothing.js", "/static/..%2Froutes%2Fpage.py", "/static/%2E%2E%2Fmain.py"]:
        response = client.get(missing)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", missing
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
@pytest.mark.timeout(180)
def test_page_transcribes_a_microphone_and_shows_the_pipeline(server: Server, tmp_path: Path) -> None:
    silence = np.zeros(16000, np.float32)
    # a second of silence before JFK and 2.5 s after him, so that his last sentence ends at an endpoint
    audio = np.concatenate([silence, decode_audio(JFK.read_bytes(), 60), silence, silence, silence[:8000]])
    fake_microphone = tmp_path / "jfk.wav"
    fake_microphone.write_bytes(wav_bytes(audio))
    (profile := tmp_path / "profile").mkdir()
    all_sent = f"{CLOCK_S} >= {len(audio) // 16000}"
    model = httpx.get(f"{server.url}/readyz", timeout=10).json()["default_model"]

    with chromium(profile, fake_microphone) as page:
        page.call("Page.navigate", url=f"{server.url}/")
        rows = page.wait_for(f"document.querySelectorAll('#stages tbody tr').length === 4 && {STAGE_ROWS}", 20,
                             "the pipeline panel")
        page.evaluate(RECORD_TRANSCRIPT)
        page.evaluate("document.getElementById('start').click()")
        page.wait_for("document.getElementById('status').dataset.kind === 'live'", 20, "the stream's ready event")
        session = page.evaluate("document.getElementById('session').textContent")
        # the artifact shows the page at work: two finals, the third utterance's partial, the panel busy
        page.wait_for(f"{all_sent} || ({PARTIAL} && {FINALS}.length >= 2)", 45, "a partial after two finals")
        live = page.screenshot() if page.evaluate(PARTIAL) else None
        page.wait_for(all_sent, 45, "the whole file recorded and sent")
        page.evaluate("document.getElementById('stop').click()")  # finalize, close: the last final comes at the latest now
        page.wait_for(f"{STATUS}.startsWith('Stopped')", 20, "the stream's close")
        stopped = page.screenshot()
        (tmp_path / "browser-stopped.png").write_bytes(stopped)
        if live is not None:
            (tmp_path / "browser-live.png").write_bytes(live)
        SCREENSHOT.write_bytes(live or stopped)  # without a partial at that moment (a loaded machine), the stopped page

        finals, seen, status = page.evaluate(FINALS), page.evaluate("window.transcriptSeen"), page.evaluate(STATUS)
        errors = page.script_errors()

    assert [row["stage"] for row in rows] == STAGES
    assert all(int(row["workers"].split()[0]) >= 1 for row in rows), rows
    assert session.startswith(f"model {model} · session "), session
    transcript = " ".join(finals).lower()
    assert "fellow americans" in transcript and "your country" in transcript, finals
    assert len(finals) >= 2, finals  # JFK's pauses end utterances: one line each
    # the page showed a partial, and later that utterance's final (under load the server sends fewer partials)
    assert any(state["partial"] and state["finals"] < len(finals) for state in seen), seen
    assert status.startswith(f"Stopped: {len(finals)} utterances from 0:1"), status  # 14 s and a bit were sent
    assert not errors, errors
