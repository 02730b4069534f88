"""``jetpool load`` (and the load half of ``jetpool demo``): drive the shop with orders, then prove its invariants.

``load`` runs against a deployment that is already running (a Kubernetes cluster, say): seed the stock
of this run's skus, place orders at a rate — ``POST /orders`` to the order API with an ``Idempotency-Key``
each, at most ``concurrency`` requests in flight (a 503 or a lost connection is retried with the same key),
or with ``--direct`` ``OrderPlaced`` published straight to the stream, to measure the event path alone —
watch OrderConfirmed / OrderCancelled go by (a plain subscription; latency is measured on this machine's
clock from the POST, or the publish), wait until every order has ended, read each order's outcome
(``GET /orders/{id}`` through the API, else the orders bucket), then check that no order is lost (each
ended, or is in the dead-letter stream) and the invariants of :mod:`handlers.tools.invariants` (the
ledger and audit checks only when this machine reaches the shop's database: otherwise they are
reported as skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.config import Config
from engine.connection import connect
from engine.errors import JetpoolError
from engine.events import Event, now_iso
from engine.publisher import Publisher
from engine.state import KVState, StateStore
from handlers import inventory
from handlers.api.orders_input import FIELDS
from handlers.audit_store import AuditStore
from handlers.database import DatabaseError, database_url
from handlers.gateway import GatewayClient, GatewayError, GatewayNotConfigured, gateway_settings, gateway_url
from handlers.orders import CANCELLED, CONFIRMED
from handlers.saga import ORDER_CANCELLED, ORDER_CONFIRMED
from handlers.tools.audit_cli import open_audit_store, timeline_table
from handlers.tools.invariants import EVENTS_PER_ORDER, Check, check_audit, check_money, check_stock
from handlers.tools.orders import Orders, Plan, kind_of, percentile

EXIT_OK, EXIT_FAILED = 0, 1
_MAX_UNACKED = 2000
_POST_ATTEMPTS = 8  # a 503 (the broker is not answering) or a lost connection: retried with the same key
_READERS = 32  # GET /orders/{id} in flight while reading outcomes


# ---- watching orders end -------------------------------------------------------------------------


@dataclass
class Tracker:
    """When each order was placed and how (and when) it ended, on this machine's monotonic clock."""

    placed_at: dict[str, float] = field(default_factory=dict)
    ended: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # id -> (at, type, reason)
    publish_errors: int = 0
    first_error: str = ""

    def failed(self, error: str) -> None:
        """An order that could not be placed."""
        self.publish_errors += 1
        self.first_error = self.first_error or error

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
            self.tracker.failed(f"{type(error).__name__}: {error}")
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


