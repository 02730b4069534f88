"""The shop driven over HTTP by a load tool nobody here wrote: ``wrk`` POSTing orders to the order API.

Each request carries its own ``Idempotency-Key`` (a small Lua script numbers them per wrk thread) and an
order line of this run (its own customer id and skus, stocked so nothing runs out). wrk is closed-loop;
the script's ``delay()`` paces each connection, so ``connections`` x 1000 / ``delay`` ms is the offered
rate. Outcomes are read afterwards from the audit store in PostgreSQL: placed → ended is the time between
an order's ``OrderPlaced`` (stamped by the API when the request came in) and its ``OrderConfirmed`` or
``OrderCancelled``, both on this machine's clock; orders/s is the orders that ended over the time from the
first placed to the last ended. The money is checked in the gateway's ledger (no order charged twice).

``wrk`` comes from Debian (``make bench-tools``: ``apt-get install -y wrk``); :func:`wrk_binary` says so
when it is missing.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import nats

from engine.config import Config
from engine.state import KVState
from handlers import inventory
from handlers.gateway.ledger import double_charges
from handlers.tools.orders import percentile

SKUS = 10
STOCK_PER_SKU = 1_000_000  # nothing runs out: the run measures the saga, not the scarce sku

_SCRIPT = """-- One order per request, each with its own Idempotency-Key (run id, wrk thread, counter).
local threads = 0
function setup(thread)
  thread:set("thread_no", threads)
  threads = threads + 1
end
local counter = 0
function request()
  counter = counter + 1
  local key = "{run}-" .. thread_no .. "-" .. counter
  local body = string.format('{{"customer_id":"{customer}","sku":"{run}-sku-%d","qty":1,"amount_cents":%d}}',
                             counter % {skus}, 500 + (counter * 7919) % 24500)
  return wrk.format("POST", "/orders", {{["Content-Type"] = "application/json", ["Idempotency-Key"] = key}}, body)
end
function delay()
  return {delay_ms}
