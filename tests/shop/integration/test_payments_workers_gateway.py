"""Two payments workers and two audit workers share one gateway service and one PostgreSQL (the ledger and
the audit trail); one of each is SIGKILLed mid-run. Every placed order ends, the ledger shows no order
charged twice, and the audit trail holds every event of the run once."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import yaml

from engine.embedded import EmbeddedServer
from handlers.database import DATABASE_URL_ENV
from handlers.gateway import GATEWAY_URL_ENV
from handlers.gateway.ledger import double_charges, movements
from tests.shop.gateway_support import gateway_process, ledger_rows
from tests.shop_support import order_placed, seed_stock, write_shop_config
from tests.support import App, Engine, count, publish, read, settled, wait_for

ORDERS = 300
SERVICES = ("orders", "payments", "inventory", "audit")


def shop_config(tmp_path: Path, url: str) -> App:
    """Orders, inventory, two payments and two audit workers (audit on PostgreSQL); the gateway slow enough
    that a kill lands mid-call."""
    app = write_shop_config(tmp_path, url, workers={"payments": 2, "audit": 2},
                            gateway={"latency_ms": 20, "jitter_ms": 20, "failure_rate": 0.05, "decline_rate": 0.1})
    del app.raw["services"]["notifications"]
    app.raw["services"]["audit"]["settings"].pop("db_path")  # the shop's PostgreSQL, from the environment
    for name in ("payments", "audit"):  # the victims' deliveries come back soon
        app.raw["services"][name].update(ack_wait_s=2, batch=32, max_in_flight=64)
    app.path.write_text(yaml.safe_dump(app.raw, sort_keys=False))
    return app


async def _audited(dsn: str, ids: set[str]) -> tuple[int, int]:
    """(rows, distinct event ids) of the audit trail for these orders."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT event_id) FROM audit.events "
                                  "WHERE order_id = ANY($1::text[])", sorted(ids))
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


def test_two_payments_and_two_audit_workers_one_of_each_killed_charge_once_and_audit_everything(
        tmp_path: Path, nats_server: EmbeddedServer, shop_dsn: str, engine: Callable[..., Engine]) -> None:
    app = shop_config(tmp_path, nats_server.url)
    uid = uuid.uuid4().hex[:8]
    sku = f"sku-{uid}"
    asyncio.run(seed_stock(nats_server.url, {sku: 10_000}))
    orders = [order_placed(sku=sku, amount_cents=100 + i, order_id=f"o-{uid}-{i}") for i in range(ORDERS)]
    ids = {o.aggregate_id for o in orders}

    with gateway_process(shop_dsn, app.path, tmp_path / "gateway.log") as gateway:
        run = engine(app, env={GATEWAY_URL_ENV: gateway, DATABASE_URL_ENV: shop_dsn, "JETPOOL_HTTP_PORT": "0"})
        publish(app, orders[: ORDERS // 2])
        wait_for(lambda: len(ledger_rows(shop_dsn, "charges")) >= 40, 60, "the first charges", detail=run.tail)
        victims = [run.worker_pids()[("payments", 1)], run.worker_pids()[("audit", 1)]]
        for victim in victims:  # with gateway calls and audit writes in flight: redelivered
            os.kill(victim, signal.SIGKILL)
        charged_at_kill = len(ledger_rows(shop_dsn, "charges"))
        publish(app, orders[ORDERS // 2:])

        def ended() -> bool:
            return count(app, "OrderConfirmed") + count(app, "OrderCancelled") >= ORDERS

        wait_for(ended, 120, f"{ORDERS} orders to end", detail=run.tail)
        wait_for(lambda: all(settled(app, s) for s in SERVICES), 60, "every consumer to settle", detail=run.tail)

    assert charged_at_kill < ORDERS  # the kill came mid-run
    assert sorted((e["pid"], e["code"]) for e in run.records("worker.exited")) == \
        sorted((victim, -signal.SIGKILL) for victim in victims)
    ended_ids = {e.aggregate_id for t in ("OrderConfirmed", "OrderCancelled") for e in read(app, t)}
    assert ended_ids == ids
    assert asyncio.run(double_charges(shop_dsn)) == {}
    moves = asyncio.run(movements(shop_dsn, ids))
    authorized = {e.aggregate_id for e in read(app, "PaymentAuthorized")}
    declined = {e.aggregate_id for e in read(app, "PaymentDeclined")}
    assert authorized | declined == ids and not authorized & declined
    assert {oid for oid, m in moves.items() if m == ["charge"]} == authorized  # charged once each
    assert all(moves[oid] == [] for oid in declined)
    # Every event of the run's orders, as the stream holds them, is in the audit trail exactly once.
    audited_types = app.raw["services"]["audit"]["routes"]
    stored = {e.id for t in audited_types for e in read(app, t) if e.aggregate_id in ids}
    wait_for(lambda: asyncio.run(_audited(shop_dsn, ids)) == (len(stored), len(stored)), 30,
             f"{len(stored)} events audited once each", detail=run.tail)
