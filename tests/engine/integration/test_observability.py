"""Metrics, health and readiness of a real engine process tree, scraped over HTTP."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from engine.embedded import EmbeddedServer
from engine.metrics import EXPORTED_METRICS
from engine.ports import free_port
from tests.support import (
    HANDLERS,
    App,
    Engine,
    assert_valid_exposition,
    count,
    get,
    pings,
    port_of,
    publish,
    scrape_until,
    total,
    wait_for,
    with_http,
)

StartEngine = Callable[..., Engine]


def test_one_aggregated_metrics_endpoint_for_all_workers(make_config: Callable[..., App],
                                                         engine: StartEngine) -> None:
    app = with_http(make_config({"echo": {"workers": 2}}))
    run = engine(app)
    port = port_of(run)
    publish(app, pings(200))
    wait_for(lambda: count(app, "Pong") >= 200, 60, "200 Pongs", detail=run.tail)

    text = scrape_until(port, lambda t: total(t, "jetpool_events_handled_total", outcome="ack") == 200,
                        "200 acked events in /metrics")
    families = {f.name for f in text_string_to_metric_families(text)}
    # prometheus_client's parser names counters without _total; histograms by their base name.
    # (the shop's payment histogram and breaker_state: tests/shop/integration/test_payments_metrics.py)
    names = {n.removesuffix("_total") for n in EXPORTED_METRICS
             if not n.startswith("payment_") and n != "jetpool_breaker_state"}
    assert names <= {f.removesuffix("_total") for f in families}, names - families
    assert total(text, "jetpool_handler_duration_seconds_count", service="echo", route="Ping") == 200
    # Both workers contributed to the one endpoint.
    pids = {r["pid"] for r in run.records("worker.started")}
    assert len(pids) == 2
    assert_valid_exposition(text)

    # A killed worker is restarted and counted; counters of the dead process stay in the total.
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(run.records("worker.started")) >= 3, 60, "the restarted worker", detail=run.tail)

    text = scrape_until(port, lambda t: total(t, "jetpool_worker_restarts_total", service="echo") == 1,
                        "the restart counted in /metrics")
    assert total(text, "jetpool_events_handled_total", outcome="ack") == 200
    wait_for(lambda: total(get(port, "/metrics")[1], "jetpool_workers_ready", service="echo") == 2, 30,
             "both workers ready again")


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
    metrics_dir = Path(psutil.Process(worker).environ()["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_dir()
    run.send(signal.SIGTERM)
    status, body = get(port, "/ready")
    assert status == 503 and json.loads(body)["status"] == "not ready"
    assert run.wait_exit(30) == 0
    assert not metrics_dir.exists()  # the temporary directory the supervisor made goes with it


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
        def frozen() -> tuple[int, str] | None:
            response = get(port, "/health")
            return response if response[0] == 503 else None

        _, body = wait_for(frozen, 60, "/health 503 while the broker is frozen", detail=run.tail)
        assert json.loads(body)["workers"][0]["healthy"] is False
        assert run.records("pull.heartbeat_missed")
    finally:
        os.kill(private_server.pid, signal.SIGCONT)
    wait_for(lambda: get(port, "/health")[0] == 200, 60, "/health back to 200 once the broker answers",
             detail=run.tail)
    publish(app, pings(10))
    wait_for(lambda: count(app, "Pong") >= 10, 60, "Pongs after the freeze", detail=run.tail)


# ---- consumer lag, and the port of --http-port ---------------------------------------------------


def lag(port: int) -> tuple[float, float]:
    text = get(port, "/metrics")[1]
    return (total(text, "jetpool_consumer_pending", service="echo"),
            total(text, "jetpool_consumer_ack_pending", service="echo"))


def test_consumer_lag_while_events_wait_then_zero_on_the_flag_port(make_config: Callable[..., App],
                                                                   engine: StartEngine, tmp_path: Path) -> None:
    # The config says port 0 (any free port): the flag must win.
    gate = tmp_path / "gate"
    gate.touch()
    app = make_config({"echo": {"routes": {"Ping": f"{HANDLERS}:gated_echo"},
                                "batch": 4, "max_in_flight": 4, "handler_timeout_s": 120,
                                "settings": {"gate": str(gate)}}})
    port = free_port()
    run = engine(app, args=["--http-port", str(port)])
    assert port_of(run) == port
    assert get(port, "/metrics")[0] == 200

    publish(app, pings(10))
    # The worker holds its window of 4 (ack pending); the other 6 wait in the stream (pending).
    wait_for(lambda: lag(port) == (6, 4), 30, "6 pending and 4 ack-pending in /metrics",
             detail=lambda: f"last: {lag(port)}\n{run.tail()}")
    assert _in_flight(port) == 4

    gate.unlink()
    wait_for(lambda: lag(port) == (0, 0), 30, "the lag back to 0 in /metrics", detail=lambda: f"last: {lag(port)}")
    assert count(app, "Pong") == 10
    assert _in_flight(port) == 0
