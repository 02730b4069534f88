"""The whole saga in memory, routed by handlers/shop.yaml: shuffled deliveries, duplicates, the invariants.

Payments calls the real gateway service (a thread's event loop, a loopback port, its ledger in the
session's embedded PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine import Context, Event
from engine.config import load_config
from engine.dispatch import Router, build_router
from engine.state import MemoryState
from handlers import SHOP_YAML, inventory
from handlers import gateway as gw
from handlers.gateway.ledger import double_charges
from tests.shop.gateway_support import threaded_gateway
from tests.shop_support import breaker, order_placed


class Bus:
    """Delivers every event to every service that routes its type, in random order, some twice."""

    def __init__(self, tmp_path: Path, seed: int, gateway_url: str) -> None:
        cfg = load_config(SHOP_YAML)
        self.routers: dict[str, Router] = {name: build_router(cfg, name) for name in cfg.services}
        self.rng = random.Random(seed)
        self.buckets = {name: MemoryState() for name in cfg.state}
        gateway_settings = {"url": gateway_url}
        resources: dict[str, Any] = {f"state:{n}": s for n, s in self.buckets.items()}
        resources["breaker:payment_gateway"] = breaker(fail_max=10_000)
        self.contexts = {name: Context(name, 0, "", "", resources, {**cfg.services[name].settings})
                         for name in cfg.services}
        self.contexts["payments"].settings = {"gateway": gateway_settings}
        self.contexts["audit"].settings = {"db_path": str(tmp_path / "audit.sqlite")}
        self.queue: list[tuple[str, Event]] = []
        self.published: dict[str, Event] = {}  # by id: what JetStream would store (deduplicated)

    def publish(self, event: Event) -> None:
        if event.id in self.published:
            return  # the stream's duplicate window drops it
        self.published[event.id] = event
        for service, router in self.routers.items():
            if event.type in router.event_types:
                self.queue.append((service, event))

    async def run(self, duplicate_rate: float) -> None:
        try:
            await self._run(duplicate_rate)
        finally:
            await gw.close_clients()

    async def _run(self, duplicate_rate: float) -> None:
        while self.queue:
            service, event = self.queue.pop(self.rng.randrange(len(self.queue)))
            outputs = await self.routers[service].dispatch(event, self.contexts[service])
            for output in outputs:
                self.publish(output)
            if self.rng.random() < duplicate_rate:  # redelivered (or published twice by a producer)
                self.queue.append((service, event))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_order_ends_once_with_no_double_charge_and_no_oversell(tmp_path: Path, shop_dsn: str,
                                                                     seed: int) -> None:
    with threaded_gateway(shop_dsn, decline_rate=0.1) as url:
        bus = Bus(tmp_path, seed, url)
        stock = {"scarce": 15, "common": 200}
        asyncio.run(inventory.seed(bus.buckets["stock"], stock))
        orders = [order_placed(sku=bus.rng.choice(list(stock)), qty=bus.rng.randint(1, 3)) for _ in range(120)]
        for order in orders:
            bus.publish(order)
        asyncio.run(bus.run(duplicate_rate=0.2))

    by_type = Counter(e.type for e in bus.published.values())
    terminal = Counter(e.aggregate_id for e in bus.published.values()
                       if e.type in ("OrderConfirmed", "OrderCancelled"))
    assert set(terminal) == {o.aggregate_id for o in orders} and set(terminal.values()) == {1}
    assert by_type["NotificationSent"] == len(orders)
    assert by_type["OutOfStock"] == by_type["PaymentRefunded"] > 0
    assert by_type["PaymentDeclined"] > 0
    assert asyncio.run(double_charges(shop_dsn)) == {}
    for sku, initial in stock.items():
        level, _ = asyncio.run(bus.buckets["stock"].get(inventory.sku_key(sku)))
        assert level is not None and level["pending"] == {}
        confirmed_qty = sum(e.data["qty"] for e in bus.published.values()
                            if e.type == "OrderConfirmed" and e.data["sku"] == sku)
        assert level["reserved"] == confirmed_qty <= initial
        assert level["available"] == initial - confirmed_qty
    statuses = Counter(v["status"] for v, _ in bus.buckets["orders"].data.values())
    assert statuses == Counter({"confirmed": by_type["OrderConfirmed"], "cancelled": by_type["OrderCancelled"]})
