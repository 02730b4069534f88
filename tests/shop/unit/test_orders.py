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


def test_stock_reserved_confirms_the_order_with_one_write() -> None:
    store, placed = MemoryState(), order_placed()
    oid = placed.aggregate_id
    [confirmed] = _run(store, _follow(placed, "StockReserved"))
    assert confirmed is not None and confirmed.type == "OrderConfirmed"
    assert confirmed.aggregate_id == oid and confirmed.data["order_id"] == oid
    assert _status(store, oid) == "confirmed"
    assert store.data[oid][1] == 1  # created once, never updated


@pytest.mark.parametrize(("cause", "reason"), [
    ("PaymentDeclined", "payment declined: card declined"),
    ("PaymentRefunded", "out of stock (payment refunded)"),
])
def test_decline_and_refund_cancel_the_order(cause: str, reason: str) -> None:
    store, placed = MemoryState(), order_placed()
    [cancelled] = _run(store, _follow(placed, cause, reason="card declined"))
    assert cancelled is not None and cancelled.type == "OrderCancelled"
    assert cancelled.data["reason"] == reason
    assert _status(store, placed.aggregate_id) == "cancelled"


@pytest.mark.parametrize("early", ["OrderPlaced", "PaymentAuthorized", "OutOfStock"])
def test_an_event_that_cannot_end_an_order_is_rejected(early: str) -> None:
    store, placed = MemoryState(), order_placed()
    with pytest.raises(Reject, match="check the service's routes"):
        _run(store, _follow(placed, early))
    assert store.data == {}


def test_a_redelivered_event_changes_nothing_and_gets_the_same_answer() -> None:
    store, placed = MemoryState(), order_placed()
    reserved = _follow(placed, "StockReserved")
    [first] = _run(store, reserved)
    snapshot = dict(store.data)
    [again] = _run(store, reserved)
    assert store.data == snapshot  # not even a revision moved
    assert again is not None and first is not None
    assert (again.type, again.data) == (first.type, first.data)  # the engine derives the same id


def test_a_second_terminal_event_is_ignored() -> None:
    store, placed = MemoryState(), order_placed()
    _run(store, _follow(placed, "PaymentDeclined", reason="card declined"))
    snapshot = dict(store.data)
    assert _run(store, _follow(placed, "StockReserved")) == [None]
    assert _status(store, placed.aggregate_id) == "cancelled"
    assert store.data == snapshot


def test_two_terminal_events_at_once_end_the_order_once() -> None:
    store, placed = MemoryState(), order_placed()
    declined = _follow(placed, "PaymentDeclined", reason="card declined")
    reserved = _follow(placed, "StockReserved")

    async def both() -> list[Event | None]:
        ctx = context("orders", {"state:orders": store})
        return list(await asyncio.gather(orders.on_event(declined, ctx), orders.on_event(reserved, ctx)))

    outputs = asyncio.run(both())
    assert sum(o is not None for o in outputs) == 1


def test_a_record_of_the_older_version_that_has_not_ended_is_ended() -> None:
    # Before orders kept only endings, it wrote placed/paid records with no terminal; a rolling upgrade
    # meets them.
    store, placed = MemoryState(), order_placed()
    oid = placed.aggregate_id
    asyncio.run(store.create(oid, {"status": "paid", "order": Order.from_event(placed).data(), "applied": ["x"],
                                   "terminal": None}))
    [confirmed] = _run(store, _follow(placed, "StockReserved"))
    assert confirmed is not None and confirmed.type == "OrderConfirmed"
    assert _status(store, oid) == "confirmed"


@pytest.mark.parametrize(("record", "payment", "placed", "expected"), [
    (None, None, False, None),
    (None, None, True, "placed"),
    (None, {"status": "declined"}, True, "placed"),
    (None, {"status": "authorized"}, True, "paid"),
    (None, {"status": "authorized"}, False, "paid"),
    ({"status": "confirmed"}, {"status": "authorized"}, True, "confirmed"),
])
def test_status_reads_the_stage_from_the_records(record: dict[str, str] | None, payment: dict[str, str] | None,
                                                 placed: bool, expected: str | None) -> None:
    assert orders.status(record, payment, placed) == expected


@pytest.mark.parametrize(("data", "problem"), [
    ({"order_id": "o.1", "customer_id": "c", "sku": "s", "qty": 1, "amount_cents": 1}, "order_id must be"),
    ({"order_id": "o1", "customer_id": "c", "sku": "s", "qty": 0, "amount_cents": 1}, "qty must be a positive"),
    ({"order_id": "o1", "customer_id": "c", "sku": "s", "qty": 1}, "'amount_cents' is missing"),
])
def test_a_malformed_order_is_rejected(data: dict[str, object], problem: str) -> None:
    with pytest.raises(Reject, match=problem):
        _run(MemoryState(), Event(type="StockReserved", data=data))


def _previous_release_apply(record: dict[str, object], event_id: str) -> dict[str, object] | None:
    """What a worker of the release before orders kept only endings (8b83694) does with an order's record:
    its first step, ``event.id in record["applied"]``, on every event it routes."""
    applied = record["applied"]
    assert isinstance(applied, list)
    return None if event_id in applied else {**record, "applied": [*applied, event_id]}


def test_an_ending_can_be_read_by_the_previous_release() -> None:
    # In a rolling upgrade, a redelivery of the ending event can reach a pod still on the previous release;
    # a record without "applied" failed it with KeyError until the event was dead-lettered, and its
    # OrderConfirmed was never published if the new pod had died before publishing it.
    store, placed = MemoryState(), order_placed()
    ended = _follow(placed, "StockReserved")
    _run(store, ended)
    record, _ = asyncio.run(store.get(placed.aggregate_id))
    assert record is not None
    assert _previous_release_apply(record, ended.id) is None  # already applied: it re-emits, as it did
