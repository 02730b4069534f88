"""Payments: one charge per order whatever is redelivered or lost, refunds as compensation, the breaker.

The gateway is the real HTTP service (on a thread's event loop, a random loopback port) over its ledger in
the session's embedded PostgreSQL; the handlers call it through their per-process client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY

from engine import Event, Reject
from engine.breaker import BreakerOpen
from engine.state import MemoryState
from handlers import gateway as gw
from handlers import payments
from handlers.gateway.server import _fraction
from handlers.saga import Order
from tests.shop.gateway_support import ledger_rows, set_faults, threaded_gateway
from tests.shop_support import breaker, context, order_placed

T = TypeVar("T")


class Shop:
    """The payments handlers' world: a state store, a breaker, and the gateway service."""

    def __init__(self, dsn: str, url: str) -> None:
        self.dsn = dsn
        self.url = url
        self.store = MemoryState()
        self.breaker = breaker()
        self.settings = {"gateway": {"url": url, "timeout_s": 5}}

    def ctx(self) -> Any:
        return context("payments", {"state:payments": self.store, "breaker:payment_gateway": self.breaker},
                       self.settings)

    def charge(self, event: Event) -> Event:
        return asyncio.run(self._closing(payments.charge(event, self.ctx())))

    def refund(self, event: Event) -> Event:
        return asyncio.run(self._closing(payments.refund(event, self.ctx())))

    def faults(self, **faults: Any) -> None:
        set_faults(self.url, **faults)

    def movements(self, order_id: str) -> list[tuple[str, int]]:
        charges = [("charge", int(r["amount_cents"])) for r in ledger_rows(self.dsn, "charges")
                   if r["order_id"] == order_id]
        refunds = [("refund", int(r["amount_cents"])) for r in ledger_rows(self.dsn, "refunds")
                   if r["order_id"] == order_id]
        return charges + refunds

    def money_rows(self) -> int:
        return len(ledger_rows(self.dsn, "charges")) + len(ledger_rows(self.dsn, "refunds"))

    @staticmethod
    async def _closing(call: Awaitable[T]) -> T:
        try:
            return await call
        finally:
            await gw.close_clients()  # this loop ends here: its client session with it


@pytest.fixture
def shop(shop_dsn: str) -> Iterator[Shop]:
    with threaded_gateway(shop_dsn) as url:
        yield Shop(shop_dsn, url)


def _out_of_stock(placed: Event) -> Event:
    return Order.from_event(placed).event("OutOfStock")


def test_an_order_is_authorized_and_recorded(shop: Shop) -> None:
    placed = order_placed(amount_cents=2500)
    out = shop.charge(placed)
    assert out.type == "PaymentAuthorized"
    assert out.data["charge_id"].startswith("ch_")
    assert out.data["order_id"] == placed.aggregate_id and out.data["amount_cents"] == 2500
    record, _ = asyncio.run(shop.store.get(placed.aggregate_id))
    assert record is not None and record["status"] == "authorized"
    assert shop.movements(placed.aggregate_id) == [("charge", 2500)]


def test_a_redelivered_order_is_answered_from_the_record(shop: Shop) -> None:
    """Also a duplicate on its first delivery (the context's attempt is 1): the gateway is not relied on
    to remember the idempotency key."""
    placed = order_placed()
    first = shop.charge(placed)
    shop.faults(outage=True)  # the gateway is not even asked
    again = shop.charge(placed)
    assert (again.type, again.data) == (first.type, first.data)
    assert shop.money_rows() == 1


def test_a_lost_record_is_recovered_by_the_gateways_idempotency_key(shop: Shop) -> None:
    placed = order_placed()
    first = shop.charge(placed)
    shop.store.data.clear()  # the worker died after the charge, before the record was written
    again = shop.charge(placed)
    assert again.data == first.data
    assert shop.movements(placed.aggregate_id) == [("charge", placed.data["amount_cents"])]


