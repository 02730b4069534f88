"""Payments: one charge per order whatever is redelivered or lost, refunds as compensation, the breaker."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from engine import Event, Reject
from engine.breaker import BreakerOpen
from engine.state import MemoryState
from handlers import gateway as gw
from handlers import payments
from handlers.saga import Order
from tests.shop_support import breaker, context, order_placed


class Shop:
    """The payments handlers' world: a state store, a breaker, and a gateway with an in-memory ledger."""

    def __init__(self, tmp_path: Path, **gateway: Any) -> None:
        self.store = MemoryState()
        self.breaker = breaker()
        self.ledger = gw.MemoryLedger()
        self.control = gw.ControlFile(tmp_path / "control.json", poll_s=0)
        self.gateway = gw.PaymentGateway(self.ledger, self.control, latency_ms=0, jitter_ms=0,
                                         rng=random.Random(7), **gateway)
        self.settings = {"gateway": {"name": str(tmp_path)}}
        gw._gateways[gw.settings_key(self.settings["gateway"])] = self.gateway

    def ctx(self) -> Any:
        return context("payments", {"state:payments": self.store, "breaker:payment_gateway": self.breaker},
                       self.settings)

    def charge(self, event: Event) -> Event:
        return asyncio.run(payments.charge(event, self.ctx()))

    def refund(self, event: Event) -> Event:
        return asyncio.run(payments.refund(event, self.ctx()))


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    yield Shop(tmp_path)
    gw._gateways.clear()


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
    assert shop.ledger.movements(placed.aggregate_id) == [("charge", 2500)]


def test_a_redelivered_order_is_answered_from_the_record(shop: Shop) -> None:
    placed = order_placed()
    first = shop.charge(placed)
    shop.control.write(outage=True)  # the gateway is not even asked
    again = shop.charge(placed)
    assert (again.type, again.data) == (first.type, first.data)
    assert len(shop.ledger.rows) == 1


def test_a_lost_record_is_recovered_by_the_gateways_idempotency_key(shop: Shop) -> None:
    placed = order_placed()
    first = shop.charge(placed)
    shop.store.data.clear()  # the worker died after the charge, before the record was written
    again = shop.charge(placed)
    assert again.data == first.data
    assert shop.ledger.movements(placed.aggregate_id) == [("charge", placed.data["amount_cents"])]
    assert shop.ledger.double_charges() == {}


def test_a_response_lost_after_charging_is_retried_without_charging_twice(tmp_path: Path) -> None:
    shop = Shop(tmp_path, failure_rate=1.0)
    placed = order_placed()
    failures_after_charge = 0
    for _ in range(20):
        with pytest.raises(gw.GatewayError) as caught:
            shop.charge(placed)
        failures_after_charge += "after the charge" in str(caught.value)
        shop.breaker = breaker()  # keep the breaker out of this test
    assert failures_after_charge > 0
    shop.gateway.failure_rate = 0.0
    assert shop.charge(placed).type == "PaymentAuthorized"
    assert len(shop.ledger.movements(placed.aggregate_id)) == 1
    gw._gateways.clear()


def test_concurrent_duplicates_charge_once(shop: Shop) -> None:
    placed = order_placed()

    async def both() -> list[Event]:
        return list(await asyncio.gather(*(payments.charge(placed, shop.ctx()) for _ in range(5))))

    outs = asyncio.run(both())
    assert len({o.data["charge_id"] for o in outs}) == 1
    assert len(shop.ledger.movements(placed.aggregate_id)) == 1


def test_a_declined_payment_is_an_answer_not_a_failure(tmp_path: Path) -> None:
    shop = Shop(tmp_path, max_amount_cents=1000)
    out = shop.charge(order_placed(amount_cents=5000))
    assert out.type == "PaymentDeclined" and out.data["reason"] == "amount over limit"
    assert shop.ledger.rows == []
    assert shop.breaker.state == "closed"
    gw._gateways.clear()


def test_declines_are_stable_per_order() -> None:
    verdicts = {oid: gw._fraction(oid) < 0.3 for oid in (f"o-{i}" for i in range(200))}
    assert 30 < sum(verdicts.values()) < 90
    assert verdicts == {oid: gw._fraction(oid) < 0.3 for oid in verdicts}


def test_refund_compensates_once(shop: Shop) -> None:
    placed = order_placed(amount_cents=700)
    charged = shop.charge(placed)
    refunded = shop.refund(_out_of_stock(placed))
    assert refunded.type == "PaymentRefunded"
    assert refunded.data["charge_id"] == charged.data["charge_id"]
    assert shop.refund(_out_of_stock(placed)).data == refunded.data
    assert shop.ledger.movements(placed.aggregate_id) == [("charge", 700), ("refund", 700)]


def test_refund_without_a_charge_is_rejected(shop: Shop) -> None:
    with pytest.raises(Reject, match="no authorized payment"):
        shop.refund(_out_of_stock(order_placed()))


def test_an_outage_opens_the_breaker_and_its_end_lets_payments_through(shop: Shop) -> None:
    shop.control.write(outage=True)
    for _ in range(4):
        with pytest.raises(gw.GatewayUnavailable):
            shop.charge(order_placed())
    with pytest.raises((gw.GatewayUnavailable, BreakerOpen)):  # the failure that trips it
        shop.charge(order_placed())
    assert shop.breaker.state == "open"
    with pytest.raises(BreakerOpen):
        shop.charge(order_placed())
    assert shop.ledger.rows == []
    shop.control.write(outage=False)
    shop.breaker = breaker()  # the reset timeout passed
    assert shop.charge(order_placed()).type == "PaymentAuthorized"


def test_gateway_time_is_recorded_by_status(shop: Shop) -> None:
    def seen(status: str) -> float:
        return REGISTRY.get_sample_value("payment_process_duration_seconds_count", {"status": status}) or 0.0

    before = seen("authorized"), seen("error")
    shop.charge(order_placed())
    shop.control.write(outage=True)
    with pytest.raises(gw.GatewayUnavailable):
        shop.charge(order_placed())
    assert (seen("authorized"), seen("error")) == (before[0] + 1, before[1] + 1)
