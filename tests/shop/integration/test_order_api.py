"""The order API on a real socket over a real nats-server: one order per Idempotency-Key, the conflict
of a reused key, the order's state before any service ran, the probes and the OpenAPI document."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
import yaml

from engine.config import load_config
from engine.embedded import EmbeddedServer
from engine.errors import ConfigError
from handlers.api import DEFAULT_PORT, PORT_ENV, URL_ENV, sidecar
from handlers.api.run import sidecar_port
from handlers.api.server import OPENAPI_PATH
from tests.shop.api_support import api, api_shop, post_order, stream_messages
from tests.support import read


def _line(**changes: Any) -> dict[str, Any]:
    return {"customer_id": "c-1", "sku": f"sku-{uuid.uuid4().hex[:6]}", "qty": 2, "amount_cents": 2599, **changes}


def test_the_same_post_twice_places_one_order(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    app = api_shop(tmp_path, nats_server.url)
    key, line = str(uuid.uuid4()), _line()

    async def scenario() -> tuple[list[Any], Any, int]:
        async with api(app) as (_, client, _cfg):
            first = await post_order(client, key, line)
            again = await post_order(client, key, dict(reversed(line.items())))  # same line, other JSON
            other = await post_order(client, key, {**line, "qty": 3})
            async with client.get(first[2]["Location"]) as response:
                state = (response.status, await response.json())
            return [first, again, other], state, await stream_messages(app)

    (first, again, other), state, stored = asyncio.run(scenario())
    assert first[0] == again[0] == 202
    assert first[1] == again[1] == {"order_id": first[1]["order_id"], "status": "placed"}
    assert first[2]["Location"] == again[2]["Location"] == f"/orders/{first[1]['order_id']}"
    assert "Idempotent-Replayed" not in first[2] and again[2]["Idempotent-Replayed"] == "true"
    assert other[0] == 422
    assert other[1]["error"]["type"] == "idempotency_error"
    assert other[1]["error"]["param"] == "Idempotency-Key"
    placed = read(app, "OrderPlaced")
    assert stored == len(placed) == 1
    assert placed[0].aggregate_id == first[1]["order_id"]
    assert placed[0].data == {"order_id": first[1]["order_id"], **line}
    # No service has run: the order is known from its request, nothing else happened to it yet.
    assert state == (200, {"order_id": first[1]["order_id"], "status": "placed", "order": line, "payment": None,
                           "reservation": None, "ended_by": None})


def test_concurrent_posts_with_one_key_place_one_order(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    app = api_shop(tmp_path, nats_server.url)
    key, line = str(uuid.uuid4()), _line()

    async def scenario() -> list[tuple[int, Any, Any]]:
        async with api(app) as (_, client, _cfg):
            return list(await asyncio.gather(*(post_order(client, key, line) for _ in range(20))))

    answers = asyncio.run(scenario())
    assert {(status, body["order_id"]) for status, body, _ in answers} == {(202, answers[0][1]["order_id"])}
    assert sum(1 for *_, headers in answers if "Idempotent-Replayed" not in headers) == 1
    assert len(read(app, "OrderPlaced")) == 1


def test_unknown_and_malformed_order_ids(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    app = api_shop(tmp_path, nats_server.url)

    async def scenario() -> list[tuple[int, Any]]:
        answers = []
        async with api(app) as (_, client, _cfg):
            for path in ("/orders/o-nobody", "/orders/o.1", "/orders/%2A", "/orders/o-1?wait=31s",
                         "/orders/o-1?wait=soon", "/orders/" + "x" * 129):
                async with client.get(path) as response:
                    answers.append((response.status, await response.json()))
        return answers

    answers = asyncio.run(scenario())
    assert [status for status, _ in answers] == [404, 400, 400, 400, 400, 400]
    assert [body["error"].get("param") for _, body in answers] == ["order_id", "order_id", "order_id", "wait",
                                                                   "wait", "order_id"]


def test_probes_and_the_openapi_document(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    app = api_shop(tmp_path, nats_server.url)

    async def scenario() -> dict[str, Any]:
        async with api(app) as (_, client, _cfg):
            got: dict[str, Any] = {}
            for path in ("/health", "/ready"):
                async with client.get(path) as response:
                    got[path] = (response.status, await response.json())
            async with client.get("/openapi.yaml") as response:
                got["yaml"] = await response.read()
            async with client.get("/openapi.json") as response:
                got["json"] = await response.json()
            return got

    got = asyncio.run(scenario())
    assert got["/health"] == (200, {"status": "ok"})
    assert got["/ready"] == (200, {"status": "ready"})
    document = yaml.safe_load(OPENAPI_PATH.read_text())
    assert got["yaml"] == OPENAPI_PATH.read_bytes()
    assert got["json"] == document
    assert document["openapi"].startswith("3.1")  # its routes: tests/shop/unit/test_order_api_input.py


def test_the_sidecar_serves_on_the_configured_port_and_exports_its_url(tmp_path: Path,
                                                                       nats_server: EmbeddedServer) -> None:
    app = api_shop(tmp_path, nats_server.url)

    async def scenario() -> tuple[str, int, dict[str, str]]:
        env = {PORT_ENV: "0"}
        async with sidecar(load_config(app.path), env):
            url = env[URL_ENV]
            async with aiohttp.ClientSession() as client, client.get(f"{url}/health") as response:
                status = response.status
        return url, status, env

    url, status, env = asyncio.run(scenario())
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
    assert status == 200
    assert env == {PORT_ENV: "0"}  # the URL is gone with the sidecar
    assert sidecar_port({}) == DEFAULT_PORT == 8000
    with pytest.raises(ConfigError, match=PORT_ENV):
        sidecar_port({PORT_ENV: "http"})


def test_the_stage_before_the_end_is_read_from_the_payment(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    """Orders writes an order's record only when it ends: until then ``paid`` comes from the payment record,
    also over a record an earlier release wrote at ``placed`` (it recorded every stage)."""
    app = api_shop(tmp_path, nats_server.url)

    async def scenario() -> list[str]:
        async with api(app) as (_, client, _cfg):
            new = await post_order(client, str(uuid.uuid4()), _line())
            old = await post_order(client, str(uuid.uuid4()), _line())
            nc = await nats.connect(app.url)
            try:
                js = nc.jetstream()
                payments, orders = await js.key_value("payments"), await js.key_value("orders")
                for placed in (new, old):
                    await payments.put(placed[1]["order_id"], orjson.dumps(
                        {"status": "authorized", "charge_id": "ch_1", "reason": "", "amount_cents": 2599}))
                await orders.put(old[1]["order_id"], orjson.dumps(
                    {"status": "placed", "order": _line(), "applied": ["e1"], "terminal": None}))
            finally:
                await nc.close()
            statuses = []
            for placed in (new, old):
                async with client.get(placed[2]["Location"]) as response:
                    statuses.append((await response.json())["status"])
            return statuses

    assert asyncio.run(scenario()) == ["paid", "paid"]