def test_a_response_lost_after_charging_is_retried_without_charging_twice(shop: Shop) -> None:
    shop.faults(failure_rate=1.0)
    placed = order_placed()
    for _ in range(20):
        with pytest.raises(gw.GatewayError):
            shop.charge(placed)
        shop.breaker = breaker()  # keep the breaker out of this test
    assert shop.movements(placed.aggregate_id) == [("charge", 1999)]  # a failure came after the charge
    shop.faults(failure_rate=0.0)
    assert shop.charge(placed).type == "PaymentAuthorized"
    assert len(shop.movements(placed.aggregate_id)) == 1


def test_concurrent_duplicates_charge_once(shop: Shop) -> None:
    placed = order_placed()

    async def both() -> list[Event]:
        return list(await asyncio.gather(*(payments.charge(placed, shop.ctx()) for _ in range(5))))

    outs = asyncio.run(shop._closing(both()))
    assert len({o.data["charge_id"] for o in outs}) == 1
    assert len(shop.movements(placed.aggregate_id)) == 1


def test_a_declined_payment_is_an_answer_not_a_failure(shop: Shop) -> None:
    shop.faults(max_amount_cents=1000)
    for _ in range(6):  # more than fail_max: declines never open the breaker
        out = shop.charge(order_placed(amount_cents=5000))
        assert out.type == "PaymentDeclined" and out.data["reason"] == "amount over limit"
    assert shop.money_rows() == 0
    assert shop.breaker.state == "closed"


def test_a_request_the_gateway_refuses_is_rejected(shop: Shop) -> None:
    with pytest.raises(Reject, match=r"parameter_invalid_integer.*amount"):  # a processor charges no 0
        shop.charge(order_placed(amount_cents=0))
    assert shop.breaker.state == "closed"


def test_declines_are_stable_per_order() -> None:
    verdicts = {oid: _fraction(oid) < 0.3 for oid in (f"o-{i}" for i in range(200))}
    assert 30 < sum(verdicts.values()) < 90
    assert verdicts == {oid: _fraction(oid) < 0.3 for oid in verdicts}


def test_refund_compensates_once(shop: Shop) -> None:
    placed = order_placed(amount_cents=700)
    charged = shop.charge(placed)
    refunded = shop.refund(_out_of_stock(placed))
    assert refunded.type == "PaymentRefunded"
    assert refunded.data["charge_id"] == charged.data["charge_id"]
    assert shop.refund(_out_of_stock(placed)).data == refunded.data
    assert shop.movements(placed.aggregate_id) == [("charge", 700), ("refund", 700)]


def test_refund_without_a_charge_is_rejected(shop: Shop) -> None:
    with pytest.raises(Reject, match="no authorized payment"):
        shop.refund(_out_of_stock(order_placed()))


def test_an_outage_opens_the_breaker_and_its_end_lets_payments_through(shop: Shop) -> None:
    shop.faults(outage=True)
    for _ in range(4):
        with pytest.raises(gw.GatewayUnavailable):
            shop.charge(order_placed())
    with pytest.raises((gw.GatewayUnavailable, BreakerOpen)):  # the failure that trips it
        shop.charge(order_placed())
    assert shop.breaker.state == "open"
    with pytest.raises(BreakerOpen):
        shop.charge(order_placed())
    assert shop.money_rows() == 0
    shop.faults(outage=False)
    shop.breaker = breaker()  # the reset timeout passed
    assert shop.charge(order_placed()).type == "PaymentAuthorized"


def test_gateway_time_is_recorded_by_status(shop: Shop) -> None:
    def seen(status: str) -> float:
        return REGISTRY.get_sample_value("payment_process_duration_seconds_count", {"status": status}) or 0.0

    before = seen("authorized"), seen("error")
    shop.charge(order_placed())
    shop.faults(outage=True)
    with pytest.raises(gw.GatewayUnavailable):
        shop.charge(order_placed())
    assert (seen("authorized"), seen("error")) == (before[0] + 1, before[1] + 1)
