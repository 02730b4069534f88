"""Inventory's merged sku writes: many orders of one sku share compare-and-sets, and nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from engine import Event
from engine.merge import merged
from engine.state import Conflict, MemoryState
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


class LaggingReads(MemoryState):
    """Reads of reservations answered by a replica that has not applied the latest writes yet (a direct
    get served by a follower of a replicated bucket): absent for ``lag`` more reads."""

    lag = 0

    async def get(self, key: str) -> tuple[dict[str, object] | None, int]:
        if self.lag and key.startswith("reservation."):
            self.lag -= 1
            return None, 0
        return await super().get(key)


def test_a_decision_that_cannot_be_read_yet_is_not_taken_for_ours() -> None:
    # A duplicate of a reserved order (another event id: a re-publish JetStream did not deduplicate)
    # claims again and loses the creation of the decision; if the winner's record reads as absent, the
    # duplicate must not confirm its own claim: that would keep the order's stock taken twice.
    store = LaggingReads()
    asyncio.run(inventory.seed(store, {"sku-1": 5}))
    authorized = Order.from_event(order_placed(sku="sku-1", qty=2)).event("PaymentAuthorized", charge_id="c")
    duplicate = Order.from_event(authorized).event("PaymentAuthorized", charge_id="c")

    async def run() -> None:
        assert (await inventory.reserve(authorized, context("inventory", {"state:stock": store}))).type \
            == "StockReserved"
        store.lag = 1
        with contextlib.suppress(Conflict):  # failing the delivery is fine: its redelivery settles the claim
            await inventory.reserve(duplicate, context("inventory", {"state:stock": store}))
        out = await inventory.reserve(duplicate, context("inventory", {"state:stock": store}, attempt=2))
        assert out.type == "StockReserved"

    asyncio.run(run())
    stock, _ = asyncio.run(store.get(inventory.sku_key("sku-1")))
    assert stock == {"available": 3, "reserved": 2, "pending": {}}
