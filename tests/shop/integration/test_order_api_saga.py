"""Orders placed through the API, run by the shop's real services (orders, payments, inventory processes,
the gateway service): ``GET /orders/{id}?wait=`` answers each order's end, confirmed or cancelled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.embedded import EmbeddedServer
from handlers.gateway import GATEWAY_URL_ENV
from tests.shop.api_support import api, api_shop, post_order
from tests.shop.gateway_support import gateway_process
from tests.shop_support import seed_stock
from tests.support import Engine


def test_wait_answers_the_end_of_each_order(tmp_path: Path, nats_server: EmbeddedServer, shop_dsn: str,
                                            engine: Callable[..., Engine]) -> None:
    app = api_shop(tmp_path, nats_server.url, services=("orders", "payments", "inventory"))
    uid = uuid.uuid4().hex[:8]
    stocked, scarce = f"sku-{uid}-a", f"sku-{uid}-b"

    async def scenario() -> list[tuple[int, Any]]:
        async with api(app) as (_, client, _cfg):
            await seed_stock(app.url, {stocked: 5, scarce: 0})
            ids = []
            for sku in (stocked, scarce):
                status, body, _ = await post_order(client, str(uuid.uuid4()),
                                                   {"customer_id": "c-9", "sku": sku, "qty": 2, "amount_cents": 1500})
                assert status == 202
                ids.append(body["order_id"])

            async def waited(order_id: str) -> tuple[int, Any]:
                async with client.get(f"/orders/{order_id}", params={"wait": "30s"}) as response:
                    return response.status, await response.json()

            return list(await asyncio.gather(*(waited(order_id) for order_id in ids)))

    with gateway_process(shop_dsn, app.path, tmp_path / "gateway.log") as gateway:
        engine(app, env={GATEWAY_URL_ENV: gateway, "JETPOOL_HTTP_PORT": "0"})
        (ok_status, confirmed), (cancel_status, cancelled) = asyncio.run(scenario())

    assert ok_status == cancel_status == 200
    assert confirmed["status"] == "confirmed"
    assert confirmed["payment"]["status"] == "authorized" and confirmed["payment"]["charge_id"]
    assert confirmed["reservation"] == {"status": "reserved"}
    assert confirmed["ended_by"]["event"] == "OrderConfirmed"
    assert cancelled["status"] == "cancelled"
    assert cancelled["payment"]["status"] == "refunded" and cancelled["payment"]["refund_id"]
    assert cancelled["reservation"] == {"status": "out_of_stock"}
    assert cancelled["ended_by"]["event"] == "OrderCancelled" and cancelled["ended_by"]["cause_event_id"]
    assert cancelled["ended_by"]["reason"] == "out of stock (payment refunded)"
