"""The shop's payments and orders handlers tested through engine.testing, on the shop's own YAML.

The harness's proof of use: ``tests/shop/unit/test_payments.py::test_an_order_is_authorized_and_recorded``
and ``tests/shop/unit/test_orders.py::test_a_malformed_order_is_rejected`` call the handlers directly
with in-memory state; here the same behaviour runs as deployed — routes, KV buckets, the breaker and
the dead-letter stream of handlers/shop.yaml — with only the gateway's files moved into tmp_path.
"""

from __future__ import annotations

import pytest

from engine import Event
from engine.testing import TestApp
from handlers import SHOP_YAML
from tests.shop.gateway_support import local_gateway
from tests.shop_support import order_placed

pytest_plugins = ["engine.testing"]
pytestmark = pytest.mark.usefixtures("jetpool_server")


def shop(gateway_url: str) -> TestApp:
    """Payments and orders of handlers/shop.yaml, calling the gateway service at ``gateway_url``."""
    return TestApp(SHOP_YAML, services=["payments", "orders"],
                   overrides={"payments": {"settings": {"gateway": {"url": gateway_url}}}})


async def test_an_order_is_authorized_recorded_and_paid(shop_dsn: str) -> None:
    # A gateway that answers at once and never declines, in this test's event loop.
    async with local_gateway(shop_dsn, decline_rate=0.0) as url, shop(url) as app:
        placed = order_placed(amount_cents=2500)
        [authorized] = await app.publish(placed, wait_for="PaymentAuthorized")
        assert authorized.data["charge_id"].startswith("ch_")
        assert authorized.data["order_id"] == placed.aggregate_id and authorized.data["amount_cents"] == 2500
        await app.settle()
        payment, _ = await app.state("payments").get(placed.aggregate_id)
        assert payment is not None and payment["status"] == "authorized"
        order, _ = await app.state("orders").get(placed.aggregate_id)
        assert order is None  # orders writes an order's record when it ends, and this one has not
        assert await app.dead_letters() == []


async def test_a_malformed_order_is_rejected_by_both_services() -> None:
    async with shop("http://127.0.0.1:9") as app:  # rejected before any gateway call
        line = {"order_id": "o1", "customer_id": "c", "sku": "s", "qty": 0, "amount_cents": 1}
        bad = {"payments": Event("OrderPlaced", line), "orders": Event("StockReserved", line)}
        for event in bad.values():
            await app.publish(event)
        entries = await app.expect_dead_letters(2)
        assert sorted(e.service for e in entries) == ["orders", "payments"]
        for entry in entries:
            assert entry.error_type == "Reject"
            assert "qty must be a positive integer, got 0" in entry.error
            assert Event.decode(entry.body).id == bad[entry.service].id
        await app.settle()
        assert app.events("PaymentAuthorized") == []
        record, _ = await app.state("orders").get("o1")
        assert record is None
