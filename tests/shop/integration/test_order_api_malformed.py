"""1,000 malformed requests of many kinds against the order API on a real socket: each gets a 4xx with a
JSON error (naming the parameter when it is about one), the API stays up, and the stream gets nothing."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from engine.embedded import EmbeddedServer
from tests.shop.api_support import api, api_shop, post_order, stream_messages

REQUESTS = 1000
GOOD = {"customer_id": "c-1", "sku": "sku-1", "qty": 1, "amount_cents": 100}
JSON = "application/json"


@dataclass
class Bad:
    """One malformed request and what the answer must say."""

    kind: str
    status: int
    param: str | None = None
    body: bytes = b""
    content_type: str | None = JSON
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/orders"
    key: str | None = "default"


def _json(kind: str, status: int, param: str | None, **changes: Any) -> Bad:
    body = {**GOOD, **changes}
    # The standard library's encoder: orjson refuses integers beyond 64 bits, which a client may send.
    return Bad(kind, status, param, json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode())


_DROP = object()
_BAD_JSON = [b"", b"{", b'{"qty": 1,}', b"{'qty': 1}", b'{"qty": NaN}', b'{"amount_cents": Infinity}',
             b'{"amount_cents": -Infinity}', b'{"amount_cents": 1e400}', b"\xff\xfe{}", b'{"qty": 01}',
             b"[]", b"null", b'"order"', b"42", b"true", b'{"a": 1} trailing']
_BAD_TOKENS = ["a.b", "*", ">", "a>", "a b", " ", "a\tb", "a\nb", "a\x00", "a\x7f", "", "é", "sku/1", "x" * 129,
               "shop.OrderPlaced", "$KV", "sku-1;DROP"]
_WRONG_TYPES: list[Any] = ["2", 2.5, 2.0, True, False, None, [], {}, [1], {"n": 1}]


def _kinds(rng: random.Random) -> list[Callable[[], Bad]]:
    return [
        lambda: Bad("bad json", 400, None, rng.choice(_BAD_JSON)),
        lambda: _json("qty zero or negative", 422, "qty", qty=rng.choice([0, -1, -(2**63), -(10**30)])),
        lambda: _json("qty too large", 422, "qty", qty=rng.choice([1001, 2**64, 10**30])),
        lambda: _json("qty wrong type", 422, "qty", qty=rng.choice(_WRONG_TYPES)),
        lambda: _json("amount not positive", 422, "amount_cents", amount_cents=rng.choice([0, -1, -5000])),
        lambda: _json("amount huge", 422, "amount_cents", amount_cents=rng.choice([10**8 + 1, 2**63, 2**64 - 1])),
        lambda: Bad("amount huge literal", 422, "amount_cents", b'{"customer_id": "c", "sku": "s", "qty": 1, '
                    b'"amount_cents": ' + rng.choice([b"99999999999999999999999", b"1e300", b"-0.0"]) + b"}"),
        lambda: _json("amount wrong type", 422, "amount_cents", amount_cents=rng.choice(_WRONG_TYPES)),
        lambda: _json("bad sku", 422, "sku", sku=rng.choice(_BAD_TOKENS)),
        lambda: _json("sku wrong type", 422, "sku", sku=rng.choice([7, 1.5, True, ["a"], {"a": 1}])),
        lambda: _json("bad customer", 422, "customer_id", customer_id=rng.choice(_BAD_TOKENS)),
        lambda: _json("missing field", 422, (name := rng.choice(list(GOOD))), **{name: _DROP}),
        lambda: _json("null field", 422, (name := rng.choice(list(GOOD))), **{name: None}),
        lambda: _json("unknown field", 422, "coupon", coupon="FREE"),
        lambda: Bad("body over 64 KiB", 413, None, b'{"sku": "' + b"a" * rng.randint(65_536, 200_000) + b'"}'),
        lambda: Bad("wrong content type", 415, None, orjson.dumps(GOOD),
                    rng.choice(["text/plain", "application/x-www-form-urlencoded", "application/xml",
                                "multipart/form-data; boundary=x", "application/jsonx", None])),
        lambda: Bad("no idempotency key", 400, "Idempotency-Key", orjson.dumps(GOOD), key=None),
        lambda: Bad("bad idempotency key", 400, "Idempotency-Key", orjson.dumps(GOOD),
                    key=rng.choice(["", "has space", "k" * rng.randint(256, 8000)])),
        lambda: Bad("header line over 8 KiB", 400, None, orjson.dumps(GOOD),
                    headers={"X-Padding": "p" * rng.randint(9000, 20_000)}),
        lambda: Bad("wrong method", 405, None, method=rng.choice(["PUT", "DELETE", "PATCH"])),
        lambda: Bad("no such route", 404, None, path=rng.choice(["/order", "/orders/a/b", "/v1/orders"])),
        lambda: Bad("bad order id", 400, "order_id", method="GET",
                    path="/orders/" + rng.choice(["a.b", "%2A", "%3E", "a%20b", "x" * 129])),
        lambda: Bad("bad wait", 400, "wait", method="GET", path="/orders/o-1?wait=" + rng.choice(["31s", "x", "-1"])),
    ]


def _requests(rng: random.Random) -> list[Bad]:
    kinds = _kinds(rng)
    requests = [kinds[n % len(kinds)]() for n in range(REQUESTS - 3)]
    # Three 10 MB bodies: refused from their Content-Length, before a byte of them is parsed.
    requests += [Bad("10 MB body", 413, None, b"{" + b" " * (10 * 2**20) + b"}") for _ in range(3)]
    rng.shuffle(requests)
    return requests


async def _send(client: aiohttp.ClientSession, bad: Bad) -> tuple[Bad, int, str, Any]:
    headers = dict(bad.headers)
    if bad.key is not None:
        headers["Idempotency-Key"] = uuid.uuid4().hex if bad.key == "default" else bad.key
    if bad.content_type is not None:
        headers["Content-Type"] = bad.content_type
    data = bad.body if bad.method in ("POST", "PUT", "PATCH") else None
    async with client.request(bad.method, bad.path, data=data, headers=headers,
                              skip_auto_headers=["Content-Type"]) as response:
        return bad, response.status, response.content_type, orjson.loads(await response.read())


def test_malformed_requests_get_json_4xx_and_nothing_reaches_the_stream(
        tmp_path: Path, nats_server: EmbeddedServer) -> None:
    app = api_shop(tmp_path, nats_server.url)
    requests = _requests(random.Random(14))

    async def scenario() -> tuple[list[tuple[Bad, int, str, Any]], int, int, tuple[int, Any, Any]]:
        async with api(app) as (_, client, _cfg):
            before = await stream_messages(app)
            gate = asyncio.Semaphore(16)

            async def one(bad: Bad) -> tuple[Bad, int, str, Any]:
                async with gate:
                    return await _send(client, bad)

            answers = list(await asyncio.gather(*(one(bad) for bad in requests)))
            after = await stream_messages(app)
            still = await post_order(client, str(uuid.uuid4()), GOOD)  # the API is still up and working
            return answers, before, after, still

    answers, before, after, still = asyncio.run(scenario())
    wrong = [(bad.kind, bad.body[:80], bad.path[:60], status, body) for bad, status, ctype, body in answers
             if (status, body["error"].get("param")) != (bad.status, bad.param) or ctype != JSON
             or not body["error"]["message"] or body["error"]["type"] != "invalid_request_error"]
    assert wrong == []
    assert len(answers) == REQUESTS and len(Counter(bad.kind for bad, *_ in answers)) >= 20
    assert after == before
    assert still[0] == 202
