"""The Grafana dashboard shipped with the chart queries only metrics the engine really exports.

The list of metrics is the engine's own (:data:`engine.metrics.EXPORTED_METRICS`), not a copy, so
renaming a metric without updating the dashboard fails here. Where Debian's ``promtool`` is
installed, every query is also parsed by Prometheus itself.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.metrics import EXPORTED_METRICS
from tests.support import REPO_ROOT, promtool

DASHBOARD = REPO_ROOT / "helm" / "jetpool" / "dashboards" / "jetpool.json"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = frozenset({
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "by", "without",
    # binary operators and vector matching
    "and", "or", "unless", "atan2", "bool", "on", "ignoring", "group_left", "group_right", "offset",
    # functions
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time",
    "minute", "month", "predict_linear", "present_over_time", "quantile_over_time", "rate", "resets", "round",
    "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "time",
    "timestamp", "vector", "year", "inf", "nan",
    # Grafana's templating functions
    "label_values", "query_result", "metrics", "label_names",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")  # label matchers, range and subquery brackets
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (``label_values(metric, label)`` counts too)."""
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _LABEL_LIST.sub(r"\1", text)
    text = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in PROMQL_WORDS}


def base_name(metric: str) -> str:
    """A histogram's series name mapped to the histogram's name; other names unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix) and metric[: -len(suffix)] in EXPORTED_METRICS:
            return metric[: -len(suffix)]
    return metric


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, also those nested in collapsed rows."""
    for item in items:
        yield item
        yield from panels(item.get("panels", []))


def queries() -> list[tuple[str, str]]:
    """(where, expression) of every panel target and templating query."""
    dashboard = load()
    out = [(f"panel {p['title']!r} target {t.get('refId')}", t["expr"])
           for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            out.append((f"variable {variable['name']!r}", query["query"] if isinstance(query, dict) else query))
    return out


# ---- the extractor itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (service, le) (rate(a_seconds_bucket{service=~"$service", le!="+Inf"}[$__rate_interval]))',
     {"a_seconds_bucket"}),
    ("count(max by (service) (b_state) == 2) or vector(0)", {"b_state"}),
    ("c_total / on (service) group_left(route) d_total offset 5m", {"c_total", "d_total"}),
    ("label_values(e_total, service)", {"e_total"}),
    ('histogram_quantile(0.99, sum by (le) (rate(f_bucket{x="rate(g)"}[5m:1m])))', {"f_bucket"}),
])
def test_metric_names_are_found_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# ---- the dashboard ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[w for w, _ in queries()])
def test_every_query_reads_only_exported_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = {n for n in names if base_name(n) not in EXPORTED_METRICS}
    assert not unknown, f"{where}: {sorted(unknown)} not exported by the engine (engine.metrics.EXPORTED_METRICS)"


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = {base_name(n) for _, expr in queries() for n in metric_names(expr)}
    assert {"jetpool_events_handled_total", "jetpool_handler_duration_seconds", "jetpool_consumer_pending",
            "jetpool_consumer_ack_pending", "jetpool_dead_lettered_total", "jetpool_breaker_state",
            "jetpool_worker_restarts_total", "payment_process_duration_seconds"} <= used
    quantiles = [expr for _, expr in queries() if "histogram_quantile(" in expr]
    assert any("jetpool_handler_duration_seconds_bucket" in q for q in quantiles)
    assert any("payment_process_duration_seconds_bucket" in q and "0.99" in q for q in quantiles)


def test_panels_use_the_datasource_variable_and_have_unique_ids() -> None:
    dashboard = load()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    all_panels = [p for p in panels(dashboard["panels"]) if p.get("type") != "row"]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for panel in all_panels:
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel["title"]
    assert dashboard["uid"] == "jetpool"


def test_prometheus_parses_every_query(tmp_path: Path) -> None:
    grafana = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$service": ".*"}
    rules = []
    for i, (_, expr) in enumerate(queries()):
        if expr.startswith("label_values("):
            continue
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
