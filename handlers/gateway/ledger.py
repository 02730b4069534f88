"""The gateway's ledger in the shop's PostgreSQL (schema ``ledger``): idempotency keys, charges, refunds.

One row per ``Idempotency-Key`` holds the first answer given for it (HTTP status and body); the money
movement it caused is written in the same transaction, so a key moves money at most once. Any number
of gateway processes may share the ledger: ``INSERT ... ON CONFLICT DO NOTHING`` on the key waits for a
concurrent transaction holding the same key and then finds its row, and each movement's
``idempotency_key`` is ``UNIQUE`` besides, so two requests with one key cannot both move money.

Charges are group-committed (:mod:`handlers.group_commit`): the charges of concurrent requests are
claimed and made with one statement, so under load a commit carries many, and a request alone is
written at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type information
import orjson

from handlers.database import Database, refused_data
from handlers.group_commit import GroupCommit
from handlers.schemas import LEDGER_SCHEMA

# An idempotency key's row ($1-$6); a concurrent transaction holding the same key is waited for, then
# the insert does nothing.
_CLAIM_SQL = ("INSERT INTO ledger.idempotency_keys (key, kind, fingerprint, order_id, http_status, response) "
              "VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (key) DO NOTHING")

# A group of charges (and declines) in one statement: one round trip and one commit, all or nothing. Each
# key's row is claimed, in key order (two gateways whose groups overlap wait for each other's keys in the
# same order, never in a cycle), and a charge is made for each key claimed here that carries one; the keys
# returned are those claimed (the others were known: their first answer is replayed).
_CHARGE_GROUP_SQL = """WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[],
                         $6::text[], $7::text[], $8::bigint[], $9::text[])
        AS i (key, fingerprint, order_id, http_status, response, charge_id, charge_order, amount_cents, currency)),
claimed AS (
    INSERT INTO ledger.idempotency_keys (key, kind, fingerprint, order_id, http_status, response)
    SELECT key, 'charge', fingerprint, order_id, http_status, response::jsonb FROM input ORDER BY key
    ON CONFLICT (key) DO NOTHING RETURNING key),
charged AS (
    INSERT INTO ledger.charges (id, order_id, amount_cents, currency, idempotency_key)
    SELECT i.charge_id, i.charge_order, i.amount_cents, i.currency, i.key FROM input i JOIN claimed USING (key)
    WHERE i.charge_id IS NOT NULL)
SELECT key FROM claimed"""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gateway answered to one request.

    Attributes:
        http_status: 200 (money moved) or 402 (declined); errors are never stored.
        body: the JSON body sent back.
        replayed: True when the answer is the stored one of an earlier request with the same key.
    """

    http_status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Charge:
    """A charge about to be made: the money movement an authorized answer records."""

    id: str
    order_id: str
    amount_cents: int
    currency: str


@dataclass(frozen=True, slots=True)
class Refund:
    """A refund about to be made of an earlier charge."""

    id: str
    charge_id: str
    amount_cents: int


@dataclass(frozen=True, slots=True)
class _ChargeRequest:
    """One charge request waiting for its group's statement."""

    key: str
    fingerprint: str
    order_id: str
    answer: Answer
    charge: Charge | None


class KeyReused(Exception):
    """The idempotency key was first used for a different request (another kind or other parameters)."""


