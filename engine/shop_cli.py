"""``jetpool audit``: an order's timeline from the audit store, and rebuilding the store from the stream.

The store's location comes from the config: the ``db_path`` setting of the service that routes
events to ``handlers.audit:record``. Rebuilding replays every stored event of the stream (from the
first one the stream still holds: with ``max_age_s`` set, older events are gone) into an emptied store.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import nats
from nats.js import api
from rich.console import Console
from rich.table import Table

from engine.config import Config
from engine.connection import connect
from engine.errors import ConfigError, MalformedEvent
from engine.events import Event, check_subject
from handlers.audit import DEFAULT_DB_PATH, describe
from handlers.audit_store import AuditRecord, SqliteAuditStore

AUDIT_HANDLER = "handlers.audit:record"
_BATCH = 1000


def audit_service(cfg: Config) -> str:
    """The service that feeds the audit store."""
    for name, svc in cfg.services.items():
        if AUDIT_HANDLER in svc.routes.values():
            return name
    raise ConfigError(f"{cfg.source}: no service routes events to {AUDIT_HANDLER}")


def open_audit_store(cfg: Config) -> SqliteAuditStore:
    """The audit store the config's audit service writes to."""
    settings = cfg.services[audit_service(cfg)].settings
    return SqliteAuditStore(str(settings.get("db_path", DEFAULT_DB_PATH)))


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
    store = open_audit_store(cfg)
    try:
        records = await store.timeline(order_id)
    finally:
        store.close()
    if not records:
        console.print(f"no audit records for order {order_id!r} in {store.path}")
        return 1
    console.print(timeline_table(order_id, records))
    return 0


async def rebuild(cfg: Config, console: Console | None = None) -> int:
    """Empty the store and replay every audited event the stream holds into it."""
    console = console or Console()
    service = audit_service(cfg)
    svc = cfg.services[service]
    audited = set(svc.routes)
    store = open_audit_store(cfg)
    nc = await connect(cfg.nats, name=f"{cfg.app}.audit-rebuild")
    try:
        await store.clear()
        stored = await _replay(nc.jetstream(), svc.stream, f"{cfg.subject_prefix}.>", audited, store)
        total = await store.count()
    finally:
        await nc.close()
        store.close()
    console.print(f"audit store {store.path} rebuilt from stream {svc.stream}: "
                  f"{stored} events replayed, {total} distinct events stored")
    return 0


async def _replay(js: Any, stream: str, subject: str, audited: set[str], store: SqliteAuditStore) -> int:
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
