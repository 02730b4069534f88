"""The shop's SQLite files (the audit store, the gateway's ledger), opened one way."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating its directory) a SQLite file shared by several processes: WAL, autocommit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it returns, so a row whose event was acked survives a power loss
    # (NORMAL in WAL mode may lose the last commits).
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