async def post_orders(session: aiohttp.ClientSession, orders: Orders, rate: float, tracker: Tracker,
                      concurrency: int) -> None:
    """POST each order to the API at ``rate`` per second (0: unthrottled), ``concurrency`` requests at most."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()
    start = loop.time()
    try:
        for i, event in enumerate(orders.events):
            if rate > 0:
                ahead_s = start + i / rate - loop.time()
                if ahead_s > 0.002:
                    await asyncio.sleep(ahead_s)
            await slots.acquire()
            task = asyncio.create_task(_post(session, orders.keys[event.aggregate_id], event, tracker, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)
    finally:
        for task in running:
            task.cancel()


async def _post(session: aiohttp.ClientSession, key: str, event: Event, tracker: Tracker,
                slots: asyncio.Semaphore) -> None:
    """One order placed: 202, or retried with the same key while the API answers 5xx or not at all."""
    body = orjson.dumps({name: event.data[name] for name in FIELDS})
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    tracker.placed_at[event.aggregate_id] = time.monotonic()
    error = ""
    try:
        for attempt in range(_POST_ATTEMPTS):
            try:
                async with session.post("/orders", data=body, headers=headers) as response:
                    if response.status == 202:
                        return
                    error = f"POST /orders answered {response.status}: {(await response.text())[:200]}"
                    if response.status < 500:
                        break  # our request is wrong: a retry would be too
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = f"POST /orders: {type(exc).__name__}: {exc}"
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        tracker.failed(error)
    finally:
        slots.release()


# ---- the run -------------------------------------------------------------------------------------


_MARKS = {"passed": "[green]✔[/]", "failed": "[red]✘[/]", "skipped": "[dim]○[/]"}


@dataclass
class Outcome:
    """What the checks found: each line passed, failed, or was skipped (and says why)."""

    lines: list[tuple[str, str]] = field(default_factory=list)  # (passed | failed | skipped, text)

    def check(self, ok: bool, text: str) -> None:
        self.lines.append(("passed" if ok else "failed", text))

    def add(self, check: Check) -> None:
        """An invariant's line: its summary, then each problem in red."""
        self.check(check.ok, check.summary + "".join(f"; [red]{p}[/]" for p in check.problems))

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
        api_url: the order API's base URL; None: publish OrderPlaced straight to the stream.
    """

    def __init__(self, cfg: Config, plan: Plan, console: Console, api_url: str | None = None) -> None:
        self.cfg = cfg
        self.plan = plan
        self.console = console
        self.api_url = api_url
        self.orders = Orders.make(plan, keyed=True)
        self.tracker = Tracker()
        self.summary: Summary | None = None
        self.started = 0.0
        self._nc: Any = None
        self._http: aiohttp.ClientSession | None = None

    async def run(self) -> int:
        self._nc = await connect(self.cfg.nats, name=f"{self.cfg.app}.load")
        try:
            if self.api_url is None:
                return await self._run()
            connector = aiohttp.TCPConnector(limit=max(self.plan.concurrency, _READERS))
            timeout = aiohttp.ClientTimeout(total=60, connect=5)
            async with aiohttp.ClientSession(self.api_url, connector=connector, timeout=timeout) as self._http:
                return await self._run()
        finally:
            self._http = None
            await self._nc.close()

    def _placing(self, publisher: Publisher) -> asyncio.Task[None]:
        if self._http is None:
            return asyncio.create_task(place_orders(publisher, self.orders.events, self.plan.rate, self.tracker))
        return asyncio.create_task(post_orders(self._http, self.orders, self.plan.rate, self.tracker,
                                               self.plan.concurrency))

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
            await self._apply_failure_rate(control)
            self.started = time.monotonic()
            with self._progress() as progress:
                outage = asyncio.create_task(self._outage(control))
                placing = self._placing(publisher)
                try:
                    await self._wait(progress, placing)
                finally:
                    for task in (outage, placing):
                        task.cancel()
                    await asyncio.gather(outage, placing, return_exceptions=True)
        finally:
            if control is not None:
                with contextlib.suppress(GatewayError):
                    await control.reset_faults()
                await control.close()
            await publisher.stop()
        return await self._report(js, dlq_start)

    # ---- gateway control ----

    def _control(self) -> GatewayClient | None:
        """The gateway's admin client, when the plan changes its faults."""
        if self.plan.outage is None and self.plan.failure_rate is None:
            return None
        try:
            return GatewayClient(gateway_url(self._gateway_settings()))
        except GatewayNotConfigured as exc:
            raise JetpoolError(f"{self.cfg.source}: --outage and --failure-rate need the gateway's admin "
                               f"endpoint: {exc}") from None

    def _gateway_settings(self) -> dict[str, Any]:
        return gateway_settings(self.cfg)

    async def _apply_failure_rate(self, control: GatewayClient | None) -> None:
        if control is not None and self.plan.failure_rate is not None:
            await control.set_faults(failure_rate=self.plan.failure_rate)

    async def _outage(self, control: GatewayClient | None) -> None:
        if control is None or self.plan.outage is None:
            return
        start_s, duration_s = self.plan.outage
        rate = {} if self.plan.failure_rate is None else {"failure_rate": self.plan.failure_rate}
        await asyncio.sleep(start_s)
        await control.set_faults(outage=True, **rate)
        self._note(f"gateway outage started ({duration_s:g}s)")
        await asyncio.sleep(duration_s)
        await control.set_faults(outage=False, **rate)
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
        kinds = await self._api_outcomes() if self._http is not None else self._classify(await self._order_records(js))
        dead = await dead_lettered_orders(js, self.cfg, dlq_start, set(self.orders.by_id))
        self._print_numbers(kinds, dead)
        lost = [oid for oid in self.orders.by_id if oid not in kinds and oid not in dead]
        failed = self.tracker.publish_errors
        outcome.check(not lost and failed == 0,
                      f"{len(lost)} orders lost" + (f" (e.g. {lost[0]})" if lost else "")
                      + (f", {failed} orders not placed ({self.tracker.first_error})" if failed else ""))
        await self._check_charges(outcome, kinds)
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

    async def _api_outcomes(self) -> dict[str, str]:
        """Order id -> confirmed | declined | out_of_stock for every order that ended, as ``GET /orders/{id}``
        tells (an order whose end we did not see is waited for a moment)."""
        assert self._http is not None
        http, readers, kinds = self._http, asyncio.Semaphore(_READERS), dict[str, str]()

        async def read(oid: str) -> None:
            wait = "" if oid in self.tracker.ended else "?wait=1s"
            try:
                async with readers, http.get(f"/orders/{oid}{wait}") as response:
                    if response.status != 200:
                        return
                    state = await response.json()
            except (TimeoutError, aiohttp.ClientError):
                return  # not read: counted as lost, never as ended
            ended_by = state.get("ended_by") or {}
            if state["status"] in (CONFIRMED, CANCELLED) and ended_by:
                kinds[oid] = kind_of(state["status"] == CONFIRMED, str(ended_by.get("reason") or ""))

        await asyncio.gather(*(read(oid) for oid in self.orders.by_id))
        return kinds

    def _classify(self, records: dict[str, Any]) -> dict[str, str]:
        """Order id -> confirmed | declined | out_of_stock, for every order that ended."""
        kinds: dict[str, str] = {}
        for oid, (_, event_type, reason) in self.tracker.ended.items():
            kinds[oid] = kind_of(event_type == ORDER_CONFIRMED, reason)
        for oid, record in records.items():
            if record and record.get("terminal"):
                terminal = record["terminal"]
                kinds[oid] = kind_of(terminal["type"] == ORDER_CONFIRMED, terminal["reason"])
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

    async def _check_charges(self, outcome: Outcome, kinds: dict[str, str]) -> None:
        try:
            dsn = database_url()
        except DatabaseError:
            outcome.skip("double-charge check", "the gateway's ledger is not reachable from here "
                         "(no JETPOOL_SHOP_DATABASE_URL, no embedded PostgreSQL running)")
            return
        outcome.add(await check_money(dsn, self.orders.by_id, kinds))

    async def _check_stock(self, store: StateStore, outcome: Outcome, kinds: dict[str, str]) -> None:
        outcome.add(await check_stock(store, self.orders, kinds))

    async def _check_audit(self, outcome: Outcome, kinds: dict[str, str]) -> Any:
        async with contextlib.AsyncExitStack() as stack:
            try:
                store, _ = await stack.enter_async_context(open_audit_store(self.cfg, start=False))
            except JetpoolError as exc:  # no audit service, or a store this machine cannot reach
                outcome.skip("audit check", str(exc))
                return None
            expected = sum(EVENTS_PER_ORDER[k] for k in kinds.values())
            stored = await _wait_audit(store, kinds, expected)
            outcome.add(check_audit(stored, expected, "for the orders that ended"))
            example = _example(kinds)
            return timeline_table(example, await store.timeline(example)) if example else None


