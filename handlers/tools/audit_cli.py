"""``jetpool audit``: an order's timeline from the audit store, and rebuilding the store from the stream.

The store is the shop's PostgreSQL (``JETPOOL_SHOP_DATABASE_URL``, else the embedded server, started
for the command if none runs), or the SQLite file a ``db_path`` setting of the service that routes
events to ``handlers.audit:record`` names. Rebuilding replays every stored event of the stream (from
the first one the stream still holds: with ``max_age_s`` set, older events are gone) into the store as
it is: an event already stored is skipped, so a rebuild never empties the store nor doubles a row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
from nats.js import api
from rich.console import Console
from rich.table import Table

from engine.config import Config
from engine.connection import connect, redact_url
from engine.errors import ConfigError, MalformedEvent
from engine.events import Event, check_subject
from handlers.audit import describe
from handlers.audit_store import AuditRecord, AuditStore, PostgresAuditStore, SqliteAuditStore
from handlers.database import DatabaseError, database_url, shop_database
from handlers.gateway import GATEWAY_URL_ENV
from handlers.schemas import AUDIT_SCHEMA

AUDIT_HANDLER = "handlers.audit:record"
_BATCH = 1000


def audit_service(cfg: Config) -> str:
    """The service that feeds the audit store."""
    for name, svc in cfg.services.items():
        if AUDIT_HANDLER in svc.routes.values():
            return name
    raise ConfigError(f"{cfg.source}: no service routes events to {AUDIT_HANDLER}")


@contextlib.asynccontextmanager
async def open_audit_store(cfg: Config, start: bool = True) -> AsyncIterator[tuple[AuditStore, str]]:
    """The audit store the config's audit service writes to, and where it is (for messages).

    Args:
        cfg: the shop's config.
        start: start the embedded PostgreSQL if no database is configured or running; if False, raise
            :class:`DatabaseError` instead (and when a ``db_path`` file does not exist).
    """
    settings = cfg.services[audit_service(cfg)].settings
    if "db_path" in settings:
        path = Path(str(settings["db_path"]))
        if not start and not path.exists():
            raise DatabaseError(f"the audit store {path} is not on this machine")
        sqlite = SqliteAuditStore(path)
        try:
            yield sqlite, str(sqlite.path)
        finally:
            sqlite.close()
        return
    async with contextlib.AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(shop_database(schemas=[AUDIT_SCHEMA])) if start else database_url()
        store = await PostgresAuditStore.open(dsn)
        try:
            yield store, f"audit.events of {redact_url(dsn)}"
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def shop_database_for(cfg: Config) -> AsyncIterator[None]:
    """Around a command that runs the shop: its database, when its audit service writes to PostgreSQL or
    the payment gateway is started here (no ``JETPOOL_SHOP_GATEWAY_URL``: its ledger is in the database).

    Starts the embedded server unless ``JETPOOL_SHOP_DATABASE_URL`` is set, provisions the schemas and
    exports the DSN to the processes started inside; stops the server it started at exit.
    """
    try:
        audit_in_postgres = "db_path" not in cfg.services[audit_service(cfg)].settings
    except ConfigError:
        audit_in_postgres = False  # no audit service
    gateway_here = not os.environ.get(GATEWAY_URL_ENV)
    if not (audit_in_postgres or gateway_here):
        yield
        return
    async with shop_database():
        yield


def timeline_table(order_id: str, records: list[AuditRecord]) -> Table:
    """A rich table: time, service, event, key data."""
    table = Table(title=f"Audit timeline of order {order_id}", title_justify="left")
    for column in ("time (UTC)", "service", "event", "key data"):
        table.add_column(column)
    for r in records:
        table.add_row(_clock(r.timestamp), r.service, r.type, describe(r))
    return table


def _clock(timestamp: str) -> str:
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).strftime("%H:%M:%S.%f")[:-3]
    return timestamp


async def show_timeline(cfg: Config, order_id: str, console: Console | None = None) -> int:
    """Print an order's timeline; exit code 1 if the store knows nothing about it."""
    console = console or Console()
    async with open_audit_store(cfg) as (store, where):
        records = await store.timeline(order_id)
    if not records:
        console.print(f"no audit records for order {order_id!r} in {where}")
        return 1
    console.print(timeline_table(order_id, records))
    return 0


async def rebuild(cfg: Config, console: Console | None = None) -> int:
    """Replay every audited event the stream holds into the store; the ones already stored are skipped."""
    console = console or Console()
    service = audit_service(cfg)
    svc = cfg.services[service]
    audited = set(svc.routes)
    async with open_audit_store(cfg) as (store, where):
        before = await store.count()
        nc = await connect(cfg.nats, name=f"{cfg.app}.audit-rebuild")
        try:
            stored = await _replay(nc.jetstream(), svc.stream, f"{cfg.subject_prefix}.>", audited, store)
        finally:
            await nc.close()
        total = await store.count()
    console.print(f"audit store {where} rebuilt from stream {svc.stream}: {stored} events replayed, "
                  f"{total} distinct events stored ({total - before} were missing)")
    return 0


async def _replay(js: Any, stream: str, subject: str, audited: set[str], store: AuditStore) -> int:
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if info.state.messages == 0:
        return 0
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                inactive_threshold=60.0, max_ack_pending=-1)
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    replayed, seq = 0, 0
    try:
        while seq < last:
            try:
                msgs = await sub.fetch(_BATCH, timeout=2)
            except nats.errors.TimeoutError:
                break  # nothing more within reach (the tail was deleted or purged)
            records = []
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                with contextlib.suppress(MalformedEvent):
                    event = Event.decode(msg.data)
                    check_subject(event, msg.subject)  # a forged type is not audited (the consumer refused it too)
                    if event.type in audited:
                        records.append(AuditRecord.from_event(event, seq))
            await store.add_many(records)
            replayed += len(records)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return replayed
