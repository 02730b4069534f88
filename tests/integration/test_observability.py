"""Metrics, health and readiness of a real engine process tree, scraped over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine import Context, Event
from engine.embedded import EmbeddedServer, free_port
from engine.metrics import EXPORTED_METRICS
from handlers.gateway import GATEWAY_URL_ENV
from handlers.payments import STATUSES
from tests.shop.gateway_support import gateway_process, set_faults
from tests.shop_support import order_placed, write_shop_config
from tests.support import HANDLERS, App, Engine, count, pings, publish, publish_raw, wait_for
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

    text = scrape_until(port, lambda t: total(t, "jetpool_events_handled_total", outcome="ack") == 200,
                        "200 acked events in /metrics")
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


async def gated_echo(event: Event, ctx: Context) -> Event:
    """Route target of the lag test (its workers import this module): a Pong once the gate file is gone."""
    gate = Path(str(ctx.settings["gate"]))
    while gate.exists():
        await asyncio.sleep(0.05)
    return Event(type="Pong", data=event.data, aggregate_id=event.aggregate_id)


def lag(port: int) -> tuple[float, float]:
    text = get(port, "/metrics")[1]
    return (total(text, "jetpool_consumer_pending", service="echo"),
            total(text, "jetpool_consumer_ack_pending", service="echo"))


def test_consumer_lag_while_events_wait_then_zero_on_the_flag_port(make_config: Callable[..., App],
                                                                   engine: StartEngine, tmp_path: Path) -> None:
    # The config says port 0 (any free port): the flag must win.
    gate = tmp_path / "gate"
    gate.touch()
    app = make_config({"echo": {"routes": {"Ping": "tests.integration.test_observability:gated_echo"},
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


# ---- the shop's payments: its own histogram, failures, a killed worker's files ------------------


PAYMENT_BUCKETS = {"0.1", "0.3", "1.0", "3.0", "+Inf"}


def scrape_until(port: int, check: Callable[[str], bool], what: str, timeout_s: float = 30.0) -> str:
    """Scrape /metrics until ``check`` accepts the text (the lag gauges are sampled every 5 s)."""

    def attempt() -> str | None:
        text = get(port, "/metrics")[1]
        return text if check(text) else None

    return wait_for(attempt, timeout_s, what, interval_s=0.25)


def assert_valid_exposition(text: str) -> None:
    """Prometheus' own parser accepts the text, and every metric family appears once."""
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def assert_payment_histogram(text: str) -> None:
    family = next(f for f in text_string_to_metric_families(text) if f.name == "payment_process_duration_seconds")
    assert family.type == "histogram"
    assert all("status" in s.labels for s in family.samples)
    for status in {s.labels["status"] for s in family.samples}:
        assert {s.labels["le"] for s in family.samples
                if s.name.endswith("_bucket") and s.labels["status"] == status} == PAYMENT_BUCKETS


def test_shop_payments_metrics_dead_worker_files_and_failure_log(tmp_path: Path, nats_server: EmbeddedServer,
                                                                 shop_dsn: str, engine: StartEngine) -> None:
    """payments alone (handlers/shop.yaml, one worker), with PROMETHEUS_MULTIPROC_DIR chosen by the operator."""
    app = write_shop_config(tmp_path, nats_server.url, gateway={"decline_rate": 0.0}, breaker_reset_s=300)
    with gateway_process(shop_dsn, app.path, tmp_path / "gateway.log") as gateway:
        _payments_metrics(tmp_path, app, gateway, engine)


