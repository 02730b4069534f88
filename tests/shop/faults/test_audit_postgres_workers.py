"""Two audit worker processes write into one PostgreSQL; one is SIGKILLed mid-run; every event is stored once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import yaml

from engine.embedded import EmbeddedServer
from engine.events import Event
from handlers.database import DATABASE_URL_ENV
from handlers.saga import Order
from tests.shop_support import order_placed, write_shop_config
from tests.support import App, Engine, publish, settled, wait_for


def stored_ids(dsn: str) -> list[str]:
    async def go() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return [r[0] for r in await conn.fetch("SELECT event_id FROM audit.events")]
        finally:
            await conn.close()

    return asyncio.run(go())


def orders(count: int, tag: str) -> list[Event]:
    events: list[Event] = []
    for i in range(count):
        placed = order_placed(order_id=f"{tag}-{i}")
        order = Order.from_event(placed)
        events += [placed, order.event("PaymentAuthorized", charge_id=f"ch_{i}"), order.event("OrderConfirmed")]
    return events


def audit_only_config(tmp_path: Path, url: str) -> App:
    """The shop's config, its audit service on two workers writing to the shop's PostgreSQL."""
    app = write_shop_config(tmp_path, url, workers={"audit": 2})
    audit = app.raw["services"]["audit"]
    audit["settings"].pop("db_path", None)
    audit.update(ack_wait_s=2, batch=64, max_in_flight=256)  # the killed worker's deliveries come back soon
    app.path.write_text(yaml.safe_dump(app.raw, sort_keys=False))
    return app


def test_two_audit_workers_one_killed_store_every_event_exactly_once(
        tmp_path: Path, nats_server: EmbeddedServer, shop_dsn: str, engine: Callable[..., Engine]) -> None:
    app = audit_only_config(tmp_path, nats_server.url)
    run = engine(app, env={DATABASE_URL_ENV: shop_dsn}, args=["--service", "audit"], workers=2)
    first, second = orders(500, "first"), orders(500, "second")
    publish(app, first)
    wait_for(lambda: len(stored_ids(shop_dsn)) >= 100, 60, "the first audit rows", detail=run.tail)
    victim = run.worker_pids()[("audit", 0)]
    os.kill(victim, signal.SIGKILL)  # with deliveries in flight: they are redelivered to the others
    stored_at_kill = len(stored_ids(shop_dsn))
    publish(app, second)

    expected = {e.id for e in first + second}
    wait_for(lambda: len(stored_ids(shop_dsn)) >= len(expected), 90, "every event stored", detail=run.tail)
    wait_for(lambda: settled(app, "audit"), 60, "the audit consumer to settle", detail=run.tail)
    ids = stored_ids(shop_dsn)
    assert stored_at_kill < len(expected)  # the kill came mid-run
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    exits = run.records("worker.exited")
    assert [(e["pid"], e["code"]) for e in exits] == [(victim, -signal.SIGKILL)]
    wait_for(lambda: run.worker_pids()[("audit", 0)] != victim, 30, "the killed worker's replacement",
             detail=run.tail)