end
"""


class ToolMissing(RuntimeError):
    """The load tool is not installed."""


def wrk_binary() -> str:
    """The path of ``wrk``, or an error that says how to install it."""
    found = shutil.which("wrk")
    if found is None:
        raise ToolMissing("wrk is not installed: `make bench-tools` (or `apt-get install -y wrk` on Debian)")
    return found


def wrk_version(binary: str) -> str:
    """``wrk -v`` prints its version on its first line (and exits 1)."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (done.stdout or done.stderr).splitlines()[0].split(" [")[0].strip()


@dataclass(frozen=True)
class HttpRun:
    """One wrk run and what became of its orders.

    Attributes:
        tool: the load tool and its version.
        command: the command line as run (the script's path shortened).
        offered_per_s: the rate the script paces wrk to.
        duration_s: how long wrk ran.
        connections: wrk's connections.
        requests: POSTs wrk made; ``non_2xx`` of them were refused (socket errors count too).
        posts_per_s: wrk's own requests/s.
        post_p99_ms: wrk's p99 of a POST's answer (202 once OrderPlaced is on the stream).
        orders: orders the audit store holds an OrderPlaced of; ``ended``: of those, ended.
        orders_per_s: ended orders over first placed → last ended.
        p50_ms, p99_ms: placed → ended.
        confirmed, cancelled: how they ended.
        double_charges: orders charged more than once in the gateway's ledger (whole ledger).
    """

    tool: str
    command: str
    offered_per_s: float
    duration_s: float
    connections: int
    requests: int
    non_2xx: int
    posts_per_s: float
    post_p99_ms: float
    orders: int
    ended: int
    orders_per_s: float
    p50_ms: float
    p99_ms: float
    confirmed: int
    cancelled: int
    double_charges: int


async def seed_stock(cfg: Config, run: str) -> None:
    nc = await nats.connect(str(cfg.nats.url))
    try:
        stock = KVState(await nc.jetstream().key_value("stock"))
        await inventory.seed(stock, {f"{run}-sku-{k}": STOCK_PER_SKU for k in range(SKUS)})
    finally:
        await nc.close()


async def outcomes(dsn: str, customer: str) -> list[tuple[float, float | None, str | None]]:
    """(placed, ended or None, terminal type) per order of ``customer``, times in epoch seconds."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "WITH placed AS (SELECT order_id, occurred_at FROM audit.events"
            "  WHERE type = 'OrderPlaced' AND data->>'customer_id' = $1),"
            " ended AS (SELECT order_id, occurred_at, type FROM audit.events"
            "  WHERE type IN ('OrderConfirmed', 'OrderCancelled') AND order_id IN (SELECT order_id FROM placed))"
            " SELECT extract(epoch FROM p.occurred_at)::float8 AS placed,"
            "  extract(epoch FROM e.occurred_at)::float8 AS ended, e.type"
            " FROM placed p LEFT JOIN ended e USING (order_id)", customer)
    finally:
        await conn.close()
    return [(float(r["placed"]), None if r["ended"] is None else float(r["ended"]), r["type"]) for r in rows]


async def wait_ended(dsn: str, customer: str, stall_s: float = 30.0) -> list[tuple[float, float | None, str | None]]:
    """The run's outcomes once every order ended (or none ended for ``stall_s``)."""
    last, changed = -1, time.monotonic()
    while True:
        rows = await outcomes(dsn, customer)
        ended = sum(1 for _, e, _ in rows if e is not None)
        if rows and ended == len(rows):
            return rows
        if ended != last:
            last, changed = ended, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            return rows
        await asyncio.sleep(0.5)


def run_wrk(binary: str, api_url: str, workdir: Path, run: str, customer: str, rate: float, duration_s: float,
            connections: int, threads: int = 2) -> tuple[str, dict[str, float]]:
    """Run wrk paced at ``rate``; its command line and its numbers (requests, non-2xx, requests/s, p99 ms)."""
    delay_ms = max(0, round(connections * 1000 / rate))
    script = workdir / "orders.lua"
    script.write_text(_SCRIPT.format(run=run, customer=customer, skus=SKUS, delay_ms=delay_ms))
    args = [binary, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s", "--latency",
            "--timeout", "10s", "-s", str(script), api_url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + 60, check=True)
    return " ".join([*args[:-3], "orders.lua", api_url]), parse_wrk(done.stdout)


def parse_wrk(out: str) -> dict[str, float]:
    """The numbers of wrk's report."""
    requests = re.search(r"(\d+) requests in", out)
    per_s = re.search(r"Requests/sec:\s*([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    if requests is None or per_s is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"requests": float(requests.group(1)), "posts_per_s": float(per_s.group(1)),
            "non_2xx": float(non_2xx.group(1) if non_2xx else 0) + sum(map(float, errors.groups() if errors else ())),
            "post_p99_ms": float(p99.group(1)) * scale}


async def summarise(dsn: str, customer: str, tool: str, command: str, rate: float, duration_s: float,
                    connections: int, wrk: dict[str, float]) -> HttpRun:
    rows = await wait_ended(dsn, customer)
    ended = [(p, e, t) for p, e, t in rows if e is not None]
    latencies = sorted((e - p) * 1000 for p, e, _ in ended if e is not None)
    span_s = (max(e for _, e, _ in ended if e is not None) - min(p for p, _, _ in rows)) if ended else 0.0
    confirmed = sum(1 for _, _, t in ended if t == "OrderConfirmed")
    return HttpRun(tool=tool, command=command, offered_per_s=rate, duration_s=duration_s, connections=connections,
                   requests=int(wrk["requests"]), non_2xx=int(wrk["non_2xx"]), posts_per_s=wrk["posts_per_s"],
                   post_p99_ms=wrk["post_p99_ms"], orders=len(rows), ended=len(ended),
                   orders_per_s=len(ended) / span_s if span_s else 0.0, p50_ms=percentile(latencies, 50),
                   p99_ms=percentile(latencies, 99), confirmed=confirmed, cancelled=len(ended) - confirmed,
                   double_charges=len(await double_charges(dsn)))


def new_run() -> tuple[str, str]:
    """A run id (its skus' prefix) and its customer id (how its orders are found: their ids are hashes)."""
    run = uuid.uuid4().hex[:8]
    return run, f"wrk-{run}"
