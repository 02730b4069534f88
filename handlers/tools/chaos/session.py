"""One scenario's session on a running chaos shop, and the row of numbers it ends in.

========================  ========================================================================
column                    meaning
========================  ========================================================================
orders                    valid orders placed by the scenario
lost                      orders placed that never ended (OrderConfirmed / OrderCancelled) and are
                          not in the dead-letter stream either
duplicate charges         orders the gateway's ledger shows charged more than once
oversold units            units reserved beyond a sku's seeded stock
DLQ                       messages the scenario got dead-lettered (each by one service or more:
                          the notes count the entries per service)
audit rows / events       distinct events of the scenario's orders in the audit store, against
                          the distinct events of those orders the stream holds
time to recover           from the end of the fault (last kill, broker back, gateway back, engine
                          restarted) until every order placed before that moment had ended; for
                          a hung handler, from the moment it hung until the engine cancelled it
========================  ========================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from engine.connection import connect
from engine.errors import JetpoolError
from engine.events import Event
from engine.publisher import Publisher
from engine.state import KVState
from handlers import inventory
from handlers.audit_store import SqliteAuditStore
from handlers.payments_chaos import MARKER
from handlers.saga import PRODUCERS
from handlers.tools.chaos.facts import TERMINAL, Facts, dead_letter, end_kind, scan, seen_events
from handlers.tools.chaos.producer import Producer, order_items
from handlers.tools.chaos.shop import Shop
from handlers.tools.invariants import check_audit, check_money, check_stock
from handlers.tools.orders import Orders, Plan, percentile

log = structlog.get_logger("jetpool.chaos")


@dataclass
class Row:
    """One scenario's numbers (see the module docstring); ``problems`` lists every invariant that failed."""

    scenario: str
    orders: int
    lost: int
    duplicate_charges: int
    oversold_units: int
    dlq_events: int
    audit_rows: int
    events_published: int
    recover_s: float | None
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}