class RefundRefused(Exception):
    """A refund the ledger cannot make: its charge does not exist, or it would refund more than was charged.

    Attributes:
        code: a Stripe-like error code (``resource_missing``, ``amount_too_large``).
        param: the request parameter at fault.
    """

    def __init__(self, message: str, code: str, param: str) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class Ledger:
    """The ledger on a :class:`~handlers.database.Database` pool (schema ``ledger`` migrated on open).

    Args:
        db: the shop's database.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._charges: GroupCommit[_ChargeRequest, bool] = GroupCommit(self._claim_charges, alone=refused_data)

    @classmethod
    async def open(cls, dsn: str, *, max_connections: int = 8) -> Ledger:
        """A ledger with its own pool to ``dsn``."""
        return cls(await Database.open(dsn, [LEDGER_SCHEMA], max_size=max_connections))

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        """Raise unless the database answers."""
        async with self.db.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    async def charge(self, key: str, fingerprint: str, order_id: str, answer: Answer,
                     charge: Charge | None) -> Answer:
        """Store ``answer`` under ``key`` and make ``charge`` (None: a decline), unless the key is known.

        Returns:
            ``answer``, or the stored answer of the key's first request (``replayed``).

        Raises:
            KeyReused: the key's first request was a different one.
        """
        if await self._charges.submit(_ChargeRequest(key, fingerprint, order_id, answer, charge)):
            return answer
        return await self._replay(key, "charge", fingerprint)

    async def refund(self, key: str, fingerprint: str, answer: Answer, refund: Refund) -> Answer:
        """Store ``answer`` under ``key`` and make ``refund``, unless the key is known.

        Raises:
            KeyReused: the key's first request was a different one.
            RefundRefused: no such charge, or the refund exceeds what is left of it (nothing is stored).
        """
        known = await self._stored(key)
        if known is not None:
            return _replayed(known, "refund", fingerprint)
        async with self.db.pool.acquire() as conn, conn.transaction():
            # Refunds of one charge queue on its row, so two of them cannot both see money left.
            row = await conn.fetchrow("SELECT order_id, amount_cents FROM ledger.charges WHERE id = $1 FOR UPDATE",
                                      refund.charge_id)
            if row is None:
                raise RefundRefused(f"no such charge: {refund.charge_id!r}", "resource_missing", "charge")
            refunded = int(await conn.fetchval(
                "SELECT coalesce(sum(amount_cents), 0) FROM ledger.refunds WHERE charge_id = $1", refund.charge_id))
            if await self._claim(conn, key, "refund", fingerprint, str(row["order_id"]), answer):
                left = int(row["amount_cents"]) - refunded
                if refund.amount_cents > left:
                    raise RefundRefused(f"refund of {refund.amount_cents} exceeds the {left} left of the charge",
                                        "amount_too_large", "amount")
                await conn.execute(
                    "INSERT INTO ledger.refunds (id, charge_id, order_id, amount_cents, idempotency_key) "
                    "VALUES ($1, $2, $3, $4, $5)", refund.id, refund.charge_id, row["order_id"],
                    refund.amount_cents, key)
                return answer
        return await self._replay(key, "refund", fingerprint)

    async def charge_order(self, charge_id: str) -> tuple[str, int] | None:
        """(order id, amount) of a charge, if it exists."""
        async with self.db.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT order_id, amount_cents FROM ledger.charges WHERE id = $1", charge_id)
        return None if row is None else (str(row["order_id"]), int(row["amount_cents"]))

    async def _claim_charges(self, requests: list[_ChargeRequest]) -> list[bool]:
        """Claim a group's keys and make their charges in one statement; per request, whether its key was
        claimed. A key twice in one group is claimed by its first request; the second replays its answer."""
        first: dict[str, _ChargeRequest] = {}
        for request in requests:
            first.setdefault(request.key, request)
        rows = [(r.key, r.fingerprint, r.order_id, r.answer.http_status, orjson.dumps(r.answer.body).decode(),
                 *((r.charge.id, r.charge.order_id, r.charge.amount_cents, r.charge.currency) if r.charge
                   else (None, None, None, None))) for r in first.values()]
        async with self.db.pool.acquire() as conn:
            claimed = {record[0] for record in await conn.fetch(
                _CHARGE_GROUP_SQL, *(list(column) for column in zip(*rows, strict=True)))}
        return [r.key in claimed and first[r.key] is r for r in requests]

    async def _claim(self, conn: asyncpg.Connection, key: str, kind: str, fingerprint: str, order_id: str,
                     answer: Answer) -> bool:
        """Insert the key's row; False when it exists (a concurrent holder of the key is waited for)."""
        inserted = await conn.fetchval(
            _CLAIM_SQL + " RETURNING true",
            key, kind, fingerprint, order_id, answer.http_status, orjson.dumps(answer.body).decode())
        return bool(inserted)

    async def _stored(self, key: str) -> asyncpg.Record | None:
        async with self.db.pool.acquire() as conn:
            return await conn.fetchrow("SELECT kind, fingerprint, http_status, response::text AS response "
                                       "FROM ledger.idempotency_keys WHERE key = $1", key)

    async def _replay(self, key: str, kind: str, fingerprint: str) -> Answer:
        row = await self._stored(key)
        if row is None:  # cannot happen: the key's row was found by the insert that lost
            raise KeyReused(f"idempotency key {key!r} vanished")
        return _replayed(row, kind, fingerprint)


def _replayed(row: asyncpg.Record, kind: str, fingerprint: str) -> Answer:
    if row["kind"] != kind or row["fingerprint"] != fingerprint:
        raise KeyReused(f"idempotency key already used for a different {row['kind']} request")
    return Answer(int(row["http_status"]), orjson.loads(row["response"]), replayed=True)


async def movements(dsn: str, order_ids: Iterable[str]) -> dict[str, list[str]]:
    """Order id -> its money movements (``charge``/``refund``), oldest first, for each of ``order_ids``."""
    ids = list(order_ids)
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('ledger.charges') IS NOT NULL"):
            return {oid: [] for oid in ids}
        rows = await conn.fetch(
            "SELECT order_id, kind FROM ("
            " SELECT order_id, 'charge' AS kind, created_at, 0 AS rank FROM ledger.charges WHERE order_id = ANY($1)"
            " UNION ALL"
            " SELECT order_id, 'refund', created_at, 1 FROM ledger.refunds WHERE order_id = ANY($1)"
            ") m ORDER BY order_id, rank, created_at", ids)
    finally:
        await conn.close()
    moves: dict[str, list[str]] = {oid: [] for oid in ids}
    for row in rows:
        moves[str(row["order_id"])].append(str(row["kind"]))
    return moves


async def double_charges(dsn: str) -> dict[str, int]:
    """Orders charged more than once in the whole ledger, with how many times."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT order_id, count(*) AS n FROM ledger.charges GROUP BY order_id "
                                "HAVING count(*) > 1")
    finally:
        await conn.close()
    return {str(r["order_id"]): int(r["n"]) for r in rows}


def fingerprint(kind: str, params: Mapping[str, Any]) -> str:
    """What identifies a request's parameters: the same key must come with the same fingerprint."""
    return hashlib.sha256(orjson.dumps({"kind": kind, **params}, option=orjson.OPT_SORT_KEYS)).hexdigest()
