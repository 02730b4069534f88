"""The audit store on PostgreSQL (a real embedded server, a database per test) and the shop's database module."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest

from handlers import audit
from handlers.audit_store import AuditRecord, PostgresAuditStore
from handlers.database import DATABASE_URL_ENV, Database, EmbeddedPostgres, provision, shop_database
from handlers.saga import Order
from handlers.schemas import AUDIT_SCHEMA, Schema
from tests.shop_support import context, order_placed

T = TypeVar("T")


def with_store(dsn: str, work: Callable[[PostgresAuditStore], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await PostgresAuditStore.open(dsn)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def test_an_event_is_stored_once_however_often_it_comes(shop_dsn: str) -> None:
    placed = order_placed(order_id="o-once")
    authorized = Order.from_event(placed).event("PaymentAuthorized", charge_id="ch_1")

    async def work(store: PostgresAuditStore) -> tuple[int, list[AuditRecord]]:
        for event in (placed, authorized, placed, authorized, placed):
            await store.add(AuditRecord.from_event(event, 7))
        await asyncio.gather(*(store.add(AuditRecord.from_event(placed)) for _ in range(20)))  # one group
        await store.add_many([AuditRecord.from_event(placed), AuditRecord.from_event(authorized)])  # a rebuild
        return await store.count(), await store.timeline("o-once")

    count, timeline = with_store(shop_dsn, work)
    assert count == 2
    assert [(r.event_id, r.type, r.service, r.stream_seq) for r in timeline] == [
        (placed.id, "OrderPlaced", "storefront", 7), (authorized.id, "PaymentAuthorized", "payments", 7)]
    assert timeline[0].data == placed.data and timeline[0].timestamp == placed.timestamp  # as the event said


def test_concurrent_adds_are_committed_in_groups(shop_dsn: str) -> None:
    events = [order_placed(order_id="o-group") for _ in range(300)]
    writes: list[int] = []

    async def work(store: PostgresAuditStore) -> int:
        insert = store._insert

        async def counting(records: list[AuditRecord]) -> list[None]:
            writes.append(len(records))
            await insert(records)
            return [None] * len(records)

        store._commits._write = counting
        await asyncio.gather(*(store.add(AuditRecord.from_event(e, i)) for i, e in enumerate(events)))
        return int(await store.count("o-group"))

    assert with_store(shop_dsn, work) == 300
    assert sum(writes) == 300 and len(writes) <= 3, writes  # one transaction for what queued up together


def test_a_record_the_database_refuses_fails_alone_not_its_whole_group(shop_dsn: str) -> None:
    """PostgreSQL refuses a NUL character in jsonb: that add fails; the 20 others of its group are stored."""
    good = [order_placed(order_id=f"o-{i}") for i in range(20)]
    bad = order_placed(order_id="o-bad")
    bad.data["note"] = "nul\u0000byte"

    async def work(store: PostgresAuditStore) -> tuple[list[BaseException | None], int]:
        adds = [store.add(AuditRecord.from_event(e, i)) for i, e in enumerate([*good[:10], bad, *good[10:]])]
        results = await asyncio.gather(*adds, return_exceptions=True)
        return results, await store.count()

    results, count = with_store(shop_dsn, work)
    assert [r is None for r in results] == [True] * 10 + [False] + [True] * 10
    assert isinstance(results[10], asyncpg.PostgresError)
    assert count == 20


def test_the_timeline_is_ordered_by_time_then_stream_sequence(shop_dsn: str) -> None:
    placed = order_placed(order_id="o-time")
    order = Order.from_event(placed)
    later = order.event("OrderConfirmed", reason="")
    same_ms_a, same_ms_b = order.event("PaymentAuthorized", charge_id="c"), order.event("StockReserved", sku="s", qty=1)
    placed.timestamp, later.timestamp = "2026-12-01T10:00:00.000Z", "2026-12-01T10:00:02.500Z"
    same_ms_a.timestamp = same_ms_b.timestamp = "2026-12-01T10:00:01.000Z"
    records = [AuditRecord.from_event(later, 4), AuditRecord.from_event(same_ms_b, 3),
               AuditRecord.from_event(same_ms_a, 2), AuditRecord.from_event(placed, 1)]

    async def work(store: PostgresAuditStore) -> list[str]:
        await asyncio.gather(*(store.add(r) for r in records))
        return [r.type for r in await store.timeline("o-time")]

    assert with_store(shop_dsn, work) == ["OrderPlaced", "PaymentAuthorized", "StockReserved", "OrderConfirmed"]


def test_count_takes_the_prefix_literally(shop_dsn: str) -> None:
    ids = ["run_1-a", "run_1-b", "runX1-c", "run%-d", "other"]

    async def work(store: PostgresAuditStore) -> list[int]:
        await store.add_many([AuditRecord.from_event(order_placed(order_id=oid)) for oid in ids])
        return [await store.count(p) for p in ("", "run_1-", "run%", "nothing")]

    assert with_store(shop_dsn, work) == [5, 2, 1, 0]  # "_" and "%" are not wildcards


def test_migrations_apply_once_even_when_provisioning_runs_concurrently(shop_dsn: str) -> None:
    extra = Schema("audit_extra", ("CREATE TABLE audit_extra.t (x int)", "ALTER TABLE audit_extra.t ADD y int"))

    async def go() -> list[list[tuple[str, int]]]:
        return list(await asyncio.gather(*(provision(shop_dsn, [AUDIT_SCHEMA, extra]) for _ in range(6))))

    runs = asyncio.run(go())
    assert sorted(v for run in runs for v in run) == [("audit", 1), ("audit_extra", 1), ("audit_extra", 2)]
    assert asyncio.run(provision(shop_dsn, [AUDIT_SCHEMA, extra])) == []


def test_the_audit_handler_writes_to_the_database_the_environment_names(
        shop_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, shop_dsn)
    placed = order_placed(order_id="o-handler")
    ctx = context("audit", settings={})

    async def go() -> None:
        await asyncio.gather(*(audit.record(placed, ctx) for _ in range(5)))

    asyncio.run(go())
    assert with_store(shop_dsn, lambda store: store.count("o-handler")) == 1


def test_a_second_start_on_the_same_data_dir_attaches_and_leaves_the_server_alone(
        shop_postgres: EmbeddedPostgres) -> None:
    again = EmbeddedPostgres(shop_postgres.data_dir).start()
    assert (again.owned, again.pid, again.dsn) == (False, shop_postgres.pid, shop_postgres.dsn)
    again.stop()
    assert shop_postgres.running() is not None


def test_shop_database_starts_exports_and_stops_an_embedded_server() -> None:
    base = Path(tempfile.mkdtemp(prefix="jetpool-pg-"))
    base.chmod(0o755)  # as root the server runs unprivileged: it must reach its directory
    env: dict[str, str] = {}
    data_dir = base / "pg"

    async def go() -> tuple[int, str]:
        async with shop_database(data_dir, env=env) as dsn:
            assert env[DATABASE_URL_ENV] == dsn
            conn = await asyncpg.connect(dsn)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM audit.events")), dsn
            finally:
                await conn.close()

    try:
        rows, dsn = asyncio.run(go())
        assert rows == 0 and str(data_dir) in dsn
        assert env == {} and EmbeddedPostgres(data_dir).running() is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_shop_database_uses_a_configured_dsn_and_starts_nothing(shop_dsn: str, tmp_path: Path) -> None:
    env = {DATABASE_URL_ENV: shop_dsn}

    async def go() -> str:
        async with shop_database(tmp_path / "unused", env=env) as dsn:
            return dsn

    assert asyncio.run(go()) == shop_dsn
    assert not (tmp_path / "unused").exists() and env == {DATABASE_URL_ENV: shop_dsn}
    assert with_store(shop_dsn, lambda store: store.count()) == 0  # provisioned: the table is there


def test_a_connection_given_back_in_a_transaction_is_rolled_back_and_others_keep_nothing(shop_dsn: str) -> None:
    """The pool skips asyncpg's reset round trip on release, except for a connection still in a transaction."""
    async def go() -> tuple[bool, int]:
        db = await Database.open(shop_dsn, [AUDIT_SCHEMA], max_size=1)
        try:
            async with db.pool.acquire() as conn:
                await conn.execute("CREATE TABLE IF NOT EXISTS audit.reset_probe (n int)")
                left_open = conn.transaction()
                await left_open.start()
                await conn.execute("INSERT INTO audit.reset_probe VALUES (1)")
            async with db.pool.acquire() as conn:  # the same connection: the pool has one
                in_transaction = conn.is_in_transaction()
                rows = int(await conn.fetchval("SELECT count(*) FROM audit.reset_probe"))
            return in_transaction, rows
        finally:
            await db.close()

    assert asyncio.run(go()) == (False, 0)
