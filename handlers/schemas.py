"""The shop's PostgreSQL schemas: one per concern, each with its migrations (data only, no I/O).

Kept apart from :mod:`handlers.database` (which applies them) and from the stores (which use them), so
that provisioning can name every schema without importing a store, and no module imports its user.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Schema:
    """A concern's PostgreSQL schema and its migrations.

    Attributes:
        name: the schema's name (``audit``, ``ledger``), also the key of its migrations.
        migrations: SQL scripts, version 1 first; append new ones, never edit an applied one.
    """

    name: str
    migrations: tuple[str, ...]


AUDIT_SCHEMA = Schema("audit", (
    """CREATE TABLE IF NOT EXISTS audit.events (
        event_id    text PRIMARY KEY,
        order_id    text NOT NULL,
        type        text NOT NULL,
        service     text NOT NULL,
        occurred_at timestamptz NOT NULL,
        timestamp   text NOT NULL,
        stream_seq  bigint NOT NULL,
        data        jsonb NOT NULL,
        stored_at   timestamptz NOT NULL DEFAULT now());
    CREATE INDEX IF NOT EXISTS events_order ON audit.events (order_id, occurred_at, stream_seq);
    CREATE INDEX IF NOT EXISTS events_time ON audit.events (occurred_at);
    COMMENT ON TABLE audit.events IS 'Every event of the shop once, by event id; append-only';""",
))


LEDGER_SCHEMA = Schema("ledger", (
    """CREATE TABLE IF NOT EXISTS ledger.idempotency_keys (
        key         text PRIMARY KEY,
        kind        text NOT NULL,
        fingerprint text NOT NULL,
        order_id    text NOT NULL,
        http_status integer NOT NULL,
        response    jsonb NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS ledger.charges (
        id              text PRIMARY KEY,
        order_id        text NOT NULL,
        amount_cents    bigint NOT NULL CHECK (amount_cents > 0),
        currency        text NOT NULL,
        idempotency_key text NOT NULL UNIQUE REFERENCES ledger.idempotency_keys (key),
        created_at      timestamptz NOT NULL DEFAULT now());
    CREATE INDEX IF NOT EXISTS charges_order ON ledger.charges (order_id);
    CREATE TABLE IF NOT EXISTS ledger.refunds (
        id              text PRIMARY KEY,
        charge_id       text NOT NULL REFERENCES ledger.charges (id),
        order_id        text NOT NULL,
        amount_cents    bigint NOT NULL CHECK (amount_cents > 0),
        idempotency_key text NOT NULL UNIQUE REFERENCES ledger.idempotency_keys (key),
        created_at      timestamptz NOT NULL DEFAULT now());
    CREATE INDEX IF NOT EXISTS refunds_order ON ledger.refunds (order_id);
    COMMENT ON TABLE ledger.idempotency_keys IS 'The first answer to each Idempotency-Key, replayed as is';
    COMMENT ON TABLE ledger.charges IS 'Money taken: one row per successful charge';""",
))


def shop_schemas() -> tuple[Schema, ...]:
    """Every schema the shop uses (what provisioning creates)."""
    return (AUDIT_SCHEMA, LEDGER_SCHEMA)
