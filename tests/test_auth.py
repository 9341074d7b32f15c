"""API keys over HTTP and WebSocket, open operator paths, and CORS (closed unless configured)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from loadtest.stream import open_stream
from tests.conftest import JFK, Server, running_server


@pytest.fixture(scope="module")
def keyed_server():
    with running_server(api_keys="k-one, k-two", cors_origins="https://captions.example") as s:
        yield s


def test_requests_need_a_key_and_operator_paths_stay_open(keyed_server: Server) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js"):  # the page asks for a key itself
            assert client.get(path).status_code == 200, path
        files = {"file": ("jfk.flac", JFK.read_bytes())}
        missing = client.post("/v1/transcribe", files=files)
        wrong = client.post("/v1/transcribe", files=files, headers={"Authorization": "Bearer k-three"})
        right = client.post("/v1/transcribe", files=files, headers={"Authorization": "Bearer k-two"})
        pipeline, models = client.get("/v1/pipeline"), client.get("/v1/models")
    for response in (missing, wrong, pipeline, models):
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"
    assert right.status_code == 200 and "country" in right.json()["text"]


def test_websocket_key_by_query_parameter_or_header(keyed_server: Server) -> None:
    url = keyed_server.url.replace("http://", "ws://") + "/v1/stream"

    async def first_event(target: str) -> str:
        async with open_stream(target) as stream:
            return json.loads(await stream.ws.recv())["type"]

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(first_event(url))
    assert refused.value.response.status_code == 401
    assert asyncio.run(first_event(url + "?api_key=k-one")) == "ready"


def test_cors_only_for_the_configured_origin(keyed_server: Server, server: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    with httpx.Client(timeout=10) as client:
        allowed = client.options(f"{keyed_server.url}/healthz", headers={**preflight, "Origin": "https://captions.example"})
        other = client.options(f"{keyed_server.url}/healthz", headers={**preflight, "Origin": "https://evil.example"})
        default = client.get(f"{server.url}/healthz", headers={"Origin": "https://captions.example"})
    assert allowed.headers.get("access-control-allow-origin") == "https://captions.example"
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in default.headers  # closed unless ASR_CORS_ORIGINS is set
