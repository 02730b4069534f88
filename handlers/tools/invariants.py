"""The shop's invariants over one run's orders, written once for ``jetpool demo``/``load`` and ``jetpool chaos``.

- money: each order's movements in the gateway's ledger (PostgreSQL, schema ``ledger``) are exactly
  what its end calls for (charged once if it was confirmed, charged and refunded once if it ran out of
  stock, nothing if its payment was declined or it has not ended), so nobody is charged twice;
- stock: per sku, available + reserved = seeded, reserved = what confirmed orders bought, nothing
  half-reserved, nothing below zero;
- audit: the audit store holds each event of the run's orders once.

Each check returns a :class:`Check`: the line a report prints and the problems found (none: it holds).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from engine.state import StateStore
from handlers import inventory
from handlers.gateway.ledger import movements
from handlers.tools.orders import Orders

# How an order ended (or "open": not yet) -> its movements in the gateway's ledger, in order.
MONEY = {"confirmed": ["charge"], "declined": [], "out_of_stock": ["charge", "refund"], "open": []}
# How an order ended -> the events of it the stream (and so the audit store) holds.
EVENTS_PER_ORDER = {"confirmed": 5, "declined": 4, "out_of_stock": 6}


@dataclass(frozen=True)
class Check:
    """One invariant over a run's orders.

    Attributes:
        summary: what was checked and found, one line.
        problems: each way it failed (empty: it holds).
        count: the check's headline number of failures (orders charged twice, units oversold...).
    """

    summary: str
    problems: list[str] = field(default_factory=list)
    count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_money(dsn: str, order_ids: Iterable[str], kinds: Mapping[str, str]) -> Check:
    """Each order's ledger movements against :data:`MONEY`; ``count`` is the orders charged more than once.

    Args:
        dsn: the shop's PostgreSQL, whose ``ledger`` schema the gateway writes.
        order_ids: the run's orders.
        kinds: order id -> confirmed | declined | out_of_stock, for the orders that ended.
    """
    moves = await movements(dsn, order_ids)
    charged_twice = sorted(oid for oid, m in moves.items() if m.count("charge") > 1)
    twice = sorted(oid for oid, m in moves.items() if m.count("charge") > 1 or m.count("refund") > 1)
    wrong = sorted(oid for oid, m in moves.items() if m != MONEY[kinds.get(oid, "open")] and oid not in twice)
    charged = sum(1 for m in moves.values() if "charge" in m)
    refunded = sum(1 for m in moves.values() if "refund" in m)
    problems = []
    if twice:
        problems.append(f"{len(twice)} charged or refunded twice (e.g. {twice[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} orders' money does not match their end (e.g. {wrong[0]}: "
                        f"{moves[wrong[0]]}, {kinds.get(wrong[0], 'open')})")
    return Check(f"no double charge: {charged} orders charged once, {refunded} refunded once", problems,
                 len(charged_twice))


def units_sold(orders: Orders, kinds: Mapping[str, str]) -> Counter[str]:
    """Sku -> units the confirmed orders bought."""
    sold = Counter[str]()
    for oid, kind in kinds.items():
        if kind == "confirmed":
            line = orders.line(oid)
            sold[line["sku"]] += line["qty"]
    return sold


async def check_stock(store: StateStore, orders: Orders, kinds: Mapping[str, str]) -> Check:
    """Every sku's stock level against what was seeded and sold; ``count`` is the units oversold."""
    sold = units_sold(orders, kinds)
    oversold, wrong = 0, []
    for sku, seeded in orders.stock.items():
        level, _ = await store.get(inventory.sku_key(sku))
        level = level or {"available": 0, "reserved": 0, "pending": {}}
        oversold += max(0, level["reserved"] - seeded, sold[sku] - seeded)
        if (level["available"] < 0 or level["available"] + level["reserved"] != seeded
                or level["reserved"] != sold[sku] or level["pending"]):
            wrong.append(f"{sku}: seeded {seeded}, sold {sold[sku]}, now {level}")
    problems = [f"{oversold} units oversold"] if oversold else []
    if wrong:
        problems.append(f"stock inconsistent on {len(wrong)} skus (e.g. {wrong[0]})")
    total = sum(orders.stock.values())
    return Check(f"stock consistent over {len(orders.stock)} skus: {sum(sold.values())} of {total} units sold, "
                 "none oversold, none left half-reserved", problems, oversold)


def check_audit(stored: int, expected: int, of_what: str) -> Check:
    """The audit store's distinct events of the run's orders (``stored``) against ``expected``."""
    problems = [] if stored == expected else [f"audit holds {stored} events, expected {expected}"]
    return Check(f"audit: {stored} events stored once each (expected {expected} {of_what})", problems,
                 abs(stored - expected))
