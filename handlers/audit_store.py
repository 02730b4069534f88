"""The audit store: every event once, by event id, queryable per order. One small interface, SQLite inside.

:class:`AuditStore` is what the audit handler and ``jetpool audit`` need; :class:`SqliteAuditStore`
implements it on an embedded SQLite file (WAL mode, so several audit workers and a reader can share
it). A PostgreSQL store for many replicas would implement the same five methods.

Writes are group-committed: ``add`` queues the record and waits; one writer thread commits whatever
queued up while the previous commit ran, in one transaction. Under load that is one commit for
hundreds of events, and the handler still returns only after its row is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from engine.events import Event
from handlers.saga import PRODUCERS
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

    async def clear(self) -> None:
        """Delete every record (before a rebuild)."""
        ...


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
        self._queue: list[tuple[AuditRecord, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, record: AuditRecord) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((record, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_queued())
        await done

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

    async def _write_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._run(self._insert, [record for record, _ in batch])
            except Exception:
                # One record the store refuses must not fail the others of its group: each alone, then.
                for record, done in batch:
                    await self._write_one(record, done)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _write_one(self, record: AuditRecord, done: asyncio.Future[None]) -> None:
        try:
            await self._run(self._insert, [record])
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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
