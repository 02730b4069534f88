"""A simulated payment gateway: an external service the payments handler calls through a circuit breaker.

It behaves like a real card processor where it matters for the saga:

- **idempotency keys**: a charge or refund sent again with the same key returns the first result and
  moves no money a second time. The gateway's ledger (a SQLite file shared by every process, like the
  one database a real processor has) remembers the keys and records every money movement, so
  :meth:`Ledger.double_charges` can prove that no order was charged twice;
- **latency** with jitter, **transient failures** at a configurable rate — half of them *after* the
  charge went through (the response is lost), which is exactly the case idempotency keys exist for —
  and **declines** (a business answer, not a failure: the breaker does not count them);
- an **outage switch** in a small JSON control file that any process may write
  (``{"outage": true}``); the gateway re-reads it at most every ``control_poll_s``, so a demo or a
  test can start and end an outage while the engine runs.

Settings (the payments service's ``settings.gateway`` mapping in the YAML), all optional:
``latency_ms`` (5), ``jitter_ms`` (2), ``failure_rate`` (0), ``decline_rate`` (0),
``max_amount_cents`` (declines above it; 1,000,000), ``ledger`` (SQLite path; absent: in memory, this
process only), ``control_file`` (absent: no outage switch).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from handlers.sqlite import open_db


class GatewayError(Exception):
    """The gateway did not answer (timeout, connection refused, outage): retry later."""


class GatewayUnavailable(GatewayError):
    """The gateway is in an outage."""


@dataclass(frozen=True, slots=True)
class Result:
    """What the gateway answered.

    Attributes:
        status: ``authorized`` | ``declined`` for charges, ``refunded`` for refunds.
        reference: the gateway's id for the money movement (empty when declined).
        reason: why a charge was declined.
        replayed: True when the idempotency key was seen before (no money moved this time).
    """

    status: str
    reference: str = ""
    reason: str = ""
    replayed: bool = False


class Ledger(Protocol):
    """Where the gateway keeps idempotency keys and money movements."""

    def apply(self, key: str, order_id: str, kind: str, amount_cents: int, result: Result) -> Result:
        """Record ``result`` under ``key`` unless the key exists; return the recorded result."""
        ...

    def movements(self, order_id: str) -> list[tuple[str, int]]:
        """(kind, amount) of every money movement of an order, oldest first."""
        ...

    def double_charges(self) -> dict[str, int]:
        """Orders charged more than once, with how many times."""
        ...


class MemoryLedger:
    """A ledger inside one process (unit tests, or a gateway that needs no cross-process memory)."""

    def __init__(self) -> None:
        self.keys: dict[str, Result] = {}
        self.rows: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def apply(self, key: str, order_id: str, kind: str, amount_cents: int, result: Result) -> Result:
        with self._lock:
            if key in self.keys:
                first = self.keys[key]
                return Result(first.status, first.reference, first.reason, replayed=True)
            self.keys[key] = result
            if result.status != "declined":
                self.rows.append((order_id, kind, amount_cents))
            return result

    def movements(self, order_id: str) -> list[tuple[str, int]]:
        return [(kind, amount) for oid, kind, amount in self.rows if oid == order_id]

    def double_charges(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for oid, kind, _ in self.rows:
            if kind == "charge":
                counts[oid] = counts.get(oid, 0) + 1
        return {oid: n for oid, n in counts.items() if n > 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, status TEXT NOT NULL, reference TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS movements (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, order_id TEXT NOT NULL, kind TEXT NOT NULL,
    amount_cents INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS movements_order ON movements(order_id);
"""


