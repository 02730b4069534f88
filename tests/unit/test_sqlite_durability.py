"""The shop's SQLite files are durable: a commit is on disk before it returns (synchronous=FULL)."""

from __future__ import annotations

from pathlib import Path

from handlers.audit_store import SqliteAuditStore
from handlers.gateway import SqliteLedger

FULL = 2  # what PRAGMA synchronous reads back: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


def test_the_audit_store_and_the_ledger_commit_with_synchronous_full(tmp_path: Path) -> None:
    audit, ledger = SqliteAuditStore(tmp_path / "audit.db"), SqliteLedger(tmp_path / "ledger.db")
    try:
        for db in (audit._db, ledger._db):  # the setting is per connection: read the one they write with
            assert db.execute("PRAGMA synchronous").fetchone()[0] == FULL
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        audit.close()
        ledger.close()
