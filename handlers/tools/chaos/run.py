"""``jetpool chaos``: faults injected into the running shop under load, each run ending in a row of numbers.

Every scenario (:mod:`handlers.tools.chaos.scenarios`) drives the real thing: a nats-server process,
the engine as a ``python -m engine run`` process tree with all five services, orders placed by a
producer that re-sends every unacknowledged publish under the same ``Nats-Msg-Id`` (as a storefront
that must not lose an order would), and a real fault — ``kill -9`` of workers or of the broker,
SIGTERM to the supervisor, the gateway's outage switch, or bad input. When the shop has settled, the
scenario reads back what happened from the stream, the dead-letter stream, the gateway's ledger, the
stock bucket and the audit store (:mod:`handlers.tools.chaos.session` says what each column means).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from engine.errors import JetpoolError
from handlers import SHOP_YAML
from handlers.tools.chaos.scenarios import (
    broker_restart,
    duplicates,
    gateway_outage,
    hang,
    malformed,
    oversized,
    poison,
    sigterm_restart,
    slow_handler,
    worker_kill,
)
from handlers.tools.chaos.session import Row
from handlers.tools.chaos.shop import Shop


@dataclass(frozen=True)
class Scenario:
    """A named scenario and what it proves."""

    name: str
    run: Callable[..., Awaitable[Row]]
    title: str


SCENARIOS = {s.name: s for s in (
    Scenario("worker-kill", worker_kill, "a random worker kill -9'd every 2 s"),
    Scenario("broker-restart", broker_restart, "nats-server kill -9'd mid-run, restarted on the same store"),
    Scenario("gateway-outage", gateway_outage, "payment gateway down for 20 s mid-run"),
    Scenario("sigterm-restart", sigterm_restart, "SIGTERM to the supervisor mid-run, then a restart"),
    Scenario("poison", poison, "one order whose payment handler always raises"),
    Scenario("malformed", malformed, "1,000 malformed events mixed into valid traffic"),
    Scenario("hang", hang, "payment handlers that hang, cancelled at handler_timeout_s"),
    Scenario("slow-handler", slow_handler, "gateway slower than ack_wait_s"),
    Scenario("duplicates", duplicates, "orders published twice (same and new Msg-Ids, new event ids)"),
    Scenario("oversized", oversized, "events over the stream's max_msg_size and over max_event_bytes"),
)}


async def run_chaos(names: Sequence[str], *, base_config: Path = SHOP_YAML, workdir: Path = Path(".jetpool/chaos"),
                    orders: int | None = None, rate: float | None = None, console: Console | None = None
                    ) -> list[Row]:
    """Run scenarios one after the other, each on a fresh shop of its own; the rows, printed as they come."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise JetpoolError(f"no chaos scenario named {', '.join(unknown)} (scenarios: {', '.join(SCENARIOS)})")
    console = console or Console(stderr=True)
    rows = []
    for name in names or list(SCENARIOS):
        scenario = SCENARIOS[name]
        shop = Shop(workdir / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}", base_config)
        console.print(f"[bold]{name}[/]: {scenario.title} (work dir {shop.workdir})")
        try:
            await shop.start()
            sizes = {**({"orders": orders} if orders else {}), **({"rate": rate} if rate else {})}
            row = await scenario.run(shop, **sizes)
        finally:
            shop.close()
        if row.ok:  # the broker's store can be gigabytes (oversized); the log and the config stay
            shutil.rmtree(shop.server.store_dir, ignore_errors=True)
        console.print(f"  {'[green]ok[/]' if row.ok else '[red]FAILED[/]'} {_summary(row)}")
        for problem in row.problems:
            console.print(f"  [red]✘[/] {problem}")
        rows.append(row)
    return rows


def _summary(row: Row) -> str:
    recover = "-" if row.recover_s is None else f"{row.recover_s:g} s"
    return (f"{row.orders} orders, {row.lost} lost, {row.duplicate_charges} charged twice, "
            f"{row.oversold_units} units oversold, {row.dlq_events} dead-lettered, audit {row.audit_rows}/"
            f"{row.events_published} events, recovered in {recover}")


def table(rows: Sequence[Row]) -> Table:
    """The rows as a rich table (the same columns as docs/chaos.md)."""
    out = Table(title="jetpool chaos", title_justify="left")
    for column in ("scenario", "orders", "lost", "dup charges", "oversold", "DLQ", "audit / events", "recover",
                   "ok"):
        out.add_column(column)
    for r in rows:
        out.add_row(r.scenario, str(r.orders), str(r.lost), str(r.duplicate_charges), str(r.oversold_units),
                    str(r.dlq_events), f"{r.audit_rows} / {r.events_published}",
                    "-" if r.recover_s is None else f"{r.recover_s:g} s", "yes" if r.ok else "NO")
    return out


def report(rows: Sequence[Row], as_json: bool) -> int:
    """Print the rows (a table, or JSON on stdout); exit code 0 when every scenario held its invariants."""
    if as_json:
        print(orjson.dumps([r.to_json() for r in rows], option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(table(rows))
    return 0 if all(r.ok for r in rows) else 1

