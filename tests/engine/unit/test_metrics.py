"""The worker's metric tallies, flushed once per tick, equal what prometheus-client counts per call.

:class:`engine.metrics.RouteMetrics` buckets handler durations itself and adds them to the histogram
in one go (``_add_to_histogram``); every test here compares against a reference fed the public way
(``Histogram.observe``, ``Counter.inc``). Each test uses its own service name, so the process-wide
metrics never mix tests.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.metrics import MetricWrapperBase

from engine.cli import build_parser, load
from engine.metrics import HANDLER_BUCKETS_S, HANDLER_DURATION, RouteMetrics, prepare_multiprocess_dir
from tests.support import REPO_ROOT

ROUTE = "Ping"
# Every bucket bound exactly, the float just below and just above it, zero and beyond the last bound.
DURATIONS = [0.0, *HANDLER_BUCKETS_S, *(math.nextafter(b, 0) for b in HANDLER_BUCKETS_S),
             *(math.nextafter(b, math.inf) for b in HANDLER_BUCKETS_S), 0.0123, 3.3, 31.0, 120.0]


def service() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


def histogram(metric: MetricWrapperBase, **labels: str) -> dict[str, float]:
    """``{"_bucket le=0.001": cumulative count, "_count": n, "_sum": s}`` of one labelled histogram."""
    out = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created") or any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            key = sample.name.removeprefix(family.name)
            out[f"{key} le={sample.labels['le']}" if "le" in sample.labels else key] = sample.value
    return out


def reference(values: list[float]) -> dict[str, float]:
    ref = Histogram("reference_seconds", "observe per value", ["service", "route"], buckets=HANDLER_BUCKETS_S,
                    registry=CollectorRegistry())
    for value in values:
        ref.labels("ref", ROUTE).observe(value)
    return histogram(ref)


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_one_flush_equals_observe_per_value_on_and_around_every_bound() -> None:
    svc = service()
    tallies = RouteMetrics(svc, [ROUTE])
    for seconds in DURATIONS:
        tallies.duration(ROUTE, seconds)
    tallies.flush(0, {})

    flushed = histogram(HANDLER_DURATION, service=svc, route=ROUTE)
    expected = reference(DURATIONS)
    assert flushed == expected  # every bucket, the count and the sum (same additions in the same order)
    assert expected["_bucket le=+Inf"] == expected["_count"] == len(DURATIONS)


def test_durations_over_several_flushes_add_up_once() -> None:
    svc = service()
    tallies = RouteMetrics(svc, [ROUTE, "Other"])
    batches = [DURATIONS[:17], DURATIONS[17:], [0.25, 0.25, 10.0]]
    for batch in batches:
        for seconds in batch:
            tallies.duration(ROUTE, seconds)
        tallies.flush(0, {})
    tallies.flush(0, {})  # a tick with nothing new adds nothing

    flushed = histogram(HANDLER_DURATION, service=svc, route=ROUTE)
    expected = reference([s for batch in batches for s in batch])
    assert flushed.pop("_sum") == pytest.approx(expected.pop("_sum"), rel=1e-12)
    assert flushed == expected
    assert histogram(HANDLER_DURATION, service=svc, route="Other").get("_count", 0) == 0  # routes kept apart


def test_outcomes_in_flight_and_breakers_are_flushed_once_per_tick() -> None:
    svc = service()
    tallies = RouteMetrics(svc, [ROUTE], ["gateway"])
    assert value("jetpool_dead_lettered_total", service=svc, route=ROUTE) == 0  # exported before any failure
    assert value("jetpool_events_handled_total", service=svc, route=ROUTE, outcome="ack") == 0
    assert value("jetpool_breaker_state", service=svc, breaker="gateway") == 0

    assert value("jetpool_redeliveries_total", service=svc) == 0
    for outcome in ("ack", "ack", "retry", "ack"):
        tallies.outcome(ROUTE, outcome)
    for _ in range(5):
        tallies.acked(ROUTE)  # the consumer's hot path
    tallies.acked("Unrouted")  # counted under "-", never as a label value of its own
    tallies.redelivered += 2
    tallies.flush(3, {"gateway": "open"})
    tallies.flush(2, {"gateway": "open"})
    assert value("jetpool_redeliveries_total", service=svc) == 2
    assert value("jetpool_events_handled_total", service=svc, route=ROUTE, outcome="ack") == 8
    assert value("jetpool_events_handled_total", service=svc, route="-", outcome="ack") == 1
    assert value("jetpool_events_handled_total", service=svc, route="Unrouted", outcome="ack") is None
    assert value("jetpool_events_handled_total", service=svc, route=ROUTE, outcome="retry") == 1
    assert value("jetpool_in_flight", service=svc) == 2
    assert value("jetpool_breaker_state", service=svc, breaker="gateway") == 2

    tallies.flush(0, {"gateway": "half-open"})
    assert value("jetpool_breaker_state", service=svc, breaker="gateway") == 1
    tallies.flush(0, {"gateway": "closed"})
    assert value("jetpool_breaker_state", service=svc, breaker="gateway") == 0
    assert value("jetpool_in_flight", service=svc) == 0


def test_a_given_multiprocess_dir_is_emptied_and_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first: monkeypatch then restores the variable as it was (absent) after prepare_multiprocess_dir
    # sets it, instead of leaving it to the next test of this process (and to the engines it starts).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1234.db").write_bytes(b"left by an earlier run")

    assert prepare_multiprocess_dir(str(directory)) == directory
    assert list(directory.iterdir()) == []
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)


def _prepare_in_a_process(env: dict[str, str]) -> Path:
    code = "from engine.metrics import prepare_multiprocess_dir; print(prepare_multiprocess_dir())"
    env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=60, check=True)
    return Path(done.stdout.strip())


def test_the_temporary_multiprocess_dir_goes_when_the_supervisor_exits(tmp_path: Path) -> None:
    made = _prepare_in_a_process({})
    assert made.name.startswith("jetpool-metrics-")
    assert not made.exists()  # not left behind in /tmp, one per run

    given = tmp_path / "given"
    assert _prepare_in_a_process({"PROMETHEUS_MULTIPROC_DIR": str(given)}) == given
    assert given.is_dir()  # a directory the operator chose is emptied, never removed


@pytest.mark.parametrize(("env", "flags", "port"), [
    ({}, [], 8080),
    ({"JETPOOL_HTTP_PORT": "9464"}, [], 9464),
    ({"JETPOOL_HTTP_PORT": "9464"}, ["--http-port", "9100"], 9100),
    ({}, ["--http-port", "0"], 0),
], ids=["default", "env", "flag-wins", "flag-free-port"])
def test_metrics_port_default_env_and_flag(env: dict[str, str], flags: list[str], port: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("JETPOOL")]:
        monkeypatch.delenv(name)
    for name, text in env.items():
        monkeypatch.setenv(name, text)
    args = build_parser().parse_args(["run", "-c", str(REPO_ROOT / "config" / "example.yaml"), *flags])
    cfg = load(args)
    assert cfg.http.port == port
    assert cfg.http.enabled
