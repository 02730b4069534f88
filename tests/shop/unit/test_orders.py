"""The order state machine: forward-only transitions, terminal events, idempotence under redelivery."""

from __future__ import annotations

import asyncio

import pytest

from engine import Event, Reject
from engine.state import MemoryState
from handlers import orders
from handlers.saga import Order
from tests.shop_support import context, order_placed


def _follow(placed: Event, event_type: str, **extra: object) -> Event:
    order = Order.from_event(placed)
    return order.event(event_type, **extra)


def _run(store: MemoryState, *events: Event) -> list[Event | None]:
    async def go() -> list[Event | None]:
        ctx = context("orders", {"state:orders": store})
        return [await orders.on_event(e, ctx) for e in events]

    return asyncio.run(go())


def _status(store: MemoryState, order_id: str) -> str:
    value, _ = asyncio.run(store.get(order_id))
    assert value is not None
    return str(value["status"])


def test_happy_path_goes_placed_paid_confirmed_and_emits_once() -> None:
    store, placed = MemoryState(), order_placed()
    oid = placed.aggregate_id
    assert _run(store, placed) == [None]
    assert _status(store, oid) == "placed"
    assert _run(store, _follow(placed, "PaymentAuthorized", charge_id="ch_1")) == [None]
    assert _status(store, oid) == "paid"
    [confirmed] = _run(store, _follow(placed, "StockReserved"))
    assert confirmed is not None and confirmed.type == "OrderConfirmed"
    assert confirmed.aggregate_id == oid and confirmed.data["order_id"] == oid
    assert _status(store, oid) == "confirmed"


@pytest.mark.parametrize(("cause", "reason"), [
    ("PaymentDeclined", "payment declined: card declined"),
    ("PaymentRefunded", "out of stock (payment refunded)"),
])
def test_decline_and_refund_cancel_the_order(cause: str, reason: str) -> None:
    store, placed = MemoryState(), order_placed()
    [_, cancelled] = _run(store, placed, _follow(placed, cause, reason="card declined"))
    assert cancelled is not None and cancelled.type == "OrderCancelled"
    assert cancelled.data["reason"] == reason
    assert _status(store, placed.aggregate_id) == "cancelled"


def test_events_in_any_order_end_in_the_same_state() -> None:
    store, placed = MemoryState(), order_placed()
    reserved = _follow(placed, "StockReserved")
    authorized = _follow(placed, "PaymentAuthorized", charge_id="ch_1")
    outputs = _run(store, reserved, placed, authorized)  # the terminal event first
    assert [o.type if o else None for o in outputs] == ["OrderConfirmed", None, None]
    assert _status(store, placed.aggregate_id) == "confirmed"


def test_a_redelivered_event_changes_nothing_and_gets_the_same_answer() -> None:
    store, placed = MemoryState(), order_placed()
    reserved = _follow(placed, "StockReserved")
    first = _run(store, placed, _follow(placed, "PaymentAuthorized", charge_id="c"), reserved)[-1]
    snapshot = dict(store.data)
    again = _run(store, reserved, placed)
    assert store.data == snapshot  # not even a revision moved
    assert again[0] is not None and first is not None
    assert (again[0].type, again[0].data) == (first.type, first.data)
    assert again[1] is None


def test_a_second_terminal_event_is_ignored() -> None:
    store, placed = MemoryState(), order_placed()
    _run(store, placed, _follow(placed, "PaymentDeclined", reason="card declined"))
    assert _run(store, _follow(placed, "StockReserved")) == [None]
    assert _status(store, placed.aggregate_id) == "cancelled"


def test_apply_is_pure() -> None:
    placed = order_placed()
    record = orders.apply(None, placed, Order.from_event(placed))
    assert record is not None
    before = repr(record)
    orders.apply(record, _follow(placed, "StockReserved"), Order.from_event(placed))
    assert repr(record) == before


@pytest.mark.parametrize(("data", "problem"), [
    ({"order_id": "o.1", "customer_id": "c", "sku": "s", "qty": 1, "amount_cents": 1}, "order_id must be"),
    ({"order_id": "o1", "customer_id": "c", "sku": "s", "qty": 0, "amount_cents": 1}, "qty must be a positive"),
    ({"order_id": "o1", "customer_id": "c", "sku": "s", "qty": 1}, "'amount_cents' is missing"),
])
def test_a_malformed_order_is_rejected(data: dict[str, object], problem: str) -> None:
    with pytest.raises(Reject, match=problem):
        _run(MemoryState(), Event(type="OrderPlaced", data=data))
