"""``jetpool demo`` and ``jetpool load``: drive the shop with orders, then prove its invariants.

``demo`` runs everything on this machine: a broker (an embedded nats-server unless ``--nats-url``),
provisioning, the engine with all five services as a ``python -m engine run`` subprocess (its own
process group, so signals reach it only through us), then the load below, then a clean stop of every
process it started, by PID, also on Ctrl-C. ``load`` does only the load, against a deployment that
is already running (a Kubernetes cluster, say).

The load: seed the stock of this run's skus, place orders at a rate, watch OrderConfirmed /
OrderCancelled go by (a plain subscription; latency is measured on this machine's clock from the
publish of OrderPlaced), wait until every order has ended, then check:

- no order is lost (each ended, or is in the dead-letter stream);
- nobody was charged twice (the gateway's ledger, when this machine can read it);
- stock is consistent: per sku, available + reserved = seeded, reserved = what confirmed orders
  bought, nothing half-reserved, nothing below zero;
- the audit store holds each event of each order once (when this machine can read it).

Every run uses fresh order ids and skus (a run id prefix), so runs never disturb each other's checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.cli import broker, provision_only
from engine.config import Config
from engine.connection import connect, redact_url
from engine.errors import JetpoolError
from engine.events import Event, now_iso
from engine.lifeline import die_with_parent
from engine.publisher import Publisher
from engine.shop_cli import audit_service, timeline_table
from engine.state import KVState, StateStore
from handlers import inventory
from handlers.audit_store import SqliteAuditStore
from handlers.gateway import ControlFile, SqliteLedger
from handlers.saga import ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_PLACED

EXIT_OK, EXIT_FAILED, EXIT_TERMINATED = 0, 1, 143
_MAX_UNACKED = 2000
_EVENTS_PER_ORDER = {"confirmed": 5, "declined": 4, "out_of_stock": 6}


@dataclass(frozen=True)
class Plan:
    """What to send.

    Attributes:
        orders: how many orders.
        rate: orders per second offered (0: as fast as the broker takes them).
        skus: how many products; a tenth of them (at least one) get too little stock on purpose.
        failure_rate: gateway failure rate during the run (None: as configured).
        outage: (start_s, duration_s) of a gateway outage, from the first order.
        stall_s: give up waiting when no order ended for this long.
        seed: random seed for the orders.
    """

    orders: int = 2000
    rate: float = 150.0
    skus: int = 20
    failure_rate: float | None = None
    outage: tuple[float, float] | None = None
    stall_s: float = 60.0
    seed: int | None = None


def parse_outage(text: str) -> tuple[float, float]:
    """``START:DURATION`` in seconds, e.g. ``3:5``."""
    start, sep, duration = text.partition(":")
    try:
        window = (float(start), float(duration))
    except ValueError:
        window = (-1.0, -1.0)
    if not sep or window[0] < 0 or window[1] <= 0:
        raise JetpoolError(f"--outage: expected START:DURATION in seconds (e.g. 3:5), got {text!r}")
    return window


# ---- the orders --------------------------------------------------------------------------------------


@dataclass
class Orders:
    """This run's orders and stock."""

    run_id: str
    events: list[Event]
    stock: dict[str, int]
    by_id: dict[str, Event] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {e.aggregate_id: e for e in self.events}

    @classmethod
    def make(cls, plan: Plan) -> Orders:
        rng = random.Random(plan.seed)
        run_id = uuid.uuid4().hex[:8]
        skus = [f"{run_id}-sku-{k:02d}" for k in range(max(1, plan.skus))]
        events = []
        for n in range(plan.orders):
            order_id = f"{run_id}-{n:06d}"
            events.append(Event(type=ORDER_PLACED, aggregate_id=order_id, data={
                "order_id": order_id, "customer_id": f"c-{rng.randint(1, 500)}", "sku": rng.choice(skus),
                "qty": rng.randint(1, 3), "amount_cents": rng.randint(500, 25_000)}))
        demand = Counter[str]()
        for e in events:
            demand[e.data["sku"]] += e.data["qty"]
        scarce = max(1, len(skus) // 10)
        stock = {sku: int(demand[sku] * (0.5 if k < scarce else 1.5)) + 1 for k, sku in enumerate(skus)}
        return cls(run_id, events, stock)

    def line(self, order_id: str) -> dict[str, Any]:
        return self.by_id[order_id].data


# ---- watching orders end -------------------------------------------------------------------------


@dataclass
class Tracker:
    """When each order was placed and how (and when) it ended, on this machine's monotonic clock."""

    placed_at: dict[str, float] = field(default_factory=dict)
    ended: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # id -> (at, type, reason)
    publish_errors: int = 0

    async def on_terminal(self, msg: Any) -> None:
        now = time.monotonic()
        try:
            body = orjson.loads(msg.data)
            order_id = body["aggregate_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if order_id in self.placed_at and order_id not in self.ended:
            self.ended[order_id] = (now, body["type"], str(body.get("data", {}).get("reason", "")))

    def steady_rate(self) -> float:
        """Orders ended per second over the last three quarters of the placing period.

        While orders are being placed at a rate, this is the rate at which they end: equal to the
        offered rate when the system keeps up, its capacity when it does not. (The overall rate also
        counts the tail after the last order was placed, so it reads low for short runs.)
        """
        if len(self.placed_at) < 2:
            return 0.0
        first, last = min(self.placed_at.values()), max(self.placed_at.values())
        start = first + (last - first) / 4
        if last - start < 1.0:
            return 0.0
        ended = sum(1 for at, _, _ in self.ended.values() if start <= at <= last)
        return ended / (last - start)

    def latencies_ms(self) -> list[float]:
        return sorted((at - self.placed_at[oid]) * 1000 for oid, (at, _, _) in self.ended.items() if at)


class _Acks:
    """Counts the PubAcks of the orders we publish."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.outstanding = 0
        self.drained = asyncio.Event()

    async def on_puback(self, error: Exception | None) -> None:
        self.outstanding -= 1
        if error is not None:
            self.tracker.publish_errors += 1
        if self.outstanding <= _MAX_UNACKED // 2:
            self.drained.set()


async def place_orders(publisher: Publisher, orders: list[Event], rate: float, tracker: Tracker) -> None:
    """Publish OrderPlaced events at ``rate`` per second (0: unthrottled), never far ahead of PubAcks."""
    loop = asyncio.get_running_loop()
    acks = _Acks(tracker)
    start = loop.time()
    for i, event in enumerate(orders):
        if rate > 0:
            ahead_s = start + i / rate - loop.time()
            if ahead_s > 0.002:
                await asyncio.sleep(ahead_s)
        if acks.outstanding >= _MAX_UNACKED:
            acks.drained.clear()
            await acks.drained.wait()
        tracker.placed_at[event.aggregate_id] = time.monotonic()
        event.timestamp = now_iso()  # placed now, not when the run was planned
        acks.outstanding += 1
        await publisher.send(publisher.subject_for(event.type), event.encode(), event.headers(), acks)


# ---- the run -------------------------------------------------------------------------------------


_MARKS = {"passed": "[green]✔[/]", "failed": "[red]✘[/]", "skipped": "[dim]○[/]"}


@dataclass
class Outcome:
    """What the checks found: each line passed, failed, or was skipped (and says why)."""

    lines: list[tuple[str, str]] = field(default_factory=list)  # (passed | failed | skipped, text)

    def check(self, ok: bool, text: str) -> None:
        self.lines.append(("passed" if ok else "failed", text))

    def skip(self, check: str, why: str) -> None:
        """A check this machine cannot do (e.g. the deployment's files are elsewhere): neither ✔ nor ✘."""
        self.lines.append(("skipped", f"{check} skipped: {why}"))

    @property
    def ok(self) -> bool:
        return all(status != "failed" for status, _ in self.lines)

    def render(self) -> list[str]:
        """One line per check, then the verdict, which says how many checks were skipped."""
        lines = [f"  {_MARKS[status]} {text}" for status, text in self.lines]
        skipped = sum(1 for status, _ in self.lines if status == "skipped")
        if not self.ok:
            lines.append("[red]invariants violated[/]")
        elif skipped:
            lines.append(f"[green]all checked invariants hold[/] ({skipped} "
                         f"check{'s' if skipped > 1 else ''} skipped)")
        else:
            lines.append("[green]all invariants hold[/]")
        return lines


@dataclass(frozen=True)
class Summary:
    """The numbers of one run. Latencies are placed → ended, in milliseconds."""

    orders: int
    ended: int
    span_s: float
    orders_per_s: float
    offered_per_s: float
    steady_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    confirmed: int
    declined: int
    out_of_stock: int
    dead_lettered: int

    def render(self) -> str:
        offered = "unthrottled" if not self.offered_per_s else f"offered {self.offered_per_s:g}/s, " \
                                                                f"ended {self.steady_per_s:.0f}/s while placing"
        return (f"[bold]{self.ended} of {self.orders} orders ended in {self.span_s:.1f}s: "
                f"{self.orders_per_s:.0f} orders/s[/]  ({offered})\n"
                f"  latency placed → ended: p50 {self.p50_ms:.0f} ms  p95 {self.p95_ms:.0f} ms  "
                f"p99 {self.p99_ms:.0f} ms\n"
                f"  confirmed {self.confirmed}   cancelled {self.declined + self.out_of_stock} (payment declined "
                f"{self.declined}, out of stock {self.out_of_stock})   dead-lettered {self.dead_lettered}")


class ShopLoad:
    """One load run against a live shop deployment.

    Args:
        cfg: the shop's config, with a reachable ``nats.url``.
        plan: what to send.
        console: where the progress bar and the summary go.
    """

    def __init__(self, cfg: Config, plan: Plan, console: Console) -> None:
        self.cfg = cfg
        self.plan = plan
        self.console = console
        self.orders = Orders.make(plan)
        self.tracker = Tracker()
        self.summary: Summary | None = None
        self.started = 0.0
        self._nc: Any = None

    async def run(self) -> int:
        self._nc = await connect(self.cfg.nats, name=f"{self.cfg.app}.load")
        try:
            return await self._run()
        finally:
            await self._nc.close()

    async def _run(self) -> int:
        js = self._nc.jetstream()
        await inventory.seed(KVState(await js.key_value("stock")), self.orders.stock)
        dlq_start = await _dlq_last_seq(js, self.cfg)
        for event_type in (ORDER_CONFIRMED, ORDER_CANCELLED):
            await self._nc.subscribe(f"{self.cfg.subject_prefix}.{event_type}", cb=self.tracker.on_terminal,
                                     pending_msgs_limit=1_000_000, pending_bytes_limit=1024**3)
        publisher = Publisher(self._nc, self.cfg.subject_prefix, self.cfg.nats.publish_timeout_s)
        await publisher.start()
        control = self._control()
        try:
            self._apply_failure_rate(control)
            self.started = time.monotonic()
            with self._progress() as progress:
                outage = asyncio.create_task(self._outage(control))
                placing = asyncio.create_task(place_orders(publisher, self.orders.events, self.plan.rate,
                                                           self.tracker))
                try:
                    await self._wait(progress, placing)
                finally:
                    for task in (outage, placing):
                        task.cancel()
                    await asyncio.gather(outage, placing, return_exceptions=True)
        finally:
            if control is not None:
                control.write()
            await publisher.stop()
        return await self._report(js, dlq_start)

    # ---- gateway control ----

    def _control(self) -> ControlFile | None:
        settings = self._gateway_settings()
        path = settings.get("control_file")
        wanted = self.plan.outage is not None or self.plan.failure_rate is not None
        if wanted and not path:
            raise JetpoolError(f"{self.cfg.source}: --outage and --failure-rate need the payments service's "
                               "settings.gateway.control_file")
        return ControlFile(path) if path and wanted else None

    def _gateway_settings(self) -> dict[str, Any]:
        for svc in self.cfg.services.values():
            if "handlers.payments:charge" in svc.routes.values():
                gateway = svc.settings.get("gateway", {})
                return gateway if isinstance(gateway, dict) else {}
        return {}

    def _apply_failure_rate(self, control: ControlFile | None) -> None:
        if control is not None and self.plan.failure_rate is not None:
            control.write(failure_rate=self.plan.failure_rate)

    async def _outage(self, control: ControlFile | None) -> None:
        if control is None or self.plan.outage is None:
            return
        start_s, duration_s = self.plan.outage
        rate = {} if self.plan.failure_rate is None else {"failure_rate": self.plan.failure_rate}
        await asyncio.sleep(start_s)
        control.write(outage=True, **rate)
        self._note(f"gateway outage started ({duration_s:g}s)")
        await asyncio.sleep(duration_s)
        control.write(**rate)
        self._note("gateway outage ended")

    def _note(self, text: str) -> None:
        self.console.print(f"[dim]t+{time.monotonic() - self.started:.1f}s[/] {text}")

    # ---- waiting ----

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console,
                        transient=False)

    async def _wait(self, progress: Progress, placing: asyncio.Task[None]) -> None:
        total = len(self.orders.events)
        placed_bar = progress.add_task("placed", total=total, rate="")
        ended_bar = progress.add_task("ended", total=total, rate="")
        last_count, last_change = 0, time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            ended = len(self.tracker.ended)
            elapsed = max(1e-6, now - self.started)
            progress.update(placed_bar, completed=len(self.tracker.placed_at),
                            rate=f"{len(self.tracker.placed_at) / elapsed:7.0f}/s")
            progress.update(ended_bar, completed=ended, rate=f"{ended / elapsed:7.0f}/s")
            failure = placing.exception() if placing.done() else None
            if failure is not None:
                raise failure
            if ended >= total:
                return
            if ended != last_count:
                last_count, last_change = ended, now
            elif now - last_change > self.plan.stall_s:
                self._note(f"no order ended for {self.plan.stall_s:g}s: giving up waiting")
                return

    # ---- the report ----

    async def _report(self, js: Any, dlq_start: int) -> int:
        outcome = Outcome()
        records = await self._order_records(js)
        dead = await dead_lettered_orders(js, self.cfg, dlq_start, self.orders.run_id)
        kinds = self._classify(records)
        self._print_numbers(kinds, dead)
        lost = [oid for oid in self.orders.by_id if oid not in kinds and oid not in dead]
        outcome.check(not lost and self.tracker.publish_errors == 0,
                      f"{len(lost)} orders lost" + (f" (e.g. {lost[0]})" if lost else "")
                      + (f", {self.tracker.publish_errors} publishes failed" if self.tracker.publish_errors else ""))
        self._check_charges(outcome, kinds)
        await self._check_stock(KVState(await js.key_value("stock")), outcome, kinds)
        example = await self._check_audit(outcome, kinds)
        *checks, verdict = outcome.render()
        for line in checks:
            self.console.print(line)
        if example is not None:
            self.console.print(example)
        self.console.print(verdict)
        return EXIT_OK if outcome.ok else EXIT_FAILED

    async def _order_records(self, js: Any) -> dict[str, Any]:
        """Orders-bucket records of orders whose end we did not see (a missed message, or not ended)."""
        missing = [oid for oid in self.orders.by_id if oid not in self.tracker.ended]
        if not missing:
            return {}
        store = KVState(await js.key_value("orders"))
        return {oid: (await store.get(oid))[0] for oid in missing}

    def _classify(self, records: dict[str, Any]) -> dict[str, str]:
        """Order id -> confirmed | declined | out_of_stock, for every order that ended."""
        kinds: dict[str, str] = {}
        for oid, (_, event_type, reason) in self.tracker.ended.items():
            kinds[oid] = _kind(event_type == ORDER_CONFIRMED, reason)
        for oid, record in records.items():
            if record and record.get("terminal"):
                terminal = record["terminal"]
                kinds[oid] = _kind(terminal["type"] == ORDER_CONFIRMED, terminal["reason"])
        return kinds

    def _print_numbers(self, kinds: dict[str, str], dead: set[str]) -> None:
        ended_at = [at for at, _, _ in self.tracker.ended.values()]
        span_s = (max(ended_at) - self.started) if ended_at else 0.0
        latencies = self.tracker.latencies_ms()
        counts = Counter(kinds.values())
        self.summary = Summary(
            orders=len(self.orders.events), ended=len(kinds), span_s=span_s,
            orders_per_s=len(kinds) / span_s if span_s else 0.0, offered_per_s=self.plan.rate,
            steady_per_s=self.tracker.steady_rate(),
            p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95), p99_ms=percentile(latencies, 99),
            confirmed=counts["confirmed"], declined=counts["declined"], out_of_stock=counts["out_of_stock"],
            dead_lettered=len(dead))
        self.console.print()
        self.console.print(self.summary.render())

    def _check_charges(self, outcome: Outcome, kinds: dict[str, str]) -> None:
        path = self._gateway_settings().get("ledger")
        if not path or not Path(path).exists():
            outcome.skip("double-charge check", f"the gateway ledger {path} is not on this machine" if path
                         else f"{self.cfg.source} names no gateway ledger (payments settings.gateway.ledger)")
            return
        ledger = SqliteLedger(path)
        try:
            moves = {oid: [kind for kind, _ in ledger.movements(oid)] for oid in self.orders.by_id}
        finally:
            ledger.close()
        doubles = [oid for oid, m in moves.items() if m.count("charge") > 1 or m.count("refund") > 1]
        charged = sum(1 for m in moves.values() if "charge" in m)
        refunds = sum(1 for m in moves.values() if "refund" in m)
        wrong = [oid for oid, kind in kinds.items()
                 if ("charge" in moves[oid]) != (kind != "declined")
                 or ("refund" in moves[oid]) != (kind == "out_of_stock")]
        outcome.check(not doubles and not wrong,
                      f"no double charge: {charged} orders charged once, {refunds} refunded once"
                      + (f"; [red]{len(doubles)} charged or refunded twice[/]" if doubles else "")
                      + (f"; [red]{len(wrong)} orders' money does not match their end (e.g. {wrong[0]})[/]"
                         if wrong else ""))

    async def _check_stock(self, store: StateStore, outcome: Outcome, kinds: dict[str, str]) -> None:
        sold = Counter[str]()
        for oid, kind in kinds.items():
            if kind == "confirmed":
                line = self.orders.line(oid)
                sold[line["sku"]] += line["qty"]
        problems = []
        for sku, seeded in self.orders.stock.items():
            level, _ = await store.get(inventory.sku_key(sku))
            level = level or {"available": 0, "reserved": 0, "pending": {}}
            if (level["available"] < 0 or level["available"] + level["reserved"] != seeded
                    or level["reserved"] != sold[sku] or level["pending"]):
                problems.append(f"{sku}: seeded {seeded}, sold {sold[sku]}, now {level}")
        total = sum(self.orders.stock.values())
        outcome.check(not problems, f"stock consistent over {len(self.orders.stock)} skus: {sum(sold.values())} "
                                    f"of {total} units sold, none oversold, none left half-reserved"
                      + (f"; [red]{problems[0]}[/]" if problems else ""))

    async def _check_audit(self, outcome: Outcome, kinds: dict[str, str]) -> Any:
        try:
            service = audit_service(self.cfg)
        except JetpoolError as exc:
            outcome.skip("audit check", str(exc))
            return None
        path = Path(str(self.cfg.services[service].settings.get("db_path", "")))
        if not path.exists():
            outcome.skip("audit check", f"the audit store {path} is not on this machine")
            return None
        store = SqliteAuditStore(path)
        try:
            expected = sum(_EVENTS_PER_ORDER[k] for k in kinds.values())
            stored = await _wait_audit(store, self.orders.run_id, expected)
            outcome.check(stored == expected, f"audit: {stored} events stored once each "
                                              f"(expected {expected} for the orders that ended)")
            example = _example(kinds)
            return timeline_table(example, await store.timeline(example)) if example else None
        finally:
            store.close()


def _kind(confirmed: bool, reason: str) -> str:
    if confirmed:
        return "confirmed"
    return "declined" if reason.startswith("payment declined") else "out_of_stock"


def _example(kinds: dict[str, str]) -> str | None:
    """The most telling order to show: one that was charged, ran out of stock and was refunded."""
    for wanted in ("out_of_stock", "confirmed", "declined"):
        for oid, kind in sorted(kinds.items()):
            if kind == wanted:
                return oid
    return None


async def _wait_audit(store: SqliteAuditStore, run_id: str, expected: int, timeout_s: float = 30.0) -> int:
    """Audit runs behind the saga: give it a moment to catch up."""
    deadline = time.monotonic() + timeout_s
    while True:
        stored = await store.count(order_prefix=run_id + "-")
        if stored >= expected or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.2)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def _dlq_last_seq(js: Any, cfg: Config) -> int:
    stream = _dlq_stream(cfg)
    with contextlib.suppress(Exception):
        return int((await js.stream_info(stream)).state.last_seq)
    return 0


