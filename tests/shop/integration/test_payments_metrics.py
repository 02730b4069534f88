"""The shop's payments on a real engine process tree, scraped over HTTP: its own histogram, failures,
a killed worker's files.

The engine's own metrics, health and readiness: tests/engine/integration/test_observability.py.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from engine.embedded import EmbeddedServer
from handlers.gateway import GATEWAY_URL_ENV
from handlers.payments import STATUSES
from tests.shop.gateway_support import gateway_process, set_faults
from tests.shop_support import order_placed, write_shop_config
from tests.support import (
    App,
    Engine,
    assert_valid_exposition,
    port_of,
    publish,
    publish_raw,
    scrape_until,
    total,
)

StartEngine = Callable[..., Engine]


PAYMENT_BUCKETS = {"0.1", "0.3", "1.0", "3.0", "+Inf"}


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
