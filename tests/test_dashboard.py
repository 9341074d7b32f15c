"""The Grafana dashboards and the Kubernetes metric rules ask only for what the server exports.

A query that names a metric the service does not export, or filters or groups by a label that metric does not
carry, draws an empty panel (or an autoscaler that never moves) and nobody notices. Every PromQL query of
deploy/grafana/*.json (panels, panels inside rows, template variables, annotations) is parsed with promql-parser:
its metric names must be series of the real server's /metrics, and its labels must be labels that metric carries,
read from app.metrics and from the samples, so the check follows the code instead of a list kept here.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import promql_parser as promql
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics
from tests.conftest import ROOT

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
K8S_MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("**/*.y*ml"))

# Prometheus attaches these to every series it scrapes, whatever the service exports.
TARGET_LABELS = frozenset({"instance", "job"})

# The series a family of each type exposes (prometheus_client's text format); other types: the family's name.
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                   "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}
# Labels a series gets from its type rather than from the code.
SUFFIX_LABELS = {("histogram", "_bucket"): {"le"}, ("summary", ""): {"quantile"}}

# Grafana's interval macros become durations; other variables become a word, which parses inside a label matcher
# (a variable anywhere else makes the query fail to parse, naming its panel).
GRAFANA_MACROS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*$", re.S)
SHOWN_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")  # {{label}} in a legend or an annotation's title and text
# Aggregations that pick series rather than merge them, so the series keep their labels.
SELECTING_AGGREGATIONS = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})

# prometheus-adapter rules and alert rules; an adapter's `name.as` is a name it invents, not a series.
K8S_QUERY_KEYS = frozenset({"seriesQuery", "metricsQuery", "expr"})
SERIES_NAME = re.compile(r"\basr_[a-z0-9_]+")


@dataclass(frozen=True)
class Query:
    where: str  # file and panel, variable or annotation: what a failure points at
    expr: str  # PromQL as written, Grafana variables included
    shown: tuple[str, ...] = ()  # labels of the result on display: a legend's {{label}}s, a variable's label_values
    variable: str | None = None  # the template variable whose values the query lists


@dataclass(frozen=True)
class Checked:
    query: Query
    metrics: list[str]
    problems: list[str]


def exported_series(metrics_text: str) -> dict[str, set[str]]:
    """Series name -> the label names it carries, for every series the server exports.

    A labelled metric nobody has observed yet has HELP and TYPE but no samples, so the names come from each family's
    type and the labels from the code's declaration as well as from whatever samples there are.
    """
    declared = {m._name: set(m._labelnames)  # prometheus_client has no public accessor for a metric's label names
                for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)}
    series: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(metrics_text):
        labels = declared.get(family.name, set()) | {name for sample in family.samples for name in sample.labels}
        for suffix in SERIES_SUFFIXES.get(family.type, ("",)):
            series[family.name + suffix] |= labels | SUFFIX_LABELS.get((family.type, suffix), set())
    return dict(series)


def as_promql(expr: str, values: Mapping[str, str] = GRAFANA_MACROS) -> str:
    """Grafana's variables replaced by ``values`` (by default durations for its interval macros), any other by a word,
    which parses inside a label matcher."""
    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, "x")
    return GRAFANA_VARIABLE.sub(value, expr)


def selectors(node: promql.Expr) -> list[tuple[str | None, list[str]]]:
    """(metric name, labels its matchers use) of every vector selector under ``node``."""
    found = []

    def visit(n: promql.Expr) -> None:
        if isinstance(n, promql.VectorSelector):
            matchers = [*n.matchers.matchers, *(m for group in n.matchers.or_matchers for m in group)]
            name = n.name or next((m.value for m in matchers if m.name == "__name__" and m.op == promql.MatchOp.Equal), None)
            found.append((name, [m.name for m in matchers if m.name != "__name__"]))
    promql.walk(node, visit)
    return found


def label_uses(node: promql.Expr) -> list[tuple[str, list[str | None]]]:
    """(label, the metrics it must belong to) for every label a matcher, a by/without or an on/ignoring names."""
    uses: list[tuple[str, list[str | None]]] = []

    def names(n: promql.Expr) -> list[str | None]:
        return [name for name, _ in selectors(n)]

    def visit(n: promql.Expr) -> None:
        if isinstance(n, promql.VectorSelector):
            (name, labels), = selectors(n)
            uses.extend((label, [name]) for label in labels)
        elif isinstance(n, promql.AggregateExpr) and n.modifier is not None:
            uses.extend((label, names(n.expr)) for label in n.modifier.labels)
        elif isinstance(n, promql.BinaryExpr) and n.modifier is not None and n.modifier.matching is not None:
            uses.extend((label, names(n.lhs) + names(n.rhs)) for label in n.modifier.matching.labels)
            one_side = n.rhs if n.modifier.card == promql.VectorMatchCardinality.ManyToOne else n.lhs
            uses.extend((label, names(one_side)) for label in n.modifier.group_labels or [])
    promql.walk(node, visit)
    return uses


def result_labels(node: promql.Expr, series: dict[str, set[str]]) -> set[str] | None:
    """Labels of the series a query returns, what a legend can show; None for a scalar or a string."""
    if isinstance(node, promql.VectorSelector):
        (name, _), = selectors(node)
        return series.get(name, set()) | TARGET_LABELS
    if isinstance(node, promql.MatrixSelector):
        return result_labels(node.vector_selector, series)
    if isinstance(node, (promql.ParenExpr, promql.UnaryExpr, promql.SubqueryExpr)):
        return result_labels(node.expr, series)
    if isinstance(node, promql.Call):  # functions keep the labels of their vector argument (the last one)
        vectors = [labels for labels in (result_labels(arg, series) for arg in node.args) if labels is not None]
        if not vectors:
            return None
        return vectors[-1] - {"le"} if node.func.name == "histogram_quantile" else vectors[-1]
    if isinstance(node, promql.AggregateExpr):
        inner = result_labels(node.expr, series) or set()
        if node.modifier is None:
            return inner if str(node.op) in SELECTING_AGGREGATIONS else set()
        labels = set(node.modifier.labels)
        return labels if node.modifier.type == promql.AggModifierType.By else inner - labels
    if isinstance(node, promql.BinaryExpr):
        lhs, rhs = result_labels(node.lhs, series), result_labels(node.rhs, series)
        if lhs is None or rhs is None:  # with a scalar: the vector's labels
            return rhs if lhs is None else lhs
        modifier = node.modifier
        if modifier is not None and modifier.card == promql.VectorMatchCardinality.ManyToOne:  # group_left
            return lhs | set(modifier.group_labels or [])
        if modifier is not None and modifier.card == promql.VectorMatchCardinality.OneToMany:  # group_right
            return rhs | set(modifier.group_labels or [])
        if str(node.op) in {"and", "unless"}:
            return lhs
        if str(node.op) == "or":
            return lhs | rhs
        matched = lhs & rhs  # one-to-one: both sides carry the same labels, fewer with on()/ignoring()
        if modifier is not None and modifier.matching is not None:
            on = modifier.matching.type == promql.LabelModifierType.Include
            matched = matched & set(modifier.matching.labels) if on else matched - set(modifier.matching.labels)
        return matched
    return None


def check(query: Query, series: dict[str, set[str]]) -> Checked:
    try:
        tree = promql.parse(as_promql(query.expr))
    except ValueError as e:
        return Checked(query, [], [f"does not parse: {e}"])
    metrics = sorted({name or "?" for name, _ in selectors(tree)})
    problems = [f"{name} is not exported" for name in metrics if name not in series]
    if not metrics:
        problems.append("queries no metric")
    for label, owners in label_uses(tree):
        problems += [f"{name} has no label {label!r} (it has {sorted(series[name])})" for name in owners
                     if name in series and label not in series[name] | TARGET_LABELS]
    returned = result_labels(tree, series) or set()
    problems += [f"shows {{{{{label}}}}} but the result has only {sorted(returned)}" for label in query.shown
                 if label not in returned]
    return Checked(query, metrics, list(dict.fromkeys(problems)))  # a label both matched and grouped by: said once


def panels(container: dict) -> Iterator[dict]:
    """Every panel, rows and the panels a collapsed row holds included."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard_queries(path: Path) -> Iterator[Query]:
    dashboard = json.loads(path.read_text())
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield Query(f"{path.name}: panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"],
                        tuple(SHOWN_LABEL.findall(target.get("legendFormat", ""))))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            values_of = LABEL_VALUES.match(text)
            assert values_of and values_of[1], f"{path.name}: variable {variable['name']}: only label_values(metric, label) is checked"
            yield Query(f"{path.name}: variable ${variable['name']}", values_of[1], (values_of[2],), variable["name"])
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            formats = annotation.get("titleFormat", "") + annotation.get("textFormat", "")
            yield Query(f"{path.name}: annotation {annotation['name']!r}", annotation["expr"], tuple(SHOWN_LABEL.findall(formats)))


