"""The order API for tests: the real aiohttp server in the test's event loop, on a free loopback port,
over a shop config of the test's own (its own stream and subject prefix) on the session's nats-server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import yaml

from engine.config import Config, load_config
from engine.runtime import provision_only
from handlers.api import serve
from tests.shop_support import write_shop_config
from tests.support import App


def api_shop(directory: Path, url: str, services: tuple[str, ...] | None = None) -> App:
    """The shop's config for this test, with only ``services`` (default: all), provisioned."""
    app = write_shop_config(directory, url, gateway={"latency_ms": 0, "jitter_ms": 0, "failure_rate": 0.0,
                                                     "decline_rate": 0.0})
    if services is not None:
        for name in [n for n in app.raw["services"] if n not in services]:
            del app.raw["services"][name]
        app.path.write_text(yaml.safe_dump(app.raw, sort_keys=False))
    return app


@contextlib.asynccontextmanager
async def api(app: App) -> AsyncIterator[tuple[str, aiohttp.ClientSession, Config]]:
    """Provision the app, serve the API on 127.0.0.1 (a free port); yield (base URL, a client session, config)."""
    cfg = load_config(app.path)
    await provision_only(cfg)
    async with serve(cfg, "127.0.0.1", 0) as url, aiohttp.ClientSession(base_url=url) as client:
        yield url, client, cfg


async def stream_messages(app: App) -> int:
    """How many messages the app's stream holds (every subject)."""
    nc = await nats.connect(app.url)
    try:
        info = await nc.jetstream().stream_info(app.stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def post_order(client: aiohttp.ClientSession, key: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    """POST /orders; (status, JSON body, headers)."""
    async with client.post("/orders", json=body, headers={"Idempotency-Key": key}) as response:
        return response.status, await response.json(), response.headers