def _example(kinds: dict[str, str]) -> str | None:
    """The most telling order to show: one that was charged, ran out of stock and was refunded."""
    for wanted in ("out_of_stock", "confirmed", "declined"):
        for oid, kind in sorted(kinds.items()):
            if kind == wanted:
                return oid
    return None


async def _wait_audit(store: AuditStore, kinds: dict[str, str], expected: int, timeout_s: float = 30.0) -> int:
    """The events the store holds of the ended orders. Audit runs behind the saga: give it a moment to catch
    up; each round re-reads only the orders whose timelines are not complete yet."""
    deadline = time.monotonic() + timeout_s
    stored: dict[str, int] = {}
    readers = asyncio.Semaphore(8)

    async def read(oid: str) -> None:
        async with readers:
            stored[oid] = len(await store.timeline(oid))

    while True:
        await asyncio.gather(*(read(oid) for oid, kind in kinds.items()
                               if stored.get(oid, 0) < EVENTS_PER_ORDER[kind]))
        total = sum(stored.values())
        if total >= expected or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.2)


async def _dlq_last_seq(js: Any, cfg: Config) -> int:
    stream = _dlq_stream(cfg)
    with contextlib.suppress(Exception):
        return int((await js.stream_info(stream)).state.last_seq)
    return 0


def _dlq_stream(cfg: Config) -> str:
    dead_letter = getattr(cfg, "dead_letter", None)
    return str(getattr(dead_letter, "stream", "DLQ"))


async def dead_lettered_orders(js: Any, cfg: Config, after_seq: int, orders: str | set[str]) -> set[str]:
    """Order ids of this run with an event in the dead-letter stream: the run's ``orders`` (ids), or the
    orders whose ids start with ``orders`` + ``-`` (a run id)."""
    stream, found = _dlq_stream(cfg), set()
    with contextlib.suppress(Exception):
        last = int((await js.stream_info(stream)).state.last_seq)
        for seq in range(after_seq + 1, last + 1):
            with contextlib.suppress(Exception):
                body = orjson.loads((await js.get_msg(stream, seq)).data)
                oid = str(body.get("aggregate_id", ""))
                if oid in orders if isinstance(orders, set) else oid.startswith(orders + "-"):
                    found.add(oid)
    return found




async def run_load(cfg: Config, plan: Plan, api_url: str | None, console: Console | None = None) -> int:
    """Only the load, against a running deployment: through its API at ``api_url`` (None: to the stream)."""
    console = console or Console()
    console.print(describe(plan, api_url))
    return await ShopLoad(cfg, plan, console, api_url).run()


def describe(plan: Plan, api_url: str | None) -> str:
    """The plan in words, for the console."""
    parts = [f"{plan.orders} orders", "unthrottled" if not plan.rate else f"at {plan.rate:g}/s",
             f"{plan.skus} skus"]
    parts.append(f"POST {api_url}/orders ({plan.concurrency} requests at most in flight)" if api_url
                 else "OrderPlaced published straight to the stream")
    if plan.failure_rate is not None:
        parts.append(f"gateway failure rate {plan.failure_rate:g}")
    if plan.outage is not None:
        parts.append(f"gateway outage of {plan.outage[1]:g}s at {plan.outage[0]:g}s")
    return "placing " + ", ".join(parts)

