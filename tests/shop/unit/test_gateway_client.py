"""The payments worker's gateway clients: one per settings and event loop, found again without rebuilding."""

from __future__ import annotations

import asyncio

from handlers import gateway as gw

A = {"url": "http://127.0.0.1:9"}
B = {"url": "http://127.0.0.1:9", "timeout_s": 2}


def test_one_client_per_settings_and_loop_reused_until_closed() -> None:
    async def run() -> gw.GatewayClient:
        first = gw.gateway_for(A, env={})
        assert gw.gateway_for(A, env={}) is first
        assert gw.gateway_for(dict(A), env={}) is first  # an equal mapping: the same client
        other = gw.gateway_for(B, env={})
        assert other is not first and other._timeout.total == 2
        assert gw.gateway_for(A, env={}) is first
        moved = gw.gateway_for(A, env={gw.GATEWAY_URL_ENV: "http://127.0.0.1:10"})
        assert moved.url == "http://127.0.0.1:10" and gw.gateway_for(A, env={}) is first
        await gw.close_clients()
        fresh = gw.gateway_for(A, env={})
        assert fresh is not first
        await gw.close_clients()
        return fresh

    earlier = asyncio.run(run())

    async def in_another_loop() -> gw.GatewayClient:
        try:
            return gw.gateway_for(A, env={})
        finally:
            await gw.close_clients()

    assert asyncio.run(in_another_loop()) is not earlier  # an aiohttp session belongs to its loop