def k8s_queries(path: Path) -> Iterator[Query]:
    """seriesQuery, metricsQuery and expr strings, also inside a ConfigMap's embedded YAML (the adapter's config)."""
    def strings(node: object, where: str) -> Iterator[Query]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in K8S_QUERY_KEYS and isinstance(value, str):
                    yield Query(f"{where}.{key}", value)
                else:
                    yield from strings(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from strings(item, f"{where}[{i}]")
        elif isinstance(node, str) and any(key + ":" in node for key in K8S_QUERY_KEYS):
            yield from strings(yaml.safe_load(node), where)
    for i, document in enumerate(yaml.safe_load_all(path.read_text())):
        yield from strings(document, f"{path.relative_to(ROOT)}#{i}")


def summary(checked: list[Checked]) -> str:
    width = max(len(c.query.where) for c in checked)
    lines = [f"{'query':<{width}}  metrics -> ok"]
    lines += [f"{c.query.where:<{width}}  {', '.join(c.metrics)} -> {'ok' if not c.problems else '; '.join(c.problems)}"
              for c in checked]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def series(client: httpx.Client) -> dict[str, set[str]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return exported_series(response.text)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_importable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels(dashboard):
        assert panel.get("title"), f"panel {panel['id']} has no title"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        if panel["type"] == "row":
            continue
        # a uid of one Grafana would not resolve in another: panels name the templated data source
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, f"panel {panel['title']!r}"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r}: no query or a repeated refId"


def test_dashboards_query_only_exported_metrics_and_labels(series: dict[str, set[str]]) -> None:
    assert DASHBOARDS, "no dashboard under deploy/grafana/"
    checked = [check(query, series) for path in DASHBOARDS for query in dashboard_queries(path)]
    print("\n" + summary(checked))
    failed = [c for c in checked if c.problems]
    assert not failed, "\n" + summary(failed)


def test_k8s_rules_name_only_exported_metrics(series: dict[str, set[str]]) -> None:
    queries = [query for path in K8S_MANIFESTS for query in k8s_queries(path)]
    assert queries, f"no {sorted(K8S_QUERY_KEYS)} in deploy/k8s/: the adapter rules moved where this test does not look"
    checked = []
    for query in queries:
        names = sorted(set(SERIES_NAME.findall(query.expr)))
        checked.append(Checked(query, names, [f"{name} is not exported" for name in names if name not in series]))
    print("\n" + summary(checked))
    failed = [c for c in checked if c.problems]
    assert not failed, "\n" + summary(failed)


def test_the_check_catches_a_wrong_name_or_label(series: dict[str, set[str]]) -> None:
    def problems(expr: str, *shown: str) -> list[str]:
        return check(Query("test", expr, shown), series).problems

    p95 = ('histogram_quantile(0.95, sum by (le, stage) (rate(asr_stage_latency_seconds_bucket'
           '{stage=~"$stage", instance=~"$instance"}[$__rate_interval])))')
    assert problems(p95, "stage") == [] and problems(p95, "le")  # the quantile merges the buckets
    assert problems("sum(rate(asr_stage_busy_seconds[5m]))") == ["asr_stage_busy_seconds is not exported"]  # no _total
    wrong_labels = problems('sum by (endpoint) (asr_stage_workers{reason="x"})')
    assert len(wrong_labels) == 2 and all("asr_stage_workers has no label" in p for p in wrong_labels)
    assert problems("asr_stage_workers / on (endpoint) asr_stage_queue_depth")  # on() needs the label on both sides
    assert problems("asr_streams_active", "stage") == ["shows {{stage}} but the result has only ['instance', 'job']"]
    assert problems("sum(rate(asr_stage_busy_seconds_total[5m]))", "stage")  # summed away
    assert problems("sum by (stage) (asr_stage_workers) / sum by (stage) (asr_stage_queue_depth) > 0", "stage") == []
    assert problems("sum(rate(foo[5m])") and problems("1 + 1") == ["queries no metric"]
