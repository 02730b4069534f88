"""Inventory: compare-and-set reservations never oversell, and each order takes stock at most once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from engine import Event
from engine.state import MemoryState, StateStore
from handlers import inventory
from handlers.saga import Order
from tests.shop_support import InterleavedState, context, order_placed


def _authorized(sku: str = "sku-1", qty: int = 1, order_id: str | None = None) -> Event:
    placed = order_placed(sku=sku, qty=qty, order_id=order_id)
    return Order.from_event(placed).event("PaymentAuthorized", charge_id="ch_x")


def _ctx(store: Any) -> Any:
    return context("inventory", {"state:stock": store})


def _sku(store: MemoryState, sku: str) -> dict[str, Any]:
    value, _ = asyncio.run(store.get(inventory.sku_key(sku)))
    assert value is not None
    return value


def _seeded(**levels: int) -> MemoryState:
    store = MemoryState()
    asyncio.run(inventory.seed(store, dict(levels)))
    return store


def test_a_reservation_takes_the_stock_and_confirms() -> None:
    store = _seeded(widget=5)
    out = asyncio.run(inventory.reserve(_authorized("widget", 2), _ctx(store)))
    assert out.type == "StockReserved" and out.data["qty"] == 2
    assert _sku(store, "widget") == {"available": 3, "reserved": 2, "pending": {}}


def test_not_enough_stock_is_out_of_stock_and_takes_nothing() -> None:
    store = _seeded(widget=1)
    out = asyncio.run(inventory.reserve(_authorized("widget", 2), _ctx(store)))
    assert out.type == "OutOfStock"
    assert _sku(store, "widget") == {"available": 1, "reserved": 0, "pending": {}}


def test_an_unknown_sku_is_out_of_stock() -> None:
    out = asyncio.run(inventory.reserve(_authorized("nothing"), _ctx(MemoryState())))
    assert out.type == "OutOfStock"


def test_a_redelivered_reservation_takes_nothing_more_and_answers_the_same() -> None:
    store = _seeded(widget=5)
    event = _authorized("widget", 2)
    first = asyncio.run(inventory.reserve(event, _ctx(store)))
    second = asyncio.run(inventory.reserve(event, _ctx(store)))
    assert (first.type, first.data) == (second.type, second.data)
    assert _sku(store, "widget")["available"] == 3


def test_a_crash_between_claim_and_decision_does_not_take_stock_twice() -> None:
    store = _seeded(widget=5)
    event = _authorized("widget", 2)
    asyncio.run(inventory._claim(store, Order.from_event(event)))  # ... and the worker dies here
    assert _sku(store, "widget")["available"] == 3
    out = asyncio.run(inventory.reserve(event, _ctx(store)))  # the redelivery
    assert out.type == "StockReserved"
    assert _sku(store, "widget") == {"available": 3, "reserved": 2, "pending": {}}


def test_a_duplicate_that_lost_the_decision_gives_its_stock_back() -> None:
    store = _seeded(widget=5)
    event = _authorized("widget", 2)
    order = Order.from_event(event)

    async def race() -> None:
        # Duplicate B read "no reservation yet", then A did all three steps, then B claimed again.
        await inventory.reserve(event, _ctx(store))
        token = await inventory._claim(store, order)
        record = await inventory._decide(store, order, token)
        assert record["token"] != token
        await inventory._settle(store, order, record)

    asyncio.run(race())
    assert _sku(store, "widget") == {"available": 3, "reserved": 2, "pending": {}}


def _reserve_concurrently(views: list[StateStore], events: list[Event]) -> list[Event]:
    async def go() -> list[Event]:
        return list(await asyncio.gather(*(inventory.reserve(e, _ctx(views[i % len(views)]))
                                           for i, e in enumerate(events))))

    return asyncio.run(go())


def test_concurrent_reservations_from_two_processes_never_oversell() -> None:
    shared = _seeded(scarce=10, plenty=1000)
    views: list[StateStore] = [InterleavedState(shared), InterleavedState(shared)]  # two "processes"
    rng = random.Random(3)
    events = [_authorized(rng.choice(["scarce", "plenty"]), rng.randint(1, 3)) for _ in range(60)]
    outs = _reserve_concurrently(views, events)

    for sku in ("scarce", "plenty"):
        wanted = [e for e in events if e.data["sku"] == sku]
        reserved = sum(e.data["qty"] for e, o in zip(events, outs, strict=True)
                       if o.type == "StockReserved" and e.data["sku"] == sku)
        level = _sku(shared, sku)
        assert level["pending"] == {}
        assert level["available"] >= 0
        assert level["reserved"] == reserved
        assert level["available"] + level["reserved"] == (10 if sku == "scarce" else 1000)
        assert len(wanted) > 0
    assert _sku(shared, "scarce")["available"] < 3  # scarce stock was actually contended


def test_concurrent_duplicates_of_one_order_reserve_once() -> None:
    shared = _seeded(widget=10)
    event = _authorized("widget", 3)
    views: list[StateStore] = [InterleavedState(shared) for _ in range(4)]
    outs = _reserve_concurrently(views, [event] * 8)
    assert {o.type for o in outs} == {"StockReserved"}
    assert _sku(shared, "widget") == {"available": 7, "reserved": 3, "pending": {}}
