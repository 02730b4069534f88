"""Orders: end each order exactly once, as ``confirmed`` or ``cancelled``, in the ``orders`` bucket.

The service follows only the three events that can end an order (StockReserved, PaymentDeclined,
PaymentRefunded). The stages before that are already recorded where they happen — the API's request
record (``placed``), the payment record (``paid``) — and :func:`status` reads them from there, so the
order's own record is written once, when it ends, with a single create: a compare-and-set that only
one writer can win. Every event carries the order line, so the record needs no earlier event.

The record says which event ended the order. That event, redelivered or duplicated, gets its
OrderConfirmed / OrderCancelled again (same output id, which JetStream deduplicates); any other
terminal event for an ended order gets nothing, and is logged, since the saga never produces one.
"""

from __future__ import annotations

import structlog

from engine import Context, Event, Reject
from engine.state import StateStore, Value
from handlers.saga import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    PAYMENT_DECLINED,
    PAYMENT_REFUNDED,
    STOCK_RESERVED,
    Order,
)

log = structlog.get_logger("shop.orders")

PLACED, PAID, CONFIRMED, CANCELLED = "placed", "paid", "confirmed", "cancelled"

# event type -> (the status it ends the order with, the event that says so)
ENDINGS: dict[str, tuple[str, str]] = {
    STOCK_RESERVED: (CONFIRMED, ORDER_CONFIRMED),
    PAYMENT_DECLINED: (CANCELLED, ORDER_CANCELLED),
    PAYMENT_REFUNDED: (CANCELLED, ORDER_CANCELLED),
}


async def on_event(event: Event, ctx: Context) -> Event | None:
    """End the order on its first terminal event; return OrderConfirmed / OrderCancelled for that event."""
    if event.type not in ENDINGS:
        raise Reject(f"orders handles {', '.join(ENDINGS)}, not {event.type}: check the service's routes")
    order = Order.from_event(event)
    record = await _end_once(ctx.state("orders"), order.order_id, ending(event, order))
    terminal = record["terminal"]
    if terminal["by"] == event.id:
        return order.event(terminal["type"], reason=terminal["reason"])
    log.warning("order.late_event", order_id=order.order_id, event_type=event.type, status=record["status"],
                ended_by=terminal["by"])
    return None


def ending(event: Event, order: Order) -> Value:
    """The record of ``order`` ended by ``event`` (one of :data:`ENDINGS`)."""
    status, emits = ENDINGS[event.type]
    # "applied": what the previous release's workers read first on every event (a rolling upgrade).
    return {"status": status, "order": order.data(), "applied": [event.id],
            "terminal": {"by": event.id, "type": emits, "reason": _reason(event)}}


def status(record: Value | None, payment: Value | None, placed: bool) -> str | None:
    """The order's status from its records: ended (``record``), ``paid``, ``placed``, or None if unknown."""
    if record is not None:
        return str(record["status"])
    if payment is not None and payment.get("status") in ("authorized", "refunded"):
        return PAID
    return PLACED if placed or payment is not None else None


async def _end_once(store: StateStore, order_id: str, record: Value) -> Value:
    """Create the record unless the order already ended; return the record that stands.

    ``fresh``: the key is expected not to exist, so the compare-and-set starts with the create (the
    common case is that one request) and reads only when it is refused. An ended record is never
    changed; one without an ending (written by a release that also recorded earlier stages) is ended.
    """
    def end(current: Value | None) -> Value | None:
        return record if current is None or current.get("terminal") is None else None

    return await store.mutate(order_id, end, fresh=True) or record


def _reason(event: Event) -> str:
    if event.type == PAYMENT_DECLINED:
        return f"payment declined: {event.data.get('reason', 'unknown')}"
    if event.type == PAYMENT_REFUNDED:
        return "out of stock (payment refunded)"
    return ""
