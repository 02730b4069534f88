"""The shop's event topology with pass-through handlers: what the engine and the broker alone cost per order.

    .venv/bin/python -m benchmarks.shop_cpu --floor          # the floor's CPU per order, as shop_cpu reports it

Every service keeps its stream, routes, workers, linger, batch and window from ``handlers/shop.yaml``;
only its handlers change. Each passes an order on as the shop's happy path does — OrderPlaced →
PaymentAuthorized → StockReserved → OrderConfirmed → NotificationSent, audit storing nothing — with no
state, no gateway call and no database. An order so costs what the shop's events cost by themselves:
its 9 deliveries and acks and 5 publishes with their PubAcks, at the shop's pace. What the shop costs on
top of it is its state, its payment path and its audit trail. The shop's invariant checks do not apply
(nothing is charged, reserved or stored), so a floor run does not check them.
"""

from __future__ import annotations

from typing import Any

from engine import Context, Event
from handlers.saga import NOTIFICATION_SENT, ORDER_CONFIRMED, PAYMENT_AUTHORIZED, STOCK_RESERVED, Order

HANDLERS = {"orders": "confirm", "payments": "authorize", "inventory": "reserve", "notifications": "notify",
            "audit": "record"}


async def authorize(event: Event, ctx: Context) -> Event:
    """OrderPlaced → PaymentAuthorized, as if the gateway had authorized it."""
    order = Order.from_event(event)
    return order.event(PAYMENT_AUTHORIZED, charge_id=f"ch_{order.order_id}")


async def reserve(event: Event, ctx: Context) -> Event:
    """PaymentAuthorized → StockReserved, as if the stock were there."""
    return Order.from_event(event).event(STOCK_RESERVED)


async def confirm(event: Event, ctx: Context) -> Event:
    """StockReserved → OrderConfirmed."""
    return Order.from_event(event).event(ORDER_CONFIRMED)


async def notify(event: Event, ctx: Context) -> Event:
    """OrderConfirmed → NotificationSent."""
    order = Order.from_event(event)
    return Event(type=NOTIFICATION_SENT, aggregate_id=order.order_id, data={
        "order_id": order.order_id, "customer_id": order.customer_id, "channel": "email",
        "template": "order_confirmed", "idempotency_key": event.id,
    })


async def record(event: Event, ctx: Context) -> None:
    """Any event → nothing: the audit's delivery and ack, without its row."""


def floor_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The shop's config (as loaded from YAML) with every route on this module's handler for its service,
    and nothing the handlers no longer use: setup hooks, breakers, settings."""
    services = {}
    for name, service in raw["services"].items():
        handler = f"{__name__}:{HANDLERS[name]}"
        kept = {k: v for k, v in service.items() if k not in ("setup", "breakers", "settings")}
        services[name] = {**kept, "routes": {event_type: handler for event_type in service["routes"]}}
    return {**{k: v for k, v in raw.items() if k != "breakers"}, "services": services}
