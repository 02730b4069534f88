"""The payment gateway for tests: in this test's event loop, or as its own process stopped by PID.

Both are the real aiohttp service on a random loopback port over a real ledger (the session's embedded
PostgreSQL, a database per test: see tests/shop_database.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson

from handlers.database import EmbeddedPostgres
from handlers.gateway.faults import Faults
from handlers.gateway.ledger import Ledger
from handlers.gateway.process import GatewayProcess
from handlers.gateway.server import running

QUIET = {"latency_ms": 0.0, "jitter_ms": 0.0}


@contextlib.asynccontextmanager
async def local_gateway(dsn: str, **faults: Any) -> AsyncIterator[str]:
    """The gateway in this event loop on 127.0.0.1 (a free port), its ledger at ``dsn``; yield its URL."""
    ledger = await Ledger.open(dsn)
    try:
        async with running(ledger, Faults.from_settings({**QUIET, **faults})) as url:
            yield url
    finally:
        await ledger.close()


@contextlib.contextmanager
def gateway_process(dsn: str, config: Path | None = None, log_path: Path | None = None) -> Iterator[str]:
    """``python -m handlers.gateway`` on a free loopback port (faults from ``config``); yield its URL.

    Stopped by PID in teardown: SIGTERM, then SIGKILL.
    """
    gateway = GatewayProcess(dsn, config, log_path).start()
    try:
        yield gateway.url
    finally:
        gateway.stop()


def set_faults(url: str, **faults: Any) -> None:
    """``POST /admin/faults`` from a synchronous test."""
    request = urllib.request.Request(f"{url}/admin/faults", data=orjson.dumps(faults), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def ledger_rows(dsn: str, table: str) -> list[dict[str, Any]]:
    """Every row of ``ledger.<table>`` (``charges``, ``refunds``, ``idempotency_keys``)."""
    assert table in {"charges", "refunds", "idempotency_keys"}
    return [dict(r) for r in asyncio.run(_fetch(dsn, f"SELECT * FROM ledger.{table}"))]


@contextlib.contextmanager
def threaded_gateway(dsn: str, **faults: Any) -> Iterator[str]:
    """The gateway on its own event loop in a thread of this process, for synchronous tests; yield its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway", daemon=True)
    thread.start()
    serving = local_gateway(dsn, **faults)
    try:
        yield asyncio.run_coroutine_threadsafe(serving.__aenter__(), loop).result(timeout=30)
    finally:
        asyncio.run_coroutine_threadsafe(serving.__aexit__(None, None, None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextlib.contextmanager
def database_on(server: EmbeddedPostgres) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL (for module-scoped fixtures); dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_fetch(server.dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield server.dsn.replace("@/postgres?", f"@/{name}?")
    finally:
        asyncio.run(_fetch(server.dsn, f'DROP DATABASE "{name}" WITH (FORCE)'))
