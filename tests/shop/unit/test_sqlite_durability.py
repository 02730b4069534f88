"""The shop's SQLite files are durable: a commit is on disk before it returns (synchronous=FULL)."""

from __future__ import annotations

from pathlib import Path

from handlers.audit_store import SqliteAuditStore

FULL = 2  # what PRAGMA synchronous reads back: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


def test_the_audit_store_commits_with_synchronous_full(tmp_path: Path) -> None:
    audit = SqliteAuditStore(tmp_path / "audit.db")  # (the gateway's ledger is in PostgreSQL now)
    try:
        db = audit._db  # the setting is per connection: read the one it writes with
        assert db.execute("PRAGMA synchronous").fetchone()[0] == FULL
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        audit.close()
