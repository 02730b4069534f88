"""Audit (every event once, per-order timeline) and notifications. The gateway's ledger: tests/shop/."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from handlers import audit, audit_store, notifications
from handlers.audit_store import AuditRecord, AuditStore, SqliteAuditStore
from handlers.database import DATABASE_URL_ENV
from handlers.saga import Order
from tests.shop_support import context, order_placed


def test_the_audit_handler_stores_each_event_once(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"
    ctx = context("audit", settings={"db_path": str(db)})
    placed = order_placed()
    authorized = Order.from_event(placed).event("PaymentAuthorized", charge_id="ch_1")

    async def go() -> None:
        for event in (placed, authorized, placed, authorized, placed):
            await audit.record(event, ctx)

    asyncio.run(go())
    rows = sqlite3.connect(db).execute("SELECT event_id, type, service FROM events ORDER BY rowid").fetchall()
    assert rows == [(placed.id, "OrderPlaced", "storefront"), (authorized.id, "PaymentAuthorized", "payments")]


def test_concurrent_adds_are_group_committed_and_readable(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "a.sqlite")
    events = [order_placed(order_id="o-same") for _ in range(200)]

    async def go() -> list[AuditRecord]:
        await asyncio.gather(*(store.add(AuditRecord.from_event(e, i)) for i, e in enumerate(events)))
        await store.add_many([AuditRecord.from_event(e) for e in events[:50]])  # replays are ignored
        assert await store.count() == 200
        return await store.timeline("o-same")

    timeline = asyncio.run(go())
    assert [r.event_id for r in timeline] == [e.id for e in events]  # by time, then stream sequence
    assert timeline[0].data == events[0].data
    asyncio.run(store.clear())
    assert asyncio.run(store.count()) == 0
    store.close()


def test_a_record_the_store_refuses_fails_alone_not_its_whole_group(tmp_path: Path) -> None:
    """A record that cannot be written (here: data orjson cannot encode, 300 levels deep) fails its
    own add; the other records committed in the same group are stored."""
    store = SqliteAuditStore(tmp_path / "a.sqlite")
    good = [order_placed(order_id=f"o-{i}") for i in range(20)]
    deep: object = []
    for _ in range(300):
        deep = [deep]
    bad = order_placed(order_id="o-bad")
    bad.data["nested"] = deep

    async def go() -> list[BaseException | None]:
        adds = [store.add(AuditRecord.from_event(e, i)) for i, e in enumerate([*good[:10], bad, *good[10:]])]
        return await asyncio.gather(*adds, return_exceptions=True)

    results = asyncio.run(go())
    assert [r is None for r in results] == [True] * 10 + [False] + [True] * 10
    assert asyncio.run(store.count()) == 20
    store.close()


def test_describe_shows_the_key_data() -> None:
    placed = order_placed(sku="mug", qty=2, amount_cents=1250)
    assert audit.describe(AuditRecord.from_event(placed)) == "sku=mug qty=2 amount=12.50"
    declined = Order.from_event(placed).event("PaymentDeclined", reason="card declined")
    assert audit.describe(AuditRecord.from_event(declined)) == "reason=card declined"


def test_notifications_answer_the_same_for_the_same_event() -> None:
    placed = order_placed()
    confirmed = Order.from_event(placed).event("OrderConfirmed", reason="")
    cancelled = Order.from_event(placed).event("OrderCancelled", reason="out of stock")
    ctx = context("notifications")
    first = asyncio.run(notifications.notify(confirmed, ctx))
    again = asyncio.run(notifications.notify(confirmed, ctx))
    assert first.type == "NotificationSent" and first.data == again.data
    assert first.data["template"] == "order_confirmed" and first.data["idempotency_key"] == confirmed.id
    assert asyncio.run(notifications.notify(cancelled, ctx)).data["template"] == "order_cancelled"


def test_the_store_is_found_once_per_settings_mapping_and_loop(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Per event, the service's own settings answer from the last lookup; other settings, a new loop: looked up."""
    a = {"db_path": str(tmp_path / "a.sqlite")}
    b = {"db_path": str(tmp_path / "b.sqlite")}
    monkeypatch.setattr(audit, "_last", None)  # restored afterwards: no loop of this test stays behind
    lookups: list[str] = []
    open_store = audit_store.open_store

    def counted(path: str) -> AuditStore:
        lookups.append(Path(path).name)
        return open_store(path)

    monkeypatch.setattr(audit, "open_store", counted)

    async def go() -> None:
        first = await audit.store_for(a)
        assert await audit.store_for(a) is first
        other = await audit.store_for(b)
        assert isinstance(other, SqliteAuditStore) and other.path == Path(b["db_path"])
        assert await audit.store_for(a) is first  # the process's store for that file

    asyncio.run(go())
    assert lookups == ["a.sqlite", "b.sqlite", "a.sqlite"]
    asyncio.run(go())  # a new loop: the last loop's answer is not reused
    assert lookups == ["a.sqlite", "b.sqlite", "a.sqlite"] * 2


def test_without_a_configured_database_the_shared_store_is_looked_up_each_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded server's address comes from its data directory and may move when it restarts: only a
    configured DSN is remembered."""
    monkeypatch.setattr(audit, "_last", None)
    lookups: list[int] = []
    store = SqliteAuditStore.__new__(SqliteAuditStore)  # a stand-in: never used, only handed back

    async def shared_store() -> AuditStore:
        lookups.append(1)
        return store

    monkeypatch.setattr(audit, "shared_store", shared_store)
    settings: dict[str, str] = {}

    async def twice() -> None:
        assert await audit.store_for(settings) is store
        assert await audit.store_for(settings) is store

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    asyncio.run(twice())
    assert len(lookups) == 2
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://127.0.0.1:1/shop")
    asyncio.run(twice())
    assert len(lookups) == 3