def _payments_metrics(tmp_path: Path, app: App, gateway: str, engine: StartEngine) -> None:
    metrics_dir = tmp_path / "metrics"
    run = engine(app, args=["--service", "payments", "--http-port", "0"],
                 env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), GATEWAY_URL_ENV: gateway}, workers=1)
    port = port_of(run)
    uid = uuid.uuid4().hex[:8]

    # Before any payment, every known status is already a series (at 0), and so is every restart reason.
    text = scrape_until(port, lambda t: "payment_process_duration_seconds_count" in t, "the payment histogram")
    assert {status: total(text, "payment_process_duration_seconds_count", status=status) for status in STATUSES} == \
        dict.fromkeys(STATUSES, 0)
    assert {s.labels["reason"] for f in text_string_to_metric_families(text) if f.name == "jetpool_worker_restarts"
            for s in f.samples if s.labels.get("service") == "payments"} == {"boot_failed", "killed", "exited"}
    assert_valid_exposition(text)

    # A charge, and a body that is not an event.
    publish(app, [order_placed(order_id=f"o-{uid}-ok")])
    publish_raw(app, app.subject("OrderPlaced"), b"{not json")
    text = scrape_until(port, lambda t: total(t, "jetpool_dead_lettered_total", service="payments") == 1 and
                        total(t, "payment_process_duration_seconds_count", status="authorized") == 1,
                        "the charge timed and the bad event dead-lettered")
    assert_payment_histogram(text)

    # The gateway goes down: the order is retried (redelivered) until the breaker opens, then parked.
    set_faults(gateway, outage=True)
    stuck = order_placed(order_id=f"o-{uid}-outage", customer_id=f"customer-{uid}")
    seq = publish(app, [stuck])[0]["seq"]
    text = scrape_until(port, lambda t: total(t, "jetpool_consumer_redelivered", service="payments") >= 1 and
                        total(t, "jetpool_breaker_state", service="payments", breaker="payment_gateway") == 2,
                        "a redelivered event unacked and the breaker open", timeout_s=60)
    assert total(text, "jetpool_events_handled_total", service="payments", route="OrderPlaced", outcome="retry") >= 1
    assert total(text, "payment_process_duration_seconds_count", status="error") >= 1
    assert total(text, "jetpool_in_flight", service="payments") == 1
    assert_payment_histogram(text)

    failed = [r for r in run.records("event.failed") if r.get("event_id") == stuck.id]
    assert failed, run.tail()
    assert {k: failed[0].get(k) for k in ("service", "worker", "event_type", "aggregate_id", "trace_id",
                                          "stream_seq", "outcome")} == {
        "service": "payments", "worker": 0, "event_type": "OrderPlaced", "aggregate_id": stuck.aggregate_id,
        "trace_id": stuck.trace_id, "stream_seq": seq, "outcome": "retry"}
    assert not {"data", "payload"} & failed[0].keys()
    assert f"customer-{uid}" not in run.log_text()  # no payload anywhere in the log

    # SIGKILL the worker: the restart is counted; its live gauges go, its counters stay.
    victim = run.worker_pids()[("payments", 0)]
    retries = total(text, "jetpool_events_handled_total", service="payments", outcome="retry")
    assert {p.name for p in metrics_dir.glob(f"*_{victim}.db")} >= {
        f"counter_{victim}.db", f"histogram_{victim}.db", f"gauge_livesum_{victim}.db", f"gauge_livemax_{victim}.db"}
    os.kill(victim, signal.SIGKILL)
    run.wait_workers(2)
    text = scrape_until(port, lambda t: total(t, "jetpool_worker_restarts_total", service="payments") == 1,
                        "the restart counted")
    assert sorted(p.name for p in metrics_dir.glob(f"gauge_live*_{victim}.db")) == []
    assert (metrics_dir / f"counter_{victim}.db").exists() and (metrics_dir / f"histogram_{victim}.db").exists()
    # The dead worker's open breaker and parked event no longer show; the new worker's closed breaker does.
    assert total(text, "jetpool_breaker_state", service="payments", breaker="payment_gateway") == 0
    assert total(text, "jetpool_in_flight", service="payments") == 0
    assert total(text, "jetpool_events_handled_total", service="payments", outcome="retry") >= retries > 0
    assert total(text, "payment_process_duration_seconds_count", status="authorized") == 1
    assert_valid_exposition(text)
    assert all("pid" not in s.labels for f in text_string_to_metric_families(text)
               if f.name.startswith(("jetpool_consumer_", "jetpool_workers_ready")) for s in f.samples)
