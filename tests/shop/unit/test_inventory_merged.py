"""Inventory's merged sku writes: many orders of one sku share compare-and-sets, and nothing is left behind."""

from __future__ import annotations

import asyncio
from collections import Counter

from engine import Event
from engine.merge import merged
from engine.state import MemoryState
from handlers import inventory
from handlers.saga import Order
from tests.shop_support import context, order_placed


class CountingState(MemoryState):
    """A MemoryState that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[str] = Counter()

    def _write(self, key: str, value: dict[str, object]) -> int:
        self.writes[key] += 1
        return super()._write(key, value)


def _reserve_all(store: MemoryState, events: list[Event]) -> list[str]:
    async def run() -> list[str]:
        ctx = context("inventory", {"state:stock": store})
        return [out.type for out in await asyncio.gather(*(inventory.reserve(e, ctx) for e in events))]

    return asyncio.run(run())


def test_many_distinct_skus_leave_nothing_behind() -> None:
    store = MemoryState()
    asyncio.run(inventory.seed(store, {f"sku-{i}": 1 for i in range(0, 2000, 2)}))  # half of them are unknown
    events = [Order.from_event(order_placed(sku=f"sku-{i}", qty=1)).event("PaymentAuthorized", charge_id="c")
              for i in range(2000)]
    assert Counter(_reserve_all(store, events)) == {"StockReserved": 1000, "OutOfStock": 1000}
    assert len(merged(store)) == 0


def test_orders_of_one_sku_at_once_share_its_writes() -> None:
    store = CountingState()
    asyncio.run(inventory.seed(store, {"hot": 150}))
    store.writes.clear()
    events = [Order.from_event(order_placed(sku="hot", qty=1)).event("PaymentAuthorized", charge_id="c")
              for _ in range(200)]
    assert Counter(_reserve_all(store, events)) == {"StockReserved": 150, "OutOfStock": 50}
    stock, _ = asyncio.run(store.get(inventory.sku_key("hot")))
    assert stock == {"available": 0, "reserved": 150, "pending": {}}
    # One claim and one settle per order would be 300 writes of the sku; merged, far fewer.
    assert store.writes[inventory.sku_key("hot")] < 20