def _dlq_stream(cfg: Config) -> str:
    dead_letter = getattr(cfg, "dead_letter", None)
    return str(getattr(dead_letter, "stream", "DLQ"))


async def dead_lettered_orders(js: Any, cfg: Config, after_seq: int, run_id: str) -> set[str]:
    """Order ids of this run with an event in the dead-letter stream."""
    stream, found = _dlq_stream(cfg), set()
    with contextlib.suppress(Exception):
        last = int((await js.stream_info(stream)).state.last_seq)
        for seq in range(after_seq + 1, last + 1):
            with contextlib.suppress(Exception):
                body = orjson.loads((await js.get_msg(stream, seq)).data)
                if str(body.get("aggregate_id", "")).startswith(run_id + "-"):
                    found.add(body["aggregate_id"])
    return found


# ---- the engine subprocess -----------------------------------------------------------------------


class EngineProcess:
    """``python -m engine run`` in its own session, logging to a file; stopped by PID, children included.

    Args:
        config_path: the YAML file.
        url: the broker; given in the environment (``JETPOOL_NATS_URL``), never in the argv, which
            ``ps`` shows to every user of the machine.
        log_path: where its output goes.
        env: extra environment (e.g. ``JETPOOL__...`` overrides).
        log_level: the config's log level (the engine logs at least ``info``).
    """

    def __init__(self, config_path: str, url: str, log_path: Path, env: dict[str, str],
                 log_level: str = "info") -> None:
        self.config_path = config_path
        self.log_level = log_level
        self.url = url
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Readiness is read from the log's worker.started lines, so the log keeps at least info level.
        command = [sys.executable, "-m", "engine", "run", "-c", self.config_path,
                   "--no-provision", "--log-level", "debug" if self.log_level == "debug" else "info"]
        # The URL (which may hold a password) goes in the environment, not the argv; JETPOOL__NATS__URL
        # would take precedence over it, so it is dropped.
        env = {k: v for k, v in {**os.environ, **self.env}.items() if k.upper() != "JETPOOL__NATS__URL"}
        env["JETPOOL_NATS_URL"] = self.url
        with open(self.log_path, "ab") as out:
            # Tied to this (main) thread: a SIGKILLed demo leaves no engine consuming behind it. SIGHUP,
            # which the supervisor drains on however many times it comes (once per exiting thread).
            self.proc = subprocess.Popen(command, stdout=out, stderr=out, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent(signal.SIGHUP))

    async def wait_ready(self, workers: int, timeout_s: float = 60.0) -> None:
        """Wait for ``workers`` worker.started lines of this process's log."""
        assert self.proc is not None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise JetpoolError(f"the engine exited with code {self.proc.returncode}; see {self.log_path}")
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                if log.read().count(b'"worker.started"') >= workers:
                    self._remember_children()
                    return
            await asyncio.sleep(0.1)
        raise JetpoolError(f"the engine did not start {workers} workers within {timeout_s:g}s; see {self.log_path}")

    def _remember_children(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen[child.pid] = child

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the engine drains), then SIGKILL whatever of its tree is left; the exit code."""
        if self.proc is None:
            return None
        self._remember_children()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker it had, by PID (the psutil handle checks PID reuse)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        for child in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()
        psutil.wait_procs(list(self._seen.values()), timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


async def run_demo(cfg: Config, plan: Plan, log_path: Path, breaker_reset_s: float | None,
                   console: Console | None = None) -> int:
    """The whole demo: broker, provision, engine, load, report, stop. SIGTERM stops it like Ctrl-C does."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        async with broker(cfg) as live:
            return await _demo_on(live, plan, log_path, breaker_reset_s, console or Console())
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio turns it back into KeyboardInterrupt
        return EXIT_TERMINATED
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _demo_on(cfg: Config, plan: Plan, log_path: Path, breaker_reset_s: float | None, console: Console) -> int:
    await provision_only(cfg)
    env = {"JETPOOL_HTTP_PORT": os.environ.get("JETPOOL_HTTP_PORT", "0")}
    if breaker_reset_s is not None:
        env["JETPOOL__BREAKERS__PAYMENT_GATEWAY__RESET_TIMEOUT_S"] = str(breaker_reset_s)
    workers = sum(svc.workers for svc in cfg.services.values())
    engine = EngineProcess(cfg.source, str(cfg.nats.url), log_path, env, cfg.log.level)
    console.print(f"jetpool demo: broker {redact_url(str(cfg.nats.url))}, {len(cfg.services)} services in "
                  f"{workers} worker processes (log: {log_path})")
    breaker = cfg.breakers.get("payment_gateway")
    reset_s = breaker_reset_s if breaker_reset_s is not None else breaker.reset_timeout_s if breaker else None
    if plan.outage is not None and reset_s is not None:
        console.print(f"the payment_gateway breaker waits {reset_s:g}s before each trial after it opens"
                      + ("" if breaker_reset_s is not None else " (--breaker-reset-s changes that)"))
    engine.start()
    try:
        await engine.wait_ready(workers)
        console.print(_describe(plan))
        code = await ShopLoad(cfg, plan, console).run()
    except BaseException:
        engine.kill()  # Ctrl-C or a failure: no drain, just make sure nothing is left behind
        raise
    exit_code = await asyncio.to_thread(engine.stop)
    if exit_code not in (0, None):
        console.print(f"[yellow]the engine exited with code {exit_code} (see {log_path})[/]")
    return code


async def run_load(cfg: Config, plan: Plan, console: Console | None = None) -> int:
    """Only the load, against a running deployment."""
    console = console or Console()
    console.print(_describe(plan))
    return await ShopLoad(cfg, plan, console).run()


def _describe(plan: Plan) -> str:
    parts = [f"{plan.orders} orders", "unthrottled" if not plan.rate else f"at {plan.rate:g}/s",
             f"{plan.skus} skus"]
    if plan.failure_rate is not None:
        parts.append(f"gateway failure rate {plan.failure_rate:g}")
    if plan.outage is not None:
        parts.append(f"gateway outage of {plan.outage[1]:g}s at {plan.outage[0]:g}s")
    return "placing " + ", ".join(parts)

