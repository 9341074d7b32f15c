"""A real Prometheus scrapes a loaded server, and every query of the dashboards and of the Kubernetes rules returns series.

test_dashboard.py checks that the queries name only what the server exports; this runs them. Debian's `prometheus`
scrapes a real server every second, with the target labels the Prometheus Operator gives a pod through the
ServiceMonitor, while REST transcriptions and a WebSocket stream of real speech load it. Each query then goes through
Prometheus's HTTP API as Grafana or prometheus-adapter would send it: Grafana's variables set to every value their
variable queries list and its interval macros to what Grafana derives from the scrape interval, the adapter's templates
filled in for the test's pod. A query without series is a panel saying "No data", or an autoscaler that never moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from app.audio import decode_audio
from loadtest.evalset import DEFAULT_MANIFEST, load_rows
from loadtest.stream import StreamClient
from tests.conftest import JFK, ROOT, Server, free_port, running_server
from tests.test_dashboard import DASHBOARDS, K8S_MANIFESTS, Query, as_promql, dashboard_queries, k8s_queries
from tests.test_stream import ws_url

RESULTS = ROOT / "loadtest" / "results" / "prometheus_queries.txt"
SERVICE_MONITOR = ROOT / "deploy" / "k8s" / "base" / "servicemonitor.yaml"

SCRAPE_INTERVAL_S = 1
# Grafana's macros for a panel over the test's few seconds: $__interval is floored at the data source's scrape
# interval, and $__rate_interval is max($__interval + scrape interval, 4 x scrape interval), four scrapes for rate().
GRAFANA_INTERVALS = {"__interval": f"{SCRAPE_INTERVAL_S}s", "__rate_interval": f"{4 * SCRAPE_INTERVAL_S}s"}
# What Grafana's Prometheus data source escapes in a multi-value variable's values inside a regex matcher.
GRAFANA_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")

# The target labels the Prometheus Operator gives a pod's series (its job is the Service's name, the ServiceMonitor's
# port becomes `endpoint`); the adapter's rules map namespace and pod onto the pods the HPA scales.
NAMESPACE, POD, JOB = "asr", "asr-service-0", "asr-service"
# The adapter's metricsQuery templates for the HPA's per-pod metrics of that pod, as prometheus-adapter fills them in.
ADAPTER_TEMPLATE = re.compile(r"<<\s*\.(\w+)\s*>>")
ADAPTER_VALUES = {"LabelMatchers": f'namespace="{NAMESPACE}",pod=~"{POD}"', "GroupBy": "pod"}

# Room for the allocator to act under the test's load: the encoder and decoder may grow to two workers (on the CPU
# the default is one, so they could only be held) and it looks twice a second, so a pool is resized while
# Prometheus watches, and the dashboard's "Pool resized" annotation (increase over 1m > 0) has a mark to draw.
ALLOCATOR_ROOM = {"model_max_workers": "2", "allocator_interval_s": "0.5"}
REST_ROWS = 4  # LibriSpeech utterances of ../shared/eval, each sent to both transcription endpoints


@pytest.fixture(scope="module")
def loaded_server() -> Iterator[Server]:
    with running_server(**ALLOCATOR_ROOM) as server:
        yield server


def scrape_config(server: Server) -> dict:
    """Prometheus's config: the server scraped as the ServiceMonitor asks, every second. Its honorLabels keeps the
    service's own `endpoint` label over the operator's; without it the REST panels (endpoint=~"/v1/...") go empty."""
    endpoint, = yaml.safe_load(SERVICE_MONITOR.read_text())["spec"]["endpoints"]
    target_labels = {"namespace": NAMESPACE, "pod": POD, "endpoint": endpoint["port"]}
    return {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [{
                "job_name": JOB, "metrics_path": endpoint["path"], "honor_labels": endpoint["honorLabels"],
                "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
                "relabel_configs": [{"target_label": label, "replacement": value} for label, value in target_labels.items()]}]}


@contextlib.contextmanager
def running_prometheus(config: dict, workdir: Path, timeout_s: float = 30) -> Iterator[httpx.Client]:
    """Debian's prometheus with ``config``, on a loopback port; a client of its HTTP API once it is ready."""
    binary = shutil.which("prometheus")
    assert binary, "no prometheus on PATH: apt-get install -y --no-install-recommends prometheus (make test installs it)"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + timeout_s
            while not ready(client):
                assert process.poll() is None and time.monotonic() < deadline, f"prometheus did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def ready(client: httpx.Client) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return client.get("/-/ready").status_code == 200
    return False


def instant(prometheus: httpx.Client, expr: str, at: float) -> list[dict]:
    """The series ``expr`` returns at ``at`` (/api/v1/query; a scalar is one); a query Prometheus refuses fails with its error."""
    answer = prometheus.get("/api/v1/query", params={"query": expr, "time": at}).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('errorType')}: {answer.get('error')}"
    return answer["data"]["result"] if answer["data"]["resultType"] == "vector" else [answer["data"]]


