"""Audit: store every event of the shop once, by event id, for ``jetpool audit ORDER_ID``.

A redelivered or duplicated event is inserted again and ignored by the store (same event id).

The store is the ``audit`` schema of the shop's PostgreSQL (:mod:`handlers.database`: the database
``JETPOOL_SHOP_DATABASE_URL`` names, or the embedded one the shop's commands start). Settings: none
needed; ``db_path`` (a SQLite file) keeps the trail in that file instead, for a single machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from engine import Context, Event
from handlers.audit_store import AuditRecord, AuditStore, open_store, shared_store
from handlers.database import configured_url

DEFAULT_DB_PATH = ".jetpool/audit.sqlite"  # the SQLite file's usual place, for a config that wants one


async def record(event: Event, ctx: Context) -> None:
    """Any event → a row in the audit store; publishes nothing."""
    store = await store_for(ctx.settings)
    await store.add(AuditRecord.from_event(event, ctx.stream_seq))


_last: tuple[Mapping[str, Any], str | None, asyncio.AbstractEventLoop, AuditStore] | None = None


async def store_for(settings: Mapping[str, Any]) -> AuditStore:
    """The audit store the service's settings name: this process's PostgreSQL store, or a SQLite file.

    Called per event with the service's own settings mapping: the same mapping, configured database
    and loop as the last call answer at once (finding the shared database costs a chain of coroutines
    and was a tenth of the audit worker's time). A service's settings are never changed in place. Without
    a configured database (the embedded server's address is read from its data directory, and may move
    when it restarts) every call looks it up, as before.
    """
    global _last
    configured, loop = configured_url(), asyncio.get_running_loop()
    last = _last
    if last is not None and last[0] is settings and last[1] == configured and last[2] is loop:
        return last[3]
    store = open_store(str(settings["db_path"])) if "db_path" in settings else await shared_store()
    if configured is not None or "db_path" in settings:
        _last = (settings, configured, loop, store)
    return store


def describe(record: AuditRecord) -> str:
    """The key data of an event, in one short line."""
    data = record.data
    parts = [f"{name}={data[name]}" for name in ("sku", "qty") if record.type == "OrderPlaced" and name in data]
    if record.type == "OrderPlaced" and "amount_cents" in data:
        parts.append(f"amount={data['amount_cents'] / 100:.2f}")
    for name in ("charge_id", "refund_id", "reason", "template", "channel"):
        if data.get(name):
            parts.append(f"{name}={data[name]}")
    if record.type in ("StockReserved", "OutOfStock"):
        parts.append(f"sku={data.get('sku')} qty={data.get('qty')}")
    return " ".join(parts)
