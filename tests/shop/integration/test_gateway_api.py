"""The gateway's HTTP API on a real aiohttp server over a real PostgreSQL ledger: idempotency, declines,
bad input, the admin faults and the probes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest

from handlers.gateway.faults import Faults
from handlers.gateway.ledger import Ledger
from handlers.gateway.server import running
from tests.shop.gateway_support import ledger_rows, local_gateway

T = TypeVar("T")


def on_gateway(dsn: str, work: Callable[[str, aiohttp.ClientSession], Awaitable[T]], **faults: Any) -> T:
    async def go() -> T:
        async with local_gateway(dsn, **faults) as url, aiohttp.ClientSession() as http:
            return await work(url, http)

    return asyncio.run(go())


async def post(http: aiohttp.ClientSession, url: str, body: Any, key: str | None = "k-1",
               **kwargs: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers.setdefault("Content-Type", kwargs.pop("content_type", "application/json"))
    async with http.post(url, data=data, headers=headers) as response:
        return response.status, orjson.loads(await response.read()), dict(response.headers)


CHARGE = {"order": "o-1", "amount": 2500, "currency": "usd"}


def test_the_same_key_twice_charges_once_and_answers_the_same(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
        return [await post(http, f"{url}/v1/charges", CHARGE, "charge-o-1") for _ in range(3)]

    (s1, b1, h1), (s2, b2, h2), (s3, b3, _) = on_gateway(shop_dsn, work)
    assert s1 == s2 == s3 == 200 and b1 == b2 == b3
    assert b1["object"] == "charge" and b1["id"].startswith("ch_") and b1["amount"] == 2500
    assert "Idempotent-Replayed" not in h1 and h2["Idempotent-Replayed"] == "true"
    charges = ledger_rows(shop_dsn, "charges")
    assert [(c["order_id"], c["amount_cents"], c["idempotency_key"]) for c in charges] == [("o-1", 2500, "charge-o-1")]
    assert len(ledger_rows(shop_dsn, "idempotency_keys")) == 1


def test_concurrent_requests_with_one_key_charge_once(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
        return await asyncio.gather(*(post(http, f"{url}/v1/charges", CHARGE, "charge-race") for _ in range(40)))

    answers = on_gateway(shop_dsn, work, latency_ms=5, jitter_ms=5)
    assert {status for status, _, _ in answers} == {200}
    assert len({body["id"] for _, body, _ in answers}) == 1
    assert sum(1 for _, _, h in answers if h.get("Idempotent-Replayed") != "true") == 1
    assert len(ledger_rows(shop_dsn, "charges")) == 1


def test_concurrent_charges_are_committed_in_groups_each_answered_as_if_alone(shop_dsn: str) -> None:
    """120 charges at once, a third of them declined, one key sent twice and one key reused for another
    amount in the same burst: one charge per authorized key, the duplicate replays, the reuse is refused,
    and the ledger commits far fewer transactions than there are requests."""
    async def transactions() -> int:
        """How many transactions wrote the keys (rows one statement inserts share its transaction id)."""
        conn = await asyncpg.connect(shop_dsn)
        try:
            return int(await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM ledger.idempotency_keys"))
        finally:
            await conn.close()

    async def work(url: str, http: aiohttp.ClientSession) -> tuple[list[Any], int]:
        bodies = [({**CHARGE, "order": f"o-{i}", "amount": 100 + i}, f"k-{i}") for i in range(120)]
        bodies += [({**CHARGE, "order": "o-7", "amount": 107}, "k-7"), ({**CHARGE, "order": "o-8", "amount": 1}, "k-8")]
        answers = await asyncio.gather(*(post(http, f"{url}/v1/charges", body, key) for body, key in bodies))
        return answers, await transactions()

    answers, committed = on_gateway(shop_dsn, work, decline_rate=0.33, latency_ms=5)
    first, duplicate, reused = answers[:120], answers[120], answers[121]
    # Whichever of k-8's two requests came first holds the key; the other is refused.
    (refused,), (holder,) = ([a for a in (first[8], reused) if (a[0] == 422) is want] for want in (True, False))
    assert refused[1]["error"]["type"] == "idempotency_error"
    statuses = [status for status, _, _ in [*first[:8], holder, *first[9:]]]
    assert set(statuses) == {200, 402}
    assert duplicate[0] == statuses[7] and duplicate[1] == first[7][1]
    assert sum(1 for _, _, headers in answers if headers.get("Idempotent-Replayed") == "true") == 1
    charges = {c["idempotency_key"]: c for c in ledger_rows(shop_dsn, "charges")}
    assert sorted(charges) == sorted(f"k-{i}" for i, s in enumerate(statuses) if s == 200)
    assert all(c["amount_cents"] == 100 + int(c["order_id"][2:]) for k, c in charges.items() if k != "k-8")
    if "k-8" in charges:
        assert charges["k-8"]["amount_cents"] == holder[1]["amount"]
    assert len(ledger_rows(shop_dsn, "idempotency_keys")) == 120
    assert committed < 60, committed  # alone, each charge is a transaction of its own: 120


def test_the_same_key_with_another_body_is_refused(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> tuple[Any, ...]:
        first = await post(http, f"{url}/v1/charges", CHARGE, "k")
        other = await post(http, f"{url}/v1/charges", {**CHARGE, "amount": 9999}, "k")
        as_refund = await post(http, f"{url}/v1/refunds", {"charge": first[1]["id"]}, "k")
        return first, other, as_refund

    first, other, as_refund = on_gateway(shop_dsn, work)
    assert first[0] == 200
    for status, body, _ in (other, as_refund):
        assert status == 422
        assert body["error"]["type"] == "idempotency_error" and body["error"]["param"] == "Idempotency-Key"
    assert len(ledger_rows(shop_dsn, "charges")) == 1 and ledger_rows(shop_dsn, "refunds") == []


def test_a_decline_is_a_402_stored_under_its_key_and_moves_no_money(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> tuple[Any, ...]:
        over = await post(http, f"{url}/v1/charges", {**CHARGE, "amount": 5_000_001}, "big")
        again = await post(http, f"{url}/v1/charges", {**CHARGE, "amount": 5_000_001}, "big")
        return over, again

    (s1, b1, _), (s2, b2, h2) = on_gateway(shop_dsn, work, max_amount_cents=5_000_000)
    assert s1 == s2 == 402 and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    assert b1["error"]["type"] == "card_error" and b1["error"]["code"] == "card_declined"
    assert b1["error"]["message"] == "amount over limit" and b1["error"]["param"] == "amount"
    assert ledger_rows(shop_dsn, "charges") == []


def test_the_decline_rate_declines_the_same_orders_every_time(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> list[int]:
        return [(await post(http, f"{url}/v1/charges", {**CHARGE, "order": f"o-{i}"}, f"k-{i}"))[0]
                for i in range(40)]

    statuses = on_gateway(shop_dsn, work, decline_rate=0.5)
    assert set(statuses) == {200, 402} and statuses == on_gateway(shop_dsn, work, decline_rate=0.5)


def test_a_refund_moves_money_once_and_never_more_than_the_charge(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> tuple[Any, ...]:
        charge = (await post(http, f"{url}/v1/charges", CHARGE, "charge-o-1"))[1]
        refunds = await asyncio.gather(*(post(http, f"{url}/v1/refunds", {"charge": charge["id"]}, "refund-o-1")
                                         for _ in range(10)))
        more = await post(http, f"{url}/v1/refunds", {"charge": charge["id"], "amount": 1}, "refund-more")
        missing = await post(http, f"{url}/v1/refunds", {"charge": "ch_0123"}, "refund-none")
        return refunds, more, missing

    refunds, more, missing = on_gateway(shop_dsn, work)
    assert {s for s, _, _ in refunds} == {200} and len({b["id"] for _, b, _ in refunds}) == 1
    assert refunds[0][1]["amount"] == 2500
    assert (more[0], more[1]["error"]["code"], more[1]["error"]["param"]) == (400, "amount_too_large", "amount")
    assert (missing[0], missing[1]["error"]["code"], missing[1]["error"]["param"]) == (400, "resource_missing",
                                                                                     "charge")
    assert [(r["order_id"], r["amount_cents"]) for r in ledger_rows(shop_dsn, "refunds")] == [("o-1", 2500)]


BAD: list[tuple[str, Any, dict[str, Any], int, str | None]] = [
    # (case, body, post options, status, param)
    ("no key", CHARGE, {"key": None}, 400, "Idempotency-Key"),
    ("key with a space", CHARGE, {"key": "a b"}, 400, "Idempotency-Key"),
    ("not JSON", b"{order: 1", {}, 400, None),
    ("a list", [1, 2], {}, 400, None),
    ("NaN", b'{"order": "o", "amount": NaN}', {}, 400, None),
    ("huge integer", b'{"order": "o", "amount": 123456789012345678901234567890}', {}, 400, "amount"),
    ("no amount", {"order": "o-1"}, {}, 400, "amount"),
    ("string amount", {**CHARGE, "amount": "25"}, {}, 400, "amount"),
    ("float amount", {**CHARGE, "amount": 25.5}, {}, 400, "amount"),
    ("bool amount", {**CHARGE, "amount": True}, {}, 400, "amount"),
    ("zero amount", {**CHARGE, "amount": 0}, {}, 400, "amount"),
    ("negative amount", {**CHARGE, "amount": -5}, {}, 400, "amount"),
    ("amount too large", {**CHARGE, "amount": 10**15}, {}, 400, "amount"),
    ("bad currency", {**CHARGE, "currency": "US Dollars"}, {}, 400, "currency"),
    ("no order", {"amount": 100}, {}, 400, "order"),
    ("order with a wildcard", {**CHARGE, "order": "o.*>"}, {}, 400, "order"),
    ("order not a string", {**CHARGE, "order": 7}, {}, 400, "order"),
    ("wrong content type", CHARGE, {"content_type": "text/plain"}, 415, None),
    ("a 1 MB body", b'{"order": "' + b"x" * 1_000_000 + b'"}', {}, 413, None),
]


@pytest.mark.parametrize(("case", "body", "options", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_json_error_naming_the_parameter(shop_dsn: str, case: str, body: Any,
                                                             options: dict[str, Any], status: int,
                                                             param: str | None) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> tuple[Any, ...]:
        bad = await post(http, f"{url}/v1/charges", body, **{"key": "k-bad", **options})
        still_up = await post(http, f"{url}/v1/charges", CHARGE, "k-good")
        return bad, still_up

    (got, error, _), (after, _, _) = on_gateway(shop_dsn, work)
    assert got == status, error
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert error["error"].get("param") == param
    assert after == 200 and len(ledger_rows(shop_dsn, "charges")) == 1


def test_unknown_paths_and_methods_answer_json(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        out = []
        for method, path in (("GET", "/v1/charges"), ("POST", "/v2/nothing")):
            async with http.request(method, f"{url}{path}") as response:
                out.append((response.status, orjson.loads(await response.read())["error"]["code"]))
        return out

    assert on_gateway(shop_dsn, work) == [(405, "method_not_allowed"), (404, "resource_missing")]


def test_admin_faults_latency_outage_and_reset(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with http.post(f"{url}/admin/faults", json={"latency_ms": 300}) as response:
            seen["set"] = (response.status, (await response.json())["latency_ms"])
        started = time.monotonic()
        seen["slow"] = (await post(http, f"{url}/v1/charges", CHARGE, "k1"))[0], time.monotonic() - started
        async with http.post(f"{url}/admin/faults", json={"outage": True, "latency_ms": 0}) as response:
            assert response.status == 200
        seen["outage"] = await post(http, f"{url}/v1/charges", {**CHARGE, "order": "o-2"}, "k2")
        async with http.get(f"{url}/ready") as response:
            seen["ready"] = response.status  # the outage is the API's; the service itself is up
        async with http.post(f"{url}/admin/faults", json={"failure_rate": 2, "outage": "yes"}) as response:
            seen["bad"] = response.status, (await response.json())["error"]["param"]
        async with http.delete(f"{url}/admin/faults") as response:
            seen["reset"] = await response.json()
        seen["after"] = (await post(http, f"{url}/v1/charges", {**CHARGE, "order": "o-2"}, "k2"))[0]
        return seen

    seen = on_gateway(shop_dsn, work)
    assert seen["set"] == (200, 300)
    assert seen["slow"][0] == 200 and seen["slow"][1] >= 0.3
    status, body, _ = seen["outage"]
    assert status == 503 and body["error"]["code"] == "gateway_outage"
    assert seen["ready"] == 200
    assert seen["bad"] == (422, "failure_rate")
    assert seen["reset"]["outage"] is False and seen["reset"]["latency_ms"] == 0
    assert seen["after"] == 200
    assert sorted(c["order_id"] for c in ledger_rows(shop_dsn, "charges")) == ["o-1", "o-2"]


def test_failures_after_the_money_moved_lose_the_answer_and_a_retry_replays_it(shop_dsn: str) -> None:
    async def work(url: str, http: aiohttp.ClientSession) -> dict[str, int]:
        outcomes: dict[str, int] = {"lost": 0, "500": 0, "503": 0, "200": 0}
        for i in range(60):
            try:
                status, _, _ = await post(http, f"{url}/v1/charges", {**CHARGE, "order": f"o-{i}"}, f"k-{i}")
                outcomes[str(status)] += 1
            except aiohttp.ClientError:
                outcomes["lost"] += 1
        async with http.post(f"{url}/admin/faults", json={"failure_rate": 0}) as response:
            assert response.status == 200
        for i in range(60):  # the caller retries every order with its key: nothing is charged twice
            assert (await post(http, f"{url}/v1/charges", {**CHARGE, "order": f"o-{i}"}, f"k-{i}"))[0] == 200
        return outcomes

    outcomes = on_gateway(shop_dsn, work, failure_rate=0.8)
    assert outcomes["lost"] and outcomes["500"] and outcomes["503"], outcomes
    charges = ledger_rows(shop_dsn, "charges")
    assert sorted(c["order_id"] for c in charges) == sorted(f"o-{i}" for i in range(60))  # once each
    # What a lost or 500 answer charged was charged before the caller heard anything: more than the 200s.
    assert outcomes["200"] < 60


def test_ready_follows_the_database(shop_dsn: str) -> None:
    async def go() -> tuple[int, int]:
        ledger = await Ledger.open(shop_dsn)
        async with running(ledger, Faults()) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/ready") as response:
                before = response.status
            await ledger.db.pool.close()  # the database is gone for this gateway
            async with http.get(f"{url}/ready") as response:
                after = response.status
            async with http.get(f"{url}/health") as response:
                assert response.status == 200
        return before, after

    assert asyncio.run(go()) == (200, 503)
