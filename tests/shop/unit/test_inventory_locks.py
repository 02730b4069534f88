"""Inventory's per-sku locks: changes to one sku take turns, and a sku's lock lives only while in use."""

from __future__ import annotations

import asyncio
from collections import Counter

from engine.state import MemoryState
from handlers import inventory
from handlers.inventory import KeyedLocks
from handlers.saga import Order
from tests.shop_support import context, order_placed


def test_many_distinct_skus_leave_no_lock_behind() -> None:
    store = MemoryState()

    async def run() -> list[str]:
        await inventory.seed(store, {f"sku-{i}": 1 for i in range(0, 2000, 2)})  # half of them are unknown
        events = [Order.from_event(order_placed(sku=f"sku-{i}", qty=1)).event("PaymentAuthorized", charge_id="c")
                  for i in range(2000)]
        ctx = context("inventory", {"state:stock": store})
        return [out.type for out in await asyncio.gather(*(inventory.reserve(e, ctx) for e in events))]

    assert Counter(asyncio.run(run())) == {"StockReserved": 1000, "OutOfStock": 1000}
    assert len(inventory._locks[store]) == 0


def test_one_key_is_held_by_one_task_at_a_time_and_forgotten_after() -> None:
    locks = KeyedLocks()
    inside: Counter[str] = Counter()
    most: Counter[str] = Counter()
    seen_in_use: list[int] = []

    async def change(key: str, pause_s: float) -> None:
        async with locks.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            seen_in_use.append(len(locks))
            await asyncio.sleep(pause_s)
            inside[key] -= 1

    async def run() -> None:
        # Waves that overlap: tasks arrive while others hold the key, wait, and leave, so the lock is
        # released to a waiter while newcomers keep arriving.
        tasks = []
        for wave in range(20):
            tasks += [asyncio.create_task(change(key, 0.001 * (wave % 3))) for key in ("a", "b") for _ in range(5)]
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert most == {"a": 1, "b": 1}
    assert max(seen_in_use) == 2 and len(locks) == 0


def test_a_waiter_cancelled_while_waiting_leaves_no_lock_behind() -> None:
    locks = KeyedLocks()

    async def run() -> None:
        async with locks.hold("a"):
            waiter = asyncio.create_task(locks.hold("a").__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert len(locks) == 1
        assert len(locks) == 0

    asyncio.run(run())
