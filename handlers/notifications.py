"""Notifications: tell the customer how their order ended (simulated sender).

Stateless: the answer depends on the input alone, so a redelivered event gets the same
NotificationSent (same output id, deduplicated by JetStream). The input event's id is the
idempotency key a real sender (an email or SMS provider) would be given so it never sends twice.

Settings: ``send_latency_ms`` (0) simulates the provider's response time.
"""

from __future__ import annotations

import asyncio

from engine import Context, Event
from handlers.saga import NOTIFICATION_SENT, ORDER_CONFIRMED, Order

TEMPLATES = {ORDER_CONFIRMED: "order_confirmed"}


async def notify(event: Event, ctx: Context) -> Event:
    """OrderConfirmed | OrderCancelled → NotificationSent."""
    order = Order.from_event(event)
    template = TEMPLATES.get(event.type, "order_cancelled")
    latency_s = float(ctx.settings.get("send_latency_ms", 0)) / 1000
    if latency_s > 0:
        await asyncio.sleep(latency_s)
    return Event(type=NOTIFICATION_SENT, aggregate_id=order.order_id, data={
        "order_id": order.order_id, "customer_id": order.customer_id, "channel": "email",
        "template": template, "idempotency_key": event.id,
    })
