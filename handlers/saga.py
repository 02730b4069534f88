"""The shop's event vocabulary: event types, who produces them, and the order every event carries.

The saga, one order at a time::

    OrderPlaced ─► payments ─► PaymentAuthorized ─► inventory ─► StockReserved ─► orders ─► OrderConfirmed
                          └──► PaymentDeclined ─► orders ─► OrderCancelled   └──► OutOfStock ─► payments
                                                                                    ─► PaymentRefunded ─► orders
                                                                                    ─► OrderCancelled
    OrderConfirmed | OrderCancelled ─► notifications ─► NotificationSent;   every event ─► audit

Every event of the saga carries the order's line (id, customer, sku, quantity, amount), so each
service can act on the event alone, whatever order the events reach it in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine import Event, Reject

ORDER_PLACED = "OrderPlaced"
PAYMENT_AUTHORIZED = "PaymentAuthorized"
PAYMENT_DECLINED = "PaymentDeclined"
STOCK_RESERVED = "StockReserved"
OUT_OF_STOCK = "OutOfStock"
PAYMENT_REFUNDED = "PaymentRefunded"
ORDER_CONFIRMED = "OrderConfirmed"
ORDER_CANCELLED = "OrderCancelled"
NOTIFICATION_SENT = "NotificationSent"

# Which service publishes each event type (the storefront is whoever places orders).
PRODUCERS = {
    ORDER_PLACED: "storefront",
    PAYMENT_AUTHORIZED: "payments",
    PAYMENT_DECLINED: "payments",
    PAYMENT_REFUNDED: "payments",
    STOCK_RESERVED: "inventory",
    OUT_OF_STOCK: "inventory",
    ORDER_CONFIRMED: "orders",
    ORDER_CANCELLED: "orders",
    NOTIFICATION_SENT: "notifications",
}
TERMINAL = (ORDER_CONFIRMED, ORDER_CANCELLED)

# Ids become KV keys (``[-/_=.a-zA-Z0-9]+``); dots and slashes are kept out so a key stays one token.
_ID = re.compile(r"^[-_=A-Za-z0-9]{1,128}$")


@dataclass(frozen=True, slots=True)
class Order:
    """The order line every saga event carries.

    Attributes:
        order_id: the order (also every event's ``aggregate_id``).
        customer_id: who placed it.
        sku: the product.
        qty: how many.
        amount_cents: what the customer pays.
    """

    order_id: str
    customer_id: str
    sku: str
    qty: int
    amount_cents: int

    @classmethod
    def from_event(cls, event: Event) -> Order:
        """Read the order from an event's data; a malformed order is rejected (never retried)."""
        data = event.data
        try:
            order = cls(str(data["order_id"]), str(data["customer_id"]), str(data["sku"]), data["qty"],
                        data["amount_cents"])
        except KeyError as exc:
            raise Reject(f"{event.type} {event.id}: field {exc.args[0]!r} is missing") from None
        problem = order._problem()
        if problem:
            raise Reject(f"{event.type} {event.id}: {problem}")
        return order

    def _problem(self) -> str:
        for name in ("order_id", "sku"):
            if not _ID.match(getattr(self, name)):
                return f"{name} must be 1-128 letters, digits, '-', '_' or '=', got {getattr(self, name)!r}"
        for name in ("qty", "amount_cents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "qty" else 0):
                return f"{name} must be a {'positive' if name == 'qty' else 'non-negative'} integer, got {value!r}"
        return ""

    def data(self, **extra: Any) -> dict[str, Any]:
        """The order line as event data, plus ``extra`` fields."""
        return {"order_id": self.order_id, "customer_id": self.customer_id, "sku": self.sku, "qty": self.qty,
                "amount_cents": self.amount_cents, **extra}

    def event(self, event_type: str, **extra: Any) -> Event:
        """An event of the saga about this order."""
        return Event(type=event_type, data=self.data(**extra), aggregate_id=self.order_id)