class Session:
    """One scenario on a running shop: a connection, a producer, and where everything stood at the start.

    Use as ``async with Session(shop) as s``; everything it reports is about what happened after it began.
    """

    def __init__(self, shop: Shop, seed: int | None = None) -> None:
        self.shop = shop
        self.cfg = shop.cfg
        self.rng = random.Random(seed)
        self.stream = self.cfg.streams[0].name
        self.nc: Any = None
        self.js: Any = None
        self.producer: Producer
        self.started = 0.0
        self.log_offset = 0
        self._start_seq = self._dlq_start = self._terminal_before = 0
        self._delivered_before: dict[str, int] = {}

    async def __aenter__(self) -> Session:
        self.nc = await connect(self.cfg.nats, name=f"{self.cfg.app}.chaos")
        self.js = self.nc.jetstream()
        publisher = Publisher(self.nc, self.cfg.subject_prefix, self.cfg.nats.publish_timeout_s)
        await publisher.start()
        self.producer = Producer(publisher)
        self._start_seq = await self._last_seq(self.stream)
        self._dlq_start = await self._last_seq(self.cfg.dead_letter.stream)
        self._terminal_before = await self._terminal_count()
        self._delivered_before = {s: await self._delivered(s) for s in self.cfg.services}
        self.log_offset = self.shop.log_size()
        self.started = time.time()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.producer.publisher.stop()
        with contextlib.suppress(Exception):
            await self.nc.close()

    # ---- placing ----

    async def new_orders(self, count: int, skus: int = 20) -> Orders:
        """Fresh orders (ids and skus of their own) with their stock seeded."""
        orders = Orders.make(Plan(orders=count, skus=skus, seed=self.rng.randrange(2**32)))
        await inventory.seed(KVState(await self.js.key_value("stock")), orders.stock)
        return orders

    async def place(self, orders: Orders, rate: float) -> None:
        await self.producer.place(order_items(self.cfg, orders.events), rate)
        await self.producer.flush()

    async def until_sent(self, count: int) -> float:
        """Wait until ``count`` messages were sent; the wall time then."""
        while self.producer.sent < count:
            await asyncio.sleep(0.01)
        return time.time()

    # ---- waiting for the shop to finish ----

    async def settle(self, terminal: int, stall_s: float = 60.0) -> bool:
        """Wait until ``terminal`` orders ended since the start and no consumer has anything pending or unacked.

        False when nothing moved for ``stall_s`` (a stuck consumer, a lost order): the row will say what.
        """
        last: tuple[int, int] | None = None
        last_change = time.monotonic()
        while True:
            state = await self._progress()
            if state is not None and state[0] - self._terminal_before >= terminal and state[1] == 0:
                return True
            if state != last:
                last, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                log.warning("chaos.stalled", terminal=state[0] - self._terminal_before if state else None,
                            wanted=terminal, unsettled=state[1] if state else None)
                return False
            await asyncio.sleep(0.25)

    async def _progress(self) -> tuple[int, int] | None:
        """(terminal events stored, messages pending or unacked over every consumer); None if the broker is away."""
        try:
            unsettled = 0
            for service in self.cfg.services:
                info = await self.js.consumer_info(self.cfg.services[service].stream, self.cfg.durable(service))
                unsettled += int(info.num_pending) + int(info.num_ack_pending)
            return await self._terminal_count(), unsettled
        except Exception:
            return None

    async def _terminal_count(self) -> int:
        total = 0
        for event_type in TERMINAL:
            info = await self.js.stream_info(self.stream, subjects_filter=self.cfg.subject_for(event_type))
            total += int(sum((info.state.subjects or {}).values()))
        return total

    async def until_dead_lettered(self, count: int, timeout_s: float = 120.0) -> None:
        """Wait until the dead-letter stream holds ``count`` entries more than at the start."""
        deadline = time.monotonic() + timeout_s
        while await self._last_seq(self.cfg.dead_letter.stream) - self._dlq_start < count:
            if time.monotonic() > deadline:
                raise JetpoolError(f"fewer than {count} dead-letter entries after {timeout_s:g}s")
            await asyncio.sleep(0.1)

    async def _last_seq(self, stream: str) -> int:
        with contextlib.suppress(Exception):
            return int((await self.js.stream_info(stream)).state.last_seq)
        return 0

    async def _delivered(self, service: str) -> int:
        info = await self.js.consumer_info(self.cfg.services[service].stream, self.cfg.durable(service))
        return int(info.delivered.consumer_seq)

    async def deliveries(self, service: str) -> int:
        """Deliveries (first ones and redeliveries) the service's consumer made since the start."""
        return await self._delivered(service) - self._delivered_before[service]

    # ---- reading back ----

    async def facts(self) -> Facts:
        events = [s async for s in seen_events(scan(self.js, self.stream, self._start_seq))]
        dead = [dead_letter(m) async for m in scan(self.js, self.cfg.dead_letter.stream, self._dlq_start)]
        return Facts(events, dead)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The engine's log records since the session began."""
        return self.shop.records(event, self.log_offset)

    def recovery_s(self, facts: Facts, orders: Orders, fault_end: float) -> float | None:
        """From ``fault_end`` until every order first sent before it had ended (None: one never did)."""
        ended = facts.ended()
        before = [e.aggregate_id for e in orders.events if self.producer.sent_at.get(e.id, fault_end + 1) <= fault_end]
        if any(oid not in ended for oid in before):
            return None
        return max([0.0, *(ended[oid][0].at - fault_end for oid in before)])

    async def row(self, scenario: str, orders: Orders, facts: Facts, *, recover_s: float | None = None,
                  dlq_expected: int = 0, notes: dict[str, Any] | None = None) -> Row:
        """The scenario's row: the invariants over ``orders``, with every violation listed in ``problems``."""
        mine = set(orders.by_id)
        ended = {oid: ends for oid, ends in facts.ended().items() if oid in mine}
        kinds = {oid: end_kind(ends[0]) for oid, ends in ended.items()}
        dead = {d.order_id for d in facts.dead}
        problems: list[str] = []
        lost = sorted(oid for oid in mine if oid not in ended and oid not in dead)
        check(problems, not lost, f"{len(lost)} orders lost (e.g. {lost[:3]})")
        unsent = [e.id for e in orders.events if e.id not in self.producer.stored]
        check(problems, not unsent, f"{len(unsent)} orders never acknowledged by the stream")
        twice = sorted(oid for oid, ends in ended.items() if len(ends) > 1)
        check(problems, not twice, f"{len(twice)} orders ended more than once (e.g. {twice[:3]})")
        money = await check_money(self.shop.ledger_dsn(), orders.by_id, kinds)
        stock = await check_stock(KVState(await self.js.key_value("stock")), orders, kinds)
        problems += money.problems + stock.problems
        published = len({e.event_id for e in facts.events if e.order_id in mine and e.type in PRODUCERS})
        audit_rows = await self._audit_rows(orders.run_id)
        problems += check_audit(audit_rows, published, "as the stream holds").problems
        check(problems, facts.dead_events() == dlq_expected,
               f"{facts.dead_events()} events dead-lettered, expected {dlq_expected}")
        latencies = facts.latencies_ms(mine)
        counts = Counter(kinds.values())
        base_notes = {"ended": len(ended), **{k: counts[k] for k in ("confirmed", "declined", "out_of_stock")},
                      "p50_ms": round(percentile(latencies, 50)), "p99_ms": round(percentile(latencies, 99)),
                      "producer_resends": self.producer.resends,
                      "dlq_entries_by_service": dict(Counter(d.service for d in facts.dead))}
        return Row(scenario, len(mine), len(lost), money.count, stock.count, facts.dead_events(), audit_rows, published,
                   None if recover_s is None else round(recover_s, 2), {**base_notes, **(notes or {})}, problems)

    async def _audit_rows(self, run_id: str) -> int:
        store = SqliteAuditStore(self.shop.audit_path())
        try:
            return await store.count(order_prefix=run_id + "-")
        finally:
            store.close()


def check(problems: list[str], ok: bool, text: str) -> None:
    if not ok:
        problems.append(text)


def mark(orders: Orders, positions: Iterable[float], marker: str) -> list[Event]:
    """Mark the orders at these fractions of the run (0.5: the middle one) with a chaos marker."""
    events = [orders.events[min(len(orders.events) - 1, int(p * len(orders.events)))] for p in positions]
    for event in events:
        event.data[MARKER] = marker
    return events