class SqliteLedger:
    """The gateway's ledger in a SQLite file, shared by every process that opens the same path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_db(self.path, _SCHEMA)
        self._lock = threading.Lock()

    def apply(self, key: str, order_id: str, kind: str, amount_cents: int, result: Result) -> Result:
        with self._lock:
            # BEGIN IMMEDIATE takes the write lock first, so two processes cannot both miss the key.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT status, reference, reason FROM idempotency WHERE key = ?",
                                       (key,)).fetchone()
                if row is not None:
                    self._db.execute("COMMIT")
                    return Result(row[0], row[1], row[2], replayed=True)
                self._db.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?)",
                                 (key, result.status, result.reference, result.reason))
                if result.status != "declined":
                    self._db.execute("INSERT INTO movements (order_id, kind, amount_cents, at) VALUES (?, ?, ?, ?)",
                                     (order_id, kind, amount_cents, time.time()))
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def movements(self, order_id: str) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute("SELECT kind, amount_cents FROM movements WHERE order_id = ? ORDER BY seq",
                                    (order_id,)).fetchall()
        return [(str(kind), int(amount)) for kind, amount in rows]

    def double_charges(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT order_id, COUNT(*) FROM movements WHERE kind = 'charge' "
                                    "GROUP BY order_id HAVING COUNT(*) > 1").fetchall()
        return {str(oid): int(n) for oid, n in rows}

    def charged_orders(self) -> int:
        """How many distinct orders were charged."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(DISTINCT order_id) FROM movements WHERE kind = 'charge'").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ControlFile:
    """The outage switch and live overrides: a JSON object in a file any process may rewrite.

    Keys: ``outage`` (bool), ``failure_rate``, ``latency_ms``. Re-read at most every ``poll_s``;
    a missing or half-written file means "no overrides".
    """

    def __init__(self, path: str | Path, poll_s: float = 0.5) -> None:
        self.path = Path(path)
        self._poll_s = poll_s
        self._read_at = -poll_s
        self._values: dict[str, Any] = {}

    def values(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._read_at >= self._poll_s:
            self._read_at = now
            try:
                loaded = orjson.loads(self.path.read_bytes())
                self._values = loaded if isinstance(loaded, dict) else {}
            except (OSError, orjson.JSONDecodeError):
                self._values = {}
        return self._values

    def write(self, **values: Any) -> None:
        """Replace the file's content atomically (write a temporary file, then rename it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(values))
        tmp.replace(self.path)
        self._read_at = -self._poll_s


def _fraction(text: str) -> float:
    """A stable number in [0, 1) for a string: the same order always gets the same verdict."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


class PaymentGateway:
    """The simulated gateway client. Thread-safe ledger calls run off the event loop.

    Args:
        ledger: where idempotency keys and money movements live.
        control: the outage switch (optional).
        latency_ms: mean response time.
        jitter_ms: uniform jitter added to the latency.
        failure_rate: probability that a call fails transiently (half of them after moving money).
        decline_rate: fraction of orders declined (stable per order id).
        max_amount_cents: larger charges are declined.
        rng: randomness source (seed it in tests).
    """

    def __init__(self, ledger: Ledger, control: ControlFile | None = None, *, latency_ms: float = 5.0,
                 jitter_ms: float = 2.0, failure_rate: float = 0.0, decline_rate: float = 0.0,
                 max_amount_cents: int = 1_000_000, rng: random.Random | None = None) -> None:
        self.ledger = ledger
        self.control = control
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.failure_rate = failure_rate
        self.decline_rate = decline_rate
        self.max_amount_cents = max_amount_cents
        self._rng = rng or random.Random()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-ledger")

    async def charge(self, order_id: str, amount_cents: int, idempotency_key: str) -> Result:
        """Charge an order; the same ``idempotency_key`` never charges twice."""
        fail_after = await self._enter()
        if amount_cents > self.max_amount_cents:
            answer = Result("declined", reason="amount over limit")
        elif _fraction(order_id) < self.decline_rate:
            answer = Result("declined", reason="card declined")
        else:
            answer = Result("authorized", reference=f"ch_{_digest(idempotency_key)}")
        result = await self._record(idempotency_key, order_id, "charge", amount_cents, answer)
        if fail_after:
            raise GatewayError("response lost after the charge was made (timeout)")
        return result

    async def refund(self, order_id: str, charge_reference: str, amount_cents: int, idempotency_key: str) -> Result:
        """Refund a charge; the same ``idempotency_key`` never refunds twice."""
        fail_after = await self._enter()
        answer = Result("refunded", reference=f"re_{_digest(idempotency_key + charge_reference)}")
        result = await self._record(idempotency_key, order_id, "refund", amount_cents, answer)
        if fail_after:
            raise GatewayError("response lost after the refund was made (timeout)")
        return result

    async def _enter(self) -> bool:
        """Wait the latency; raise for an outage or a failure before the call; True: fail after it."""
        overrides = self.control.values() if self.control is not None else {}
        if overrides.get("outage"):
            raise GatewayUnavailable("payment gateway unavailable (outage)")
        latency_ms = float(overrides.get("latency_ms", self.latency_ms))
        delay_s = max(0.0, latency_ms + self._rng.uniform(0, self.jitter_ms)) / 1000
        if delay_s:
            await asyncio.sleep(delay_s)
        failure_rate = float(overrides.get("failure_rate", self.failure_rate))
        if self._rng.random() < failure_rate:
            if self._rng.random() < 0.5:
                # Leave through the ledger's queue like every answer: a failure that overtook the
                # successes started with it would reach the breaker in a run of consecutive failures.
                await asyncio.get_running_loop().run_in_executor(self._executor, _nothing)
                raise GatewayError("payment gateway timed out")
            return True
        return False

    async def _record(self, key: str, order_id: str, kind: str, amount_cents: int, answer: Result) -> Result:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.ledger.apply, key, order_id, kind, amount_cents,
                                          answer)


def _nothing() -> None:
    return None


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


_gateways: dict[str, PaymentGateway] = {}


def settings_key(settings: Mapping[str, Any]) -> str:
    """The cache key of a gateway's settings."""
    return orjson.dumps(dict(settings), option=orjson.OPT_SORT_KEYS).decode()


def gateway_for(settings: Mapping[str, Any]) -> PaymentGateway:
    """The process's gateway client for these settings (built once, then reused)."""
    key = settings_key(settings)
    gateway = _gateways.get(key)
    if gateway is None:
        ledger_path = settings.get("ledger")
        control_path = settings.get("control_file")
        gateway = _gateways[key] = PaymentGateway(
            SqliteLedger(ledger_path) if ledger_path else MemoryLedger(),
            ControlFile(control_path, float(settings.get("control_poll_s", 0.5))) if control_path else None,
            latency_ms=float(settings.get("latency_ms", 5.0)),
            jitter_ms=float(settings.get("jitter_ms", 2.0)),
            failure_rate=float(settings.get("failure_rate", 0.0)),
            decline_rate=float(settings.get("decline_rate", 0.0)),
            max_amount_cents=int(settings.get("max_amount_cents", 1_000_000)),
        )
    return gateway
