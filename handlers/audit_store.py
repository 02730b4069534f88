"""The audit store: every event once, by event id, queryable per order. One small interface, PostgreSQL inside.

:class:`AuditStore` is what the audit handler and ``jetpool audit`` need. :class:`PostgresAuditStore`
is the shop's: one append-only table, ``audit.events``, keyed by event id, that any number of audit
workers and pods write at once (``INSERT ... ON CONFLICT DO NOTHING``: a redelivered event is stored
once). :class:`SqliteAuditStore` keeps the same trail in a local SQLite file, for a config that names
a ``db_path``.

Writes are group-committed (:mod:`handlers.group_commit`): ``add`` queues the record and waits; one
writer commits whatever queued up while the previous commit ran, in one transaction. Under load that
is one commit for hundreds of events, and the handler still returns only after its row is stored. A
record the database refuses fails its own ``add`` alone: the group is then written record by record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from engine.events import Event
from handlers.database import Database, refused_data, shared
from handlers.group_commit import GroupCommit
from handlers.saga import PRODUCERS
from handlers.schemas import AUDIT_SCHEMA
from handlers.sqlite import open_db


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored event.

    Attributes:
        event_id: the event's id (the store keeps one row per id).
        order_id: the aggregate the event is about.
        type: the event type.
        service: the service that produced it.
        timestamp: when it was produced (RFC 3339, UTC).
        stream_seq: its stream sequence (orders events published in the same millisecond).
        data: the payload.
    """

    event_id: str
    order_id: str
    type: str
    service: str
    timestamp: str
    stream_seq: int
    data: dict[str, Any]

    @classmethod
    def from_event(cls, event: Event, stream_seq: int = 0) -> AuditRecord:
        return cls(event.id, event.aggregate_id or str(event.data.get("order_id", "")), event.type,
                   PRODUCERS.get(event.type, "unknown"), event.timestamp, stream_seq, event.data)


class AuditStore(Protocol):
    """Where audit records live."""

    async def add(self, record: AuditRecord) -> None:
        """Store a record unless its event id is already stored; return once it is durable."""
        ...

    async def add_many(self, records: Sequence[AuditRecord]) -> None:
        """Store many records (same rule), e.g. when rebuilding from the stream."""
        ...

    async def timeline(self, order_id: str) -> list[AuditRecord]:
        """An order's records, oldest first."""
        ...

    async def count(self, order_prefix: str = "") -> int:
        """How many records (distinct events) are stored, of orders whose id starts with ``order_prefix``."""
        ...


# A group in one statement (one round trip, all or nothing), its rows in event id order: two writers whose
# groups overlap lock the same rows in the same order.
_PG_INSERT = """INSERT INTO audit.events (event_id, order_id, type, service, occurred_at, timestamp, stream_seq, data)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                         $7::bigint[], $8::jsonb[]) ORDER BY 1
    ON CONFLICT (event_id) DO NOTHING"""
_PG_COLUMNS = "event_id, order_id, type, service, timestamp, stream_seq, data::text"


class PostgresAuditStore:
    """An :class:`AuditStore` in the ``audit`` schema of the shop's PostgreSQL.

    Args:
        db: the shop's database (its pool; the ``audit`` schema is migrated here if it is not yet).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._commits: GroupCommit[AuditRecord, None] = GroupCommit(self._insert_group, alone=refused_data)

    @classmethod
    async def open(cls, dsn: str) -> PostgresAuditStore:
        """A store on a pool of its own (for a command; close it after use)."""
        return cls(await Database.open(dsn, [AUDIT_SCHEMA], max_size=2))

    async def add(self, record: AuditRecord) -> None:
        await self._commits.submit(record)

    async def add_many(self, records: Sequence[AuditRecord]) -> None:
        await self._insert(list(records))

    async def timeline(self, order_id: str) -> list[AuditRecord]:
        rows = await self.db.pool.fetch(
            f"SELECT {_PG_COLUMNS} FROM audit.events WHERE order_id = $1 "
            "ORDER BY occurred_at, stream_seq, event_id", order_id)
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], int(r[5]), orjson.loads(r[6])) for r in rows]

    async def count(self, order_prefix: str = "") -> int:
        return int(await self.db.pool.fetchval(
            "SELECT count(*) FROM audit.events WHERE starts_with(order_id, $1)", order_prefix))

    async def close(self) -> None:
        await self.db.close()

    async def _insert_group(self, records: list[AuditRecord]) -> list[None]:
        await self._insert(records)
        return [None] * len(records)

    async def _insert(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        rows = [(r.event_id, r.order_id, r.type, r.service, datetime.fromisoformat(r.timestamp), r.timestamp,
                 r.stream_seq, orjson.dumps(r.data).decode()) for r in records]
        await self.db.pool.execute(_PG_INSERT, *(list(column) for column in zip(*rows, strict=True)))


_pg_stores: dict[Database, PostgresAuditStore] = {}


async def shared_store() -> PostgresAuditStore:
    """This process's PostgreSQL store (on the shared pool; looked up per event, so cheap)."""
    db = await shared([AUDIT_SCHEMA])
    store = _pg_stores.get(db)
    if store is None:
        store = _pg_stores[db] = PostgresAuditStore(db)
    return store


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, type TEXT NOT NULL, service TEXT NOT NULL,
    timestamp TEXT NOT NULL, stream_seq INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_order ON events(order_id, timestamp, stream_seq);
"""
_INSERT = "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?)"


class SqliteAuditStore:
    """An :class:`AuditStore` in a SQLite file.

    Args:
        path: the database file (created with its directory if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_db(self.path, _SCHEMA)
        # One thread owns the connection: statements never run concurrently, nor on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sqlite")
        self._commits: GroupCommit[AuditRecord, None] = GroupCommit(self._insert_group)

    async def add(self, record: AuditRecord) -> None:
        await self._commits.submit(record)

    async def add_many(self, records: Sequence[AuditRecord]) -> None:
        await self._run(self._insert, list(records))

    async def timeline(self, order_id: str) -> list[AuditRecord]:
        rows = await self._run(self._select, order_id)
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], int(r[5]), orjson.loads(r[6])) for r in rows]

    async def count(self, order_prefix: str = "") -> int:
        query = "SELECT COUNT(*) FROM events WHERE substr(order_id, 1, ?) = ?"
        row = await self._run(lambda: self._db.execute(query, (len(order_prefix), order_prefix)).fetchone())
        return int(row[0])

    async def clear(self) -> None:
        await self._run(lambda: self._db.execute("DELETE FROM events"))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._db.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _insert_group(self, records: list[AuditRecord]) -> list[None]:
        await self._run(self._insert, records)
        return [None] * len(records)

    def _insert(self, records: list[AuditRecord]) -> None:
        rows = [(r.event_id, r.order_id, r.type, r.service, r.timestamp, r.stream_seq, orjson.dumps(r.data).decode())
                for r in records]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _select(self, order_id: str) -> list[Any]:
        return self._db.execute(
            "SELECT * FROM events WHERE order_id = ? ORDER BY timestamp, stream_seq", (order_id,)).fetchall()


_stores: dict[str, SqliteAuditStore] = {}


def open_store(path: str | Path) -> SqliteAuditStore:
    """The process's store for ``path`` (opened once, then reused; looked up per event, so cheap)."""
    store = _stores.get(str(path))
    if store is None:
        resolved = str(Path(path).resolve())
        store = _stores.get(resolved) or SqliteAuditStore(path)
        _stores[str(path)] = _stores[resolved] = store
    return store
