"""Where an order's time goes: the latency of each hop of the saga at a steady rate, from the audit trail.

    .venv/bin/python -m benchmarks.shop_hops                  # 300 orders/s for 15 s
    .venv/bin/python -m benchmarks.shop_hops --rate 300 --rate 570 --seconds 20

The shop of ``benchmarks/test_shop_e2e.py`` as shipped (a fresh broker, PostgreSQL, the gateway, one
worker per service), a warm-up, then orders at each ``--rate``. Every event carries the time its
producer made it (``Event.timestamp``, milliseconds) and the audit stores every event, so the audit
trail gives, per order, the time from one stage's event to the next: the first hop
(OrderPlaced → the payment's outcome) holds the gateway's simulated latency; the others only the shop's
own work and the broker (publish, store, deliver, handle). The whole path (placed → ended, as the load
sees it) is printed with them. A hop much longer than the work in it is time spent waiting — for a
linger, a window, a CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg  # type: ignore[import-untyped]  # ships no type information
import uvloop
from rich.console import Console

from benchmarks.test_shop_e2e import measure, running_shop, workdir
from handlers.database import DATABASE_URL_ENV
from handlers.tools.orders import percentile

# (the events a hop starts from, the events it ends with): one of each per order, whichever happened.
HOPS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("OrderPlaced",), ("PaymentAuthorized", "PaymentDeclined")),
    (("PaymentAuthorized",), ("StockReserved", "OutOfStock")),
    (("OutOfStock",), ("PaymentRefunded",)),
    (("StockReserved", "PaymentDeclined", "PaymentRefunded"), ("OrderConfirmed", "OrderCancelled")),
    (("OrderConfirmed", "OrderCancelled"), ("NotificationSent",)),
]
WARMUP_ORDERS = 500


@dataclass(frozen=True)
class Hop:
    """One hop's latencies over the orders that took it, in milliseconds."""

    start: tuple[str, ...]
    end: tuple[str, ...]
    ms: list[float]

    def line(self) -> str:
        """The hop as a row of :func:`table`."""
        ordered = sorted(self.ms)
        cells = [f"{' / '.join(self.start)} → {' / '.join(self.end)}", str(len(self.ms)),
                 *(f"{percentile(ordered, q):.0f}" if ordered else "-" for q in (50, 90, 99))]
        return "| " + " | ".join(cells) + " |"


def hops(times: dict[str, dict[str, float]]) -> list[Hop]:
    """Per hop, the time from its start event to its end event of each order that has both."""
    found = []
    for start, end in HOPS:
        ms = []
        for events in times.values():
            began = next((events[t] for t in start if t in events), None)
            ended = next((events[t] for t in end if t in events), None)
            if began is not None and ended is not None:
                ms.append((ended - began) * 1000)
        found.append(Hop(start, end, ms))
    return found


async def event_times(dsn: str, since: float) -> dict[str, dict[str, float]]:
    """Order id → event type → the event's timestamp (epoch s), for orders placed at or after ``since``."""
    conn = await asyncpg.connect(dsn)
    try:
        # Complete by now: the load's own check waited for every event of the orders that ended.
        rows = await conn.fetch("SELECT order_id, type, timestamp FROM audit.events WHERE occurred_at >= "
                                "to_timestamp($1) ORDER BY stream_seq", since)
    finally:
        await conn.close()
    times: dict[str, dict[str, float]] = {}
    for order_id, kind, stamp in rows:
        times.setdefault(order_id, {})[kind] = datetime.fromisoformat(stamp).timestamp()
    return {oid: events for oid, events in times.items() if events.get("OrderPlaced", 0.0) >= since}


def table(rate: float, found: list[Hop], p50_ms: float, p99_ms: float) -> str:
    """Markdown: the rate's whole path as the load saw it, then its hops."""
    lines = [f"Offered {rate:g} orders/s; placed → ended (the load's clock): p50 {p50_ms:.0f} ms, p99 {p99_ms:.0f} ms.",
             "", "| hop | orders | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    return "\n".join(lines + [hop.line() for hop in found])


def run(rates: Sequence[float], seconds: float, console: Console, warmup: int = WARMUP_ORDERS) -> list[str]:
    """A fresh shop, a warm-up, then each rate in turn: its hops as a markdown table."""
    tables = []
    with workdir() as tmp, running_shop(tmp) as running:
        measure(running.cfg, warmup, 0, console)
        for rate in rates:
            since = time.time()
            summary = measure(running.cfg, max(1, int(rate * seconds)), rate, console)
            found = hops(uvloop.run(event_times(os.environ[DATABASE_URL_ENV], since)))
            tables.append(table(rate, found, summary.p50_ms, summary.p99_ms))
    return tables


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shop_hops",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=float, action="append", default=None,
                        help="orders per second offered; repeat for several (default: 300)")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each rate is offered (default 15)")
    args = parser.parse_args(argv)
    if any(rate <= 0 for rate in args.rate or []) or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=140)
    for text in run(args.rate or [300.0], args.seconds, console):
        print(text + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
