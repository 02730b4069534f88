"""Metrics, health and readiness of a real engine process tree, scraped over HTTP."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable

import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.embedded import EmbeddedServer
from engine.metrics import EXPORTED_METRICS
from tests.support import HANDLERS, App, Engine, count, pings, publish, wait_for
from tests.unit.test_dashboard import promtool

StartEngine = Callable[..., Engine]


def with_http(app: App) -> App:
    raw = {**app.raw, "http": {"port": 0, "host": "127.0.0.1"}}
    app.path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dataclasses.replace(app, raw=raw)


def port_of(run: Engine) -> int:
    record = wait_for(lambda: run.records("http.started"), 30, "the HTTP endpoint", detail=run.tail)
    return int(record[0]["port"])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples(text).items() if n == name and all((k, w) in ls for k, w in labels.items()))


def test_one_aggregated_metrics_endpoint_for_all_workers(make_config: Callable[..., App],
                                                         engine: StartEngine) -> None:
    app = with_http(make_config({"echo": {"workers": 2}}))
    run = engine(app)
    port = port_of(run)
    publish(app, pings(200))
    wait_for(lambda: count(app, "Pong") >= 200, 60, "200 Pongs", detail=run.tail)

    def handled() -> str | None:
        text = get(port, "/metrics")[1]
        return text if total(text, "jetpool_events_handled_total", outcome="ack") == 200 else None

    text = wait_for(handled, 30, "200 acked events in /metrics")
    families = {f.name for f in text_string_to_metric_families(text)}
    # prometheus_client's parser names counters without _total; histograms by their base name.
    # (the shop's payment histogram and breaker_state, for services with breakers, are checked elsewhere)
    names = {n.removesuffix("_total") for n in EXPORTED_METRICS
             if not n.startswith("payment_") and n != "jetpool_breaker_state"}
    assert names <= {f.removesuffix("_total") for f in families}, names - families
    assert total(text, "jetpool_handler_duration_seconds_count", service="echo", route="Ping") == 200
    # Both workers contributed to the one endpoint.
    pids = {r["pid"] for r in run.records("worker.started")}
    assert len(pids) == 2
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # A killed worker is restarted and counted; counters of the dead process stay in the total.
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(run.records("worker.started")) >= 3, 60, "the restarted worker", detail=run.tail)

    def restarted() -> str | None:
        body = get(port, "/metrics")[1]
        return body if total(body, "jetpool_worker_restarts_total", service="echo") == 1 else None

    text = wait_for(restarted, 30, "the restart counted in /metrics")
    assert total(text, "jetpool_events_handled_total", outcome="ack") == 200
    wait_for(lambda: total(get(port, "/metrics")[1], "jetpool_consumer_pending", service="echo") == 0 and
             total(get(port, "/metrics")[1], "jetpool_workers_ready", service="echo") == 2, 30,
             "lag and readiness gauges")


def test_health_and_ready_follow_the_workers(make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_http(make_config({"echo": {"routes": {"Ping": f"{HANDLERS}:slow_echo"}, "drain_timeout_s": 8}}))
    run = engine(app)
    port = port_of(run)
    wait_for(lambda: get(port, "/ready")[0] == 200, 30, "/ready 200")
    status, body = get(port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"

    worker = run.worker_pids()[("echo", 0)]
    os.kill(worker, signal.SIGSTOP)  # a stuck worker: its event loop no longer beats
    try:
        wait_for(lambda: get(port, "/health")[0] == 503, 30, "/health 503 for a stuck worker")
        assert get(port, "/ready")[0] == 503
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: get(port, "/health")[0] == 200, 30, "/health back to 200")
    wait_for(lambda: get(port, "/ready")[0] == 200, 30, "/ready back to 200")

    publish(app, pings(5, sleep_s=5))  # work in flight, so the drain takes a while
    wait_for(lambda: run.records("worker.started") and get(port, "/metrics")[0] == 200, 10, "metrics")
    wait_for(lambda: _in_flight(port) > 0, 30, "events in flight")
    run.send(signal.SIGTERM)
    status, body = get(port, "/ready")
    assert status == 503 and json.loads(body)["status"] == "not ready"
    assert run.wait_exit(30) == 0


def _in_flight(port: int) -> float:
    return total(get(port, "/metrics")[1], "jetpool_in_flight")


def test_health_fails_when_the_consumer_stops_hearing_the_server(make_config: Callable[..., App],
                                                                 engine: StartEngine,
                                                                 private_server: EmbeddedServer) -> None:
    # A frozen broker keeps the TCP connection open, so nothing looks disconnected: only the missing
    # idle heartbeats of the pending pulls tell the worker that its consumer is deaf.
    app = with_http(make_config({"echo": {"idle_heartbeat_s": 0.5}}, url=private_server.url))
    run = engine(app)
    port = port_of(run)
    wait_for(lambda: get(port, "/health")[0] == 200, 30, "/health 200")
    assert private_server.pid is not None
    os.kill(private_server.pid, signal.SIGSTOP)
    try:
        _, body = wait_for(lambda: (r := get(port, "/health"))[0] == 503 and r, 60,
                                "/health 503 while the broker is frozen", detail=run.tail)
        assert json.loads(body)["workers"][0]["healthy"] is False
        assert run.records("pull.heartbeat_missed")
    finally:
        os.kill(private_server.pid, signal.SIGCONT)
    wait_for(lambda: get(port, "/health")[0] == 200, 60, "/health back to 200 once the broker answers",
             detail=run.tail)
    publish(app, pings(10))
    wait_for(lambda: count(app, "Pong") >= 10, 60, "Pongs after the freeze", detail=run.tail)
