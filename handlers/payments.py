"""Payments: charge an order once through the gateway, refund it when the stock is gone.

Idempotent twice over: the ``payments`` bucket records the outcome per order id, so a redelivered
or duplicated OrderPlaced answers from the record without calling the gateway; and the gateway gets
the order id as idempotency key, so a charge whose record was never written (the worker died, the
response was lost) is replayed by the gateway instead of charged again.

The gateway is its own HTTP service (:mod:`handlers.gateway`); each worker process calls it through
one pooled client session (``settings.gateway``: ``connect_timeout_s``, ``timeout_s``,
``max_connections``; its URL from ``JETPOOL_SHOP_GATEWAY_URL``). Calls go through the
``payment_gateway`` circuit breaker: a timeout, a lost connection or a 5xx propagates (the breaker
counts it, the engine retries with backoff); an open breaker raises ``BreakerOpen``, which the engine
treats as "wait", not as the event's fault. A decline is an answer, not an error; a request the
gateway refuses as malformed is rejected (dead-lettered), since no retry can fix it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Histogram

from engine import Context, Event, Reject
from engine.breaker import BreakerOpen
from engine.state import Conflict, StateStore, Value
from handlers.gateway import GatewayClient, Result, gateway_for
from handlers.saga import PAYMENT_AUTHORIZED, PAYMENT_DECLINED, PAYMENT_REFUNDED, Order

PAYMENT_SECONDS = Histogram(
    "payment_process_duration_seconds",
    "Time spent in payment gateway calls (through the circuit breaker), by outcome.",
    ["status"],
    buckets=(0.1, 0.3, 1, 3),
)
STATUSES = ("authorized", "declined", "refunded", "invalid", "error", "breaker_open")

BREAKER = "payment_gateway"


def setup_metrics(ctx: Context) -> None:
    """The service's ``setup`` hook: every known status is a series from the start (at 0), so a
    dashboard or alert on it has data right after a deploy, not only after the first payment."""
    for status in STATUSES:
        PAYMENT_SECONDS.labels(status=status)


async def charge(event: Event, ctx: Context) -> Event:
    """OrderPlaced → PaymentAuthorized | PaymentDeclined, charging at most once per order."""
    order = Order.from_event(event)
    payments = ctx.state("payments")
    # Read even on a first delivery (unlike inventory's reservation): a duplicate OrderPlaced must not
    # reach the gateway, whose idempotency keys a real card processor forgets after a day or so.
    record, _ = await payments.get(order.order_id)
    if record is None:
        gateway = _gateway(ctx)
        result = await _through_breaker(ctx, gateway.charge, order.order_id, order.amount_cents,
                                        f"charge-{order.order_id}")
        _refuse_invalid(order.order_id, result)
        record = await _create_or_read(payments, order.order_id, {
            "status": result.status, "charge_id": result.reference, "reason": result.reason,
            "amount_cents": order.amount_cents,
        })
    if record["status"] == "declined":
        return order.event(PAYMENT_DECLINED, reason=record["reason"])
    return order.event(PAYMENT_AUTHORIZED, charge_id=record["charge_id"])


async def refund(event: Event, ctx: Context) -> Event:
    """OutOfStock → PaymentRefunded (the saga's compensation), refunding at most once per order."""
    order = Order.from_event(event)
    payments = ctx.state("payments")
    record, _ = await payments.get(order.order_id)
    if record is None or record["status"] == "declined":
        raise Reject(f"order {order.order_id}: no authorized payment to refund")
    if record["status"] != "refunded":
        gateway = _gateway(ctx)
        result = await _through_breaker(ctx, gateway.refund, order.order_id, record["charge_id"],
                                        record["amount_cents"], f"refund-{order.order_id}")
        _refuse_invalid(order.order_id, result)
        record = await payments.mutate(order.order_id, _mark_refunded(result.reference)) or record
    return order.event(PAYMENT_REFUNDED, charge_id=record["charge_id"], refund_id=record["refund_id"])


def _refuse_invalid(order_id: str, result: Result) -> None:
    if result.status == "invalid":
        raise Reject(f"order {order_id}: the payment gateway refused the request: {result.reason}")


def _mark_refunded(refund_id: str) -> Callable[[Value | None], Value | None]:
    def mark(current: Value | None) -> Value | None:
        if current is None or current["status"] == "refunded":
            return None  # a concurrent duplicate got there first: keep its record
        return {**current, "status": "refunded", "refund_id": refund_id}

    return mark


async def _through_breaker(ctx: Context, call: Callable[..., Awaitable[Result]], *args: Any) -> Result:
    """Call the gateway through the breaker and time it (status: the answer, ``error`` or ``breaker_open``)."""
    started = time.perf_counter()
    status = "error"
    try:
        result = await ctx.breaker(BREAKER).call(call, *args)
        status = result.status
        return result
    except BreakerOpen:
        status = "breaker_open"
        raise
    finally:
        PAYMENT_SECONDS.labels(status=status).observe(time.perf_counter() - started)


async def _create_or_read(store: StateStore, key: str, value: Value) -> Value:
    """Write the record unless a concurrent duplicate already did; return the record that won."""
    try:
        await store.create(key, value)
        return value
    except Conflict:
        existing, _ = await store.get(key)
        if existing is None:  # created and deleted in between: nobody else is writing any more
            await store.put(key, value)
            return value
        return existing


def _gateway(ctx: Context) -> GatewayClient:
    settings = ctx.settings.get("gateway", {})
    return gateway_for(settings if isinstance(settings, dict) else {})
