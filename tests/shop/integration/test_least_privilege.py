"""The shipped least-privilege nats-server configuration, on a real server with the shop provisioned:
a service may publish its own events but not another service's, and its real worker runs with it.

The server is this module's own (tests/shop/least_privilege_support.py): random port, store in a temp dir,
passwords in its environment, killed by PID in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from engine.config import BucketConfig
from engine.errors import PublishTimeout
from engine.events import MSG_ID_HEADER, Event
from engine.kv import FastKV, KVClient
from engine.publisher import Publisher
from engine.state import KVState, open_buckets
from handlers.audit_store import SqliteAuditStore
from handlers.inventory import seed
from handlers.tools.api_process import ApiProcess
from tests.shop import least_privilege_support
from tests.shop.least_privilege_support import CONF, Shop, as_user, counts, order
from tests.support import Engine, engine_env, wait_for

shop = least_privilege_support.shop  # this module's own server


async def _wait_for_error(errors: list[str], text: str) -> str:
    """The first error that mentions ``text`` (nats-py lower-cases the server's message)."""
    for _ in range(100):
        found = next((e for e in errors if text.lower() in e.lower()), None)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no error mentioning {text!r}; errors: {errors}")


# ---- the tests -------------------------------------------------------------------------------------


def test_a_service_may_publish_its_own_events_and_no_one_elses(shop: Shop) -> None:
    before = counts(shop)
    event = Event(type="PaymentAuthorized", data={"order_id": "lp-1"}, aggregate_id="lp-1")

    async def work(nc: Any, errors: list[str]) -> list[str]:
        js = nc.jetstream()
        ack = await js.publish("shop.PaymentAuthorized", event.encode(), headers={MSG_ID_HEADER: event.id})
        assert ack.stream == "SHOP"
        # Refused by the server: no PubAck comes back, the error callback hears why.
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("shop.OrderConfirmed", event.encode(), timeout=0.5)
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.SHOP.orders", b'{"batch": 1}', reply=nc.new_inbox())
        await nc.subscribe("shop.>")
        await nc.flush()
        return [await _wait_for_error(errors, f'Publish to "{subject}"') for subject in
                ("shop.OrderConfirmed", "$JS.API.CONSUMER.MSG.NEXT.SHOP.orders")] + \
               [await _wait_for_error(errors, 'Subscription to "shop.>"')]

    refusals = as_user(shop, "payments", work)
    assert all("permissions violation" in r.lower() for r in refusals), refusals

    after = counts(shop)
    assert after.get("shop.PaymentAuthorized", 0) == before.get("shop.PaymentAuthorized", 0) + 1
    assert after.get("shop.OrderConfirmed", 0) == before.get("shop.OrderConfirmed", 0)


def test_the_payments_service_runs_as_its_own_user(shop: Shop, engine: Callable[..., Engine]) -> None:
    before, refused_before = counts(shop), len(shop.violations())
    run = engine(shop.app, env={**shop.env("payments"), "JETPOOL_HTTP_PORT": "0"},
                 args=["--service", "payments", "--no-provision"], workers=1)
    good, bad = order("lp-good"), order("lp-bad", sku=None)  # no sku: rejected, dead-lettered

    async def place(nc: Any, _: list[str]) -> None:
        for event in (good, bad):
            await nc.jetstream().publish("shop.OrderPlaced", event.encode(), headers={MSG_ID_HEADER: event.id})

    as_user(shop, "storefront", place)

    def grew(subject: str) -> bool:
        return counts(shop).get(subject, 0) > before.get(subject, 0)

    wait_for(lambda: grew("shop.PaymentAuthorized") and grew("dlq.payments"), 60,
             "a PaymentAuthorized and a dead letter from the payments service", detail=run.tail)
    assert not run.records("nats.refused")
    assert shop.violations()[refused_before:] == []
    assert not [r for r in run.records() if r.get("level") == "error"], run.tail()


def _http(method: str, url: str, body: dict[str, Any] | None = None, key: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=40) as response:
        return response.status, json.loads(response.read())


def test_the_order_api_runs_as_the_storefront(shop: Shop, engine: Callable[..., Engine], tmp_path: Path) -> None:
    """POST /orders creates its request record and publishes OrderPlaced; GET ?wait reads the three buckets
    and hears the order's record change: all of it with the storefront's grants, and nothing refused."""
    async def stock_up(nc: Any, _: list[str]) -> None:
        await seed(KVState(await nc.jetstream().key_value("stock")), {"api-widget": 5})

    as_user(shop, "admin", stock_up)
    refused_before = len(shop.violations())
    run = engine(shop.app, env={**shop.env("admin"), "JETPOOL_HTTP_PORT": "0"}, args=["--no-provision"])
    api = ApiProcess(shop.app.path, shop.server.url, tmp_path / "api.log",
                     env=engine_env(shop.env("storefront"))).start()
    try:
        line = {"customer_id": "c-api", "sku": "api-widget", "qty": 2, "amount_cents": 1999}
        status, placed = _http("POST", f"{api.url}/orders", line, key="lp-api-order-1")
        assert status == 202, placed
        assert _http("POST", f"{api.url}/orders", line, key="lp-api-order-1") == (202, placed)  # one order
        status, state = _http("GET", f"{api.url}/orders/{placed['order_id']}?wait=30s")
    finally:
        api.stop()
    assert status == 200
    assert state["status"] == "confirmed", (state, run.tail())
    assert state["payment"]["status"] == "authorized" and state["reservation"] == {"status": "reserved"}
    assert shop.violations()[refused_before:] == []
    assert "Violation" not in (tmp_path / "api.log").read_text(errors="replace")


def test_a_service_user_reads_and_writes_its_bucket_on_the_fast_state_path(shop: Shop) -> None:
    """A worker's stores (engine/kv.py): direct gets and compare-and-set publishes on its own bucket only."""

    async def work(nc: Any, errors: list[str]) -> list[str]:
        publisher = Publisher(nc, "shop")
        await publisher.start()
        client = KVClient(nc, publisher, timeout_s=2.0, retry_s=0.0)
        await client.start()
        try:
            js = nc.jetstream()
            stock = (await open_buckets(js, {"stock": BucketConfig()}, create=False, fast=client))["stock"]
            assert isinstance(stock, FastKV) and stock.direct
            key = f"lp-fast-{os.getpid()}"
            assert await stock.get(key) == (None, 0)
            revision = await stock.create(key, {"available": 3})
            assert await stock.mutate(key, lambda v: {"available": (v or {})["available"] - 1}) == {"available": 2}
            assert (await stock.get(key))[0] == {"available": 2} and revision > 0
            assert await stock.mutate(f"{key}-new", lambda v: {"available": 1}, fresh=True) == {"available": 1}
            # another service's bucket: refused by the server, the direct get never answered
            orders = FastKV("orders", client.gets, publisher)
            with pytest.raises(PublishTimeout):
                await orders.get("anything")
            return [await _wait_for_error(errors, 'Publish to "$JS.API.DIRECT.GET.KV_orders')]
        finally:
            await client.stop()
            await publisher.stop()

    refusals = as_user(shop, "inventory", work)
    assert all("permissions violation" in r.lower() for r in refusals), refusals


def test_the_admin_password_is_not_in_the_shipped_file() -> None:
    # Passwords are variables the server resolves from its environment, never literals in the file.
    assert os.path.getsize(CONF) > 0
    for line in CONF.read_text().splitlines():
        if "password:" in line and not line.lstrip().startswith("#"):
            assert "password: $NATS_" in line, line


# ---- hostile producers (docs/security.md) ----------------------------------------------------------


def publish_as(shop: Shop, user: str, subject: str, body: bytes, msg_id: str) -> None:
    async def work(nc: Any, _: list[str]) -> None:
        await nc.jetstream().publish(subject, body, headers={MSG_ID_HEADER: msg_id})

    as_user(shop, user, work)


def order_record(shop: Shop, order_id: str) -> Any:
    async def work(nc: Any, _: list[str]) -> Any:
        kv = await nc.jetstream().key_value("orders")
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            return json.loads((await kv.get(order_id)).value)
        return None

    return as_user(shop, "admin", work)


def audited(shop: Shop, order_id: str) -> list[str]:
    store = SqliteAuditStore(shop.app.raw["services"]["audit"]["settings"]["db_path"])
    try:
        return [r.type for r in asyncio.run(store.timeline(order_id))]
    finally:
        store.close()


def test_an_event_whose_body_claims_another_type_than_its_subject_is_dead_lettered(
        shop: Shop, engine: Callable[..., Engine]) -> None:
    """As storefront, a 'StockReserved' on shop.OrderPlaced would confirm an unpaid order; as payments,
    an 'OutOfStock' on shop.PaymentAuthorized would cancel a paid one. Each consumer of those subjects
    dead-letters the forgery on its first delivery, naming both types, and no state changes."""
    async def stock_up(nc: Any, _: list[str]) -> None:
        await seed(KVState(await nc.jetstream().key_value("stock")), {"forged-widget": 10})

    as_user(shop, "admin", stock_up)
    run = engine(shop.app, env={**shop.env("admin"), "JETPOOL_HTTP_PORT": "0"}, args=["--no-provision"])
    paid = order("forge-paid", sku="forged-widget")
    publish_as(shop, "storefront", "shop.OrderPlaced", paid.encode(), paid.id)
    wait_for(lambda: (order_record(shop, "forge-paid") or {}).get("status") == "confirmed", 60,
             "the genuine order to be confirmed", detail=run.tail)
    before = counts(shop)

    unpaid = order("forge-unpaid", sku="forged-widget")
    forged_reserved = Event("StockReserved", unpaid.data, aggregate_id="forge-unpaid")
    publish_as(shop, "storefront", "shop.OrderPlaced", forged_reserved.encode(), forged_reserved.id)
    forged_out = Event("OutOfStock", {**paid.data, "reason": "forged"}, aggregate_id="forge-paid")
    publish_as(shop, "payments", "shop.PaymentAuthorized", forged_out.encode(), forged_out.id)

    def grew(subject: str) -> int:
        return counts(shop).get(subject, 0) - before.get(subject, 0)

    # payments and audit consume shop.OrderPlaced; inventory and audit shop.PaymentAuthorized.
    wait_for(lambda: (grew("dlq.orders"), grew("dlq.payments"), grew("dlq.inventory"), grew("dlq.audit")) ==
             (0, 1, 1, 2), 60, "one dead letter per consumer of each forgery", detail=run.tail)
    def forgeries_logged() -> list[dict[str, Any]]:
        return [r for r in run.records("event.failed") if "does not match subject" in r["reason"]]

    # A worker logs the failure after its dead letter is stored (and audit lingers 20 ms between reads).
    wait_for(lambda: len(forgeries_logged()) >= 4, 30, "the four failures logged", detail=run.tail)
    failed = forgeries_logged()
    assert len(failed) == 4 and {r["outcome"] for r in failed} == {"dead_letter"}
    assert {r["attempt"] for r in failed} == {1}
    assert any("'StockReserved' does not match subject 'shop.OrderPlaced'" in r["reason"] for r in failed)
    assert any("'OutOfStock' does not match subject 'shop.PaymentAuthorized'" in r["reason"] for r in failed)

    after = counts(shop)
    for subject in ("shop.OrderConfirmed", "shop.OrderCancelled", "shop.PaymentRefunded", "shop.StockReserved",
                    "shop.OutOfStock"):
        assert after.get(subject, 0) == before.get(subject, 0), subject
    for subject in ("shop.OrderPlaced", "shop.PaymentAuthorized"):  # the forgeries themselves, and nothing more
        assert after.get(subject, 0) == before.get(subject, 0) + 1, subject
    assert order_record(shop, "forge-unpaid") is None
    assert order_record(shop, "forge-paid")["status"] == "confirmed"
    assert "StockReserved" not in audited(shop, "forge-unpaid") and "OutOfStock" not in audited(shop, "forge-paid")


def test_json_nested_too_deep_is_rejected_and_the_audit_stores_the_rest_of_its_batch(
        shop: Shop, engine: Callable[..., Engine]) -> None:
    """600 levels parse but cannot be encoded again: the audit's group commit would fail for every
    event of its batch. It is dead-lettered at the boundary; the 30 genuine orders around it are stored."""
    run = engine(shop.app, env={**shop.env("admin"), "JETPOOL_HTTP_PORT": "0"},
                 args=["--no-provision", "--service", "audit"], workers=1)
    before = counts(shop)
    orders = [order(f"deep-{i}") for i in range(30)]
    deep = b'{"id": "deep", "type": "OrderPlaced", "data": {"order_id": "deep-x", "x": ' + b"[" * 600 + \
        b"]" * 600 + b"}}"

    async def place(nc: Any, _: list[str]) -> None:
        js = nc.jetstream()
        for event in orders[:15]:
            await js.publish("shop.OrderPlaced", event.encode(), headers={MSG_ID_HEADER: event.id})
        await js.publish("shop.OrderPlaced", deep, headers={MSG_ID_HEADER: "deep"})
        for event in orders[15:]:
            await js.publish("shop.OrderPlaced", event.encode(), headers={MSG_ID_HEADER: event.id})

    as_user(shop, "storefront", place)
    wait_for(lambda: all(audited(shop, e.aggregate_id) == ["OrderPlaced"] for e in orders), 60,
             "every genuine order audited", detail=run.tail)
    wait_for(lambda: counts(shop).get("dlq.audit", 0) == before.get("dlq.audit", 0) + 1, 30,
             "the deep event dead-lettered", detail=run.tail)
    def nested() -> list[dict[str, Any]]:
        return [r for r in run.records("event.failed") if r.get("stream_seq") and "nested" in r["reason"]]

    wait_for(lambda: bool(nested()), 30, "the failure logged (after its dead letter)", detail=run.tail)
    [failure] = nested()
    assert failure["reason"] == "MalformedEvent: body is nested deeper than 64 levels"
    assert failure["attempt"] == 1