def wait_for_scrape(prometheus: httpx.Client, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not instant(prometheus, f'up{{job="{JOB}"}} == 1', time.time()):
        assert time.monotonic() < deadline, "Prometheus has not scraped the server: " + json.dumps(prometheus.get("/api/v1/targets").json())
        time.sleep(0.2)


async def load(server: Server) -> None:
    """Real speech: LibriSpeech files to both transcription endpoints while JFK streams through /v1/stream at real
    time (its steps give partials), so that histograms and counters have samples and the allocator grows a pool."""
    rows = load_rows(DEFAULT_MANIFEST, sets=["librispeech_test_other_resemblyzer"], limit=REST_ROWS)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        async def transcribe(endpoint: str, audio: Path) -> httpx.Response:
            return await client.post(endpoint, files={"file": (audio.name, audio.read_bytes())})

        stream, *answers = await asyncio.gather(
            StreamClient(ws_url(server), speed=1.0).run_file(decode_audio(JFK.read_bytes(), 60)),
            *(transcribe(endpoint, row.audio) for row in rows for endpoint in ("/v1/transcribe", "/v1/audio/transcriptions")))
    assert [answer.status_code for answer in answers] == [200] * len(answers), [answer.text for answer in answers]
    assert stream.finals and stream.close_code == 1000, stream.to_json()


def grafana_values(values: list[str]) -> str:
    """A multi-value variable's values as Grafana's Prometheus data source writes them into a regex matcher."""
    escaped = [GRAFANA_REGEX_SPECIAL.sub(lambda m: "\\\\" + m[0], value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def dashboard_requests(prometheus: httpx.Client, path: Path, at: float) -> Iterator[tuple[Query, str]]:
    """Every query of the dashboard as Grafana sends it: variables first, in order, each set to all the values its
    query lists (what choosing each value sends); the time range's $__range from the dashboard's default range."""
    dashboard = json.loads(path.read_text())
    values = {**GRAFANA_INTERVALS, "__range": dashboard["time"]["from"].removeprefix("now-")}
    queries = list(dashboard_queries(path))
    for query in (q for q in queries if q.variable):
        expr = as_promql(query.expr, values)
        label, = query.shown
        listed = sorted({series["metric"][label] for series in instant(prometheus, expr, at) if label in series["metric"]})
        values[query.variable] = grafana_values(listed) if listed else "no value listed"
        yield query, expr
    yield from ((query, as_promql(query.expr, values)) for query in queries if not query.variable)


def k8s_requests(prometheus: httpx.Client, at: float) -> Iterator[tuple[Query, str]]:
    """seriesQuery and expr as written; each adapter rule's metricsQuery once per metric its seriesQuery finds."""
    queries = [query for path in K8S_MANIFESTS for query in k8s_queries(path)]
    found: dict[str, list[str]] = {}  # an adapter rule (the place its keys sit under) -> the metric names it serves
    for query in queries:
        rule, key = query.where.rsplit(".", 1)
        if key == "seriesQuery":
            found[rule] = sorted({series["metric"]["__name__"] for series in instant(prometheus, query.expr, at)})
        if key != "metricsQuery":
            yield query, query.expr
    for query in queries:
        rule, key = query.where.rsplit(".", 1)
        if key == "metricsQuery":
            assert found.get(rule), f"{query.where}: its rule's seriesQuery finds no series, so the adapter serves nothing"
            for name in found[rule]:
                expr = ADAPTER_TEMPLATE.sub(lambda m: {"Series": name, **ADAPTER_VALUES}[m[1]], query.expr)
                yield Query(f"{query.where} ({name})", query.expr), expr


def table(rows: list[tuple[Query, str, int]]) -> str:
    width = max(len(query.where) for query, _, _ in rows)
    lines = [f"{'query':<{width}}  series  PromQL as sent"]
    lines += [f"{query.where:<{width}}  {count:>6}  {expr}" for query, expr, count in rows]
    return "\n".join(lines)


def test_every_dashboard_and_adapter_query_returns_series(loaded_server: Server, tmp_path: Path) -> None:
    with running_prometheus(scrape_config(loaded_server), tmp_path) as prometheus:
        wait_for_scrape(prometheus)  # the counters' zeros are in before the load: increase() sees it all
        asyncio.run(load(loaded_server))
        time.sleep(2 * SCRAPE_INTERVAL_S)  # the load's last counts scraped
        at = time.time()
        requests = [*(request for path in DASHBOARDS for request in dashboard_requests(prometheus, path, at)),
                    *k8s_requests(prometheus, at)]
        rows = [(query, expr, len(instant(prometheus, expr, at))) for query, expr in requests]
    report = table(rows)
    print("\n" + report)
    RESULTS.write_text(report + "\n")
    empty = [row for row in rows if row[2] == 0]
    assert not empty, "queries without series:\n" + table(empty)
