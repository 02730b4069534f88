"""Audit: store every event of the shop once, by event id, for ``jetpool audit ORDER_ID``.

A redelivered or duplicated event is inserted again and ignored by the store (same event id).

Settings: ``db_path`` (``.jetpool/audit.sqlite``) — the SQLite file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine import Context, Event
from handlers.audit_store import AuditRecord, SqliteAuditStore, open_store

DEFAULT_DB_PATH = ".jetpool/audit.sqlite"


async def record(event: Event, ctx: Context) -> None:
    """Any event → a row in the audit store; publishes nothing."""
    await store_for(ctx.settings).add(AuditRecord.from_event(event, ctx.stream_seq))


def store_for(settings: Mapping[str, Any]) -> SqliteAuditStore:
    """The audit store the service's settings name."""
    return open_store(str(settings.get("db_path", DEFAULT_DB_PATH)))


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
