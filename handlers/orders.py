"""Orders: the order's state machine, ``placed → paid → confirmed | cancelled``, in the ``orders`` bucket.

Events may reach this service in any order (OrderPlaced can be retried while the payment is
already through), so a transition only ever moves *forward* and every event carries the order line
needed to create the record. The record remembers the ids of the events it applied and which event
made it terminal, so a redelivered or duplicated event changes nothing and gets the same answer:
the event that confirmed or cancelled the order gets its OrderConfirmed / OrderCancelled again
(same output id, which JetStream deduplicates), any other gets nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from engine import Context, Event
from engine.state import Value
from handlers.saga import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_PLACED,
    PAYMENT_AUTHORIZED,
    PAYMENT_DECLINED,
    PAYMENT_REFUNDED,
    STOCK_RESERVED,
    Order,
)

log = structlog.get_logger("shop.orders")

PLACED, PAID, CONFIRMED, CANCELLED = "placed", "paid", "confirmed", "cancelled"
_RANK = {PLACED: 0, PAID: 1, CONFIRMED: 2, CANCELLED: 2}

# event type -> (the status it moves the order to, the event a terminal move emits)
TRANSITIONS: dict[str, tuple[str, str | None]] = {
    ORDER_PLACED: (PLACED, None),
    PAYMENT_AUTHORIZED: (PAID, None),
    STOCK_RESERVED: (CONFIRMED, ORDER_CONFIRMED),
    PAYMENT_DECLINED: (CANCELLED, ORDER_CANCELLED),
    PAYMENT_REFUNDED: (CANCELLED, ORDER_CANCELLED),
}


async def on_event(event: Event, ctx: Context) -> Event | None:
    """Apply any saga event to its order; return OrderConfirmed / OrderCancelled on a terminal move."""
    order = Order.from_event(event)
    record = await ctx.state("orders").mutate(order.order_id, _transition(event, order))
    if record is None:
        return None
    terminal = record["terminal"]
    if terminal is not None and terminal["by"] == event.id:
        return order.event(terminal["type"], reason=terminal["reason"])
    if TRANSITIONS[event.type][1] is not None:
        # A second terminal event for one order: the saga never produces it, so say so.
        log.warning("order.late_event", order_id=order.order_id, event_type=event.type, status=record["status"])
    return None


def apply(record: Value | None, event: Event, order: Order) -> Value | None:
    """The next record for ``event``, or None when the record already reflects it.

    Pure (the compare-and-set loop may call it several times): never mutates ``record``.
    """
    target, emits = TRANSITIONS[event.type]
    if record is None:
        record = {"status": PLACED, "order": order.data(), "applied": [], "terminal": None}
    elif event.id in record["applied"]:
        return None
    status = record["status"]
    new: dict[str, Any] = {**record, "applied": [*record["applied"], event.id]}
    if _RANK[target] > _RANK[status]:
        new["status"] = target
        if emits is not None:
            new["terminal"] = {"by": event.id, "type": emits, "reason": _reason(event)}
    return new


def _transition(event: Event, order: Order) -> Callable[[Value | None], Value | None]:
    return lambda record: apply(record, event, order)


def _reason(event: Event) -> str:
    if event.type == PAYMENT_DECLINED:
        return f"payment declined: {event.data.get('reason', 'unknown')}"
    if event.type == PAYMENT_REFUNDED:
        return "out of stock (payment refunded)"
    return ""
