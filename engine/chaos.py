"""``jetpool chaos``: faults injected into the running shop under load, each run ending in a row of numbers.

Every scenario drives the real thing: a nats-server process, the engine as a ``python -m engine run``
process tree with all five services, orders placed by a producer that re-sends every unacknowledged
publish under the same ``Nats-Msg-Id`` (as a storefront that must not lose an order would), and a
real fault — ``kill -9`` of workers or of the broker, SIGTERM to the supervisor, the gateway's
outage switch, or bad input. When the shop has settled, the scenario reads back what happened from
the stream, the dead-letter stream, the gateway's ledger, the stock bucket and the audit store:

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

The chaos shop is ``config/shop.yaml`` with these changes (:func:`chaos_config`), none of which
weakens a guarantee: its own broker and files; ``ack_wait_s`` 5 (a killed worker's messages come back
after ack_wait: 30 s would only lengthen every recovery); fast retries (``retry`` 0.1-0.5 s, so a
poison event spends its ``max_deliver`` attempts in seconds); a 5 s breaker reset; a supervisor that
restarts workers within a second and tolerates the kill loop (``max_restarts``); a stream
``max_msg_size`` of 256 KiB (below the server's 1 MiB ``max_payload``, so the *stream* refuses bigger
events and says so in the PubAck) and ``max_event_bytes`` 64 KiB; and payments' OrderPlaced route
goes through :func:`charge`, which is the shop's own ``handlers.payments:charge`` unless the order
carries a ``chaos`` marker (``poison``: always raise; ``hang``: hang on the first attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import orjson
import psutil
import structlog
import yaml
from nats.js import api
from rich.console import Console
from rich.table import Table

from engine import Context, Event
from engine.cli import provision_only
from engine.config import Config, load_config
from engine.connection import connect
from engine.demo import EngineProcess, Orders, Plan, percentile
from engine.embedded import EmbeddedServer
from engine.errors import JetpoolError, PublishError
from engine.events import MSG_ID_HEADER
from engine.logs import json_records
from engine.publisher import Publisher
from engine.state import KVState
from handlers import inventory, payments
from handlers.audit_store import SqliteAuditStore
from handlers.gateway import ControlFile, SqliteLedger
from handlers.saga import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_PLACED,
    PAYMENT_AUTHORIZED,
    PAYMENT_DECLINED,
    PRODUCERS,
)

log = structlog.get_logger("jetpool.chaos")

SHOP_YAML = Path("config/shop.yaml")
RATE = 150.0  # orders/s offered at full size: well inside what the shop sustains on a 2-core machine

# ---- what the chaos shop changes in config/shop.yaml (see the module docstring for why) ---------------

ACK_WAIT_S = 5.0
BREAKER_RESET_S = 5.0
STREAM_MAX_MSG_BYTES = 256 * 1024
MAX_EVENT_BYTES = 64 * 1024
RETRY = {"base_s": 0.1, "max_s": 0.5}
SUPERVISOR = {"restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0, "max_restarts": 10_000, "restart_window_s": 60}
GATEWAY_POLL_S = 0.1
DRAIN_MARGIN_S = 5.0  # the supervisor kills what is left this long after the largest drain_timeout_s

CHARGE = "handlers.payments:charge"
CHAOS_CHARGE = "engine.chaos:charge"
AUDIT = "handlers.audit:record"
MARKER = "chaos"
TERMINAL = (ORDER_CONFIRMED, ORDER_CANCELLED)
PAYMENT_OUTPUTS = (PAYMENT_AUTHORIZED, PAYMENT_DECLINED)
MONEY = {"confirmed": ["charge"], "declined": [], "out_of_stock": ["charge", "refund"], "open": []}


async def charge(event: Event, ctx: Context) -> Event:
    """The shop's ``charge``, except for orders marked ``poison`` (always raise) or ``hang`` (first attempt)."""
    marker = event.data.get(MARKER)
    if marker == "poison":
        raise RuntimeError(f"poison order {event.aggregate_id}: this handler always fails on it")
    if marker == "hang" and ctx.attempt == 1:
        log.warning("chaos.hang", event_id=event.id, order_id=event.aggregate_id)
        await asyncio.sleep(3600)
    return await payments.charge(event, ctx)


def chaos_config(base: dict[str, Any], workdir: Path, url: str) -> dict[str, Any]:
    """``base`` (the shop's YAML, loaded) turned into the chaos shop: own broker and files, fast recovery."""
    raw = json.loads(json.dumps(base))
    raw["nats"] = {**raw.get("nats", {}), "url": url, "store_dir": str(workdir / "nats")}
    raw["http"] = {"host": "127.0.0.1", "port": 0}
    raw["log"] = {"level": "info", "format": "json"}
    raw["supervisor"] = dict(SUPERVISOR)
    for breaker in raw.get("breakers", {}).values():
        breaker["reset_timeout_s"] = BREAKER_RESET_S
    for stream in raw["streams"]:
        stream["max_msg_size"] = STREAM_MAX_MSG_BYTES
    for svc in raw["services"].values():
        svc.update(ack_wait_s=ACK_WAIT_S, retry=dict(RETRY), max_event_bytes=MAX_EVENT_BYTES)
        routes = svc["routes"]
        if routes.get(ORDER_PLACED) == CHARGE:
            routes[ORDER_PLACED] = CHAOS_CHARGE
            gateway = svc.setdefault("settings", {}).setdefault("gateway", {})
            gateway.update(ledger=str(workdir / "gateway" / "ledger.sqlite"),
                           control_file=str(workdir / "gateway" / "control.json"), control_poll_s=GATEWAY_POLL_S)
        if AUDIT in routes.values():
            svc.setdefault("settings", {})["db_path"] = str(workdir / "audit.sqlite")
    return dict(raw)


# ---- the result --------------------------------------------------------------------------------------


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


# ---- the shop under test -----------------------------------------------------------------------------


class Shop:
    """A private nats-server, the chaos config of the shop, and the engine running it; all stopped by PID.

    Args:
        workdir: where the broker's store, the config, the engine's log, the ledger and the audit store go.
        base_config: the shop's YAML to start from.
    """

    def __init__(self, workdir: Path, base_config: Path = SHOP_YAML) -> None:
        self.workdir = Path(workdir)
        self.base_config = Path(base_config)
        self.server = EmbeddedServer(store_dir=self.workdir / "nats")
        self.config_path = self.workdir / "shop-chaos.yaml"
        self.log_path = self.workdir / "engine.log"
        self.engine: EngineProcess | None = None
        self._cfg: Config | None = None
        self._seen: dict[int, psutil.Process] = {}

    @property
    def cfg(self) -> Config:
        assert self._cfg is not None, "the shop is not started"
        return self._cfg

    async def start(self) -> Shop:
        """Start the broker, write and provision the config, start the engine and wait for its workers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.server.start)
        base = yaml.safe_load(self.base_config.read_text())
        self.config_path.write_text(yaml.safe_dump(chaos_config(base, self.workdir, self.server.url), sort_keys=False))
        self._cfg = load_config(self.config_path)
        await provision_only(self.cfg)
        await self.start_engine()
        return self

    async def start_engine(self) -> None:
        self.engine = EngineProcess(str(self.config_path), self.server.url, self.log_path, {}, "info")
        self.engine.start()
        await self.engine.wait_ready(sum(s.workers for s in self.cfg.services.values()), timeout_s=120)
        self.workers()

    def close(self) -> None:
        """Stop the engine (drain, then SIGKILL what is left, by PID) and the broker."""
        try:
            if self.engine is not None and self.engine.proc is not None:
                self.engine.stop(timeout_s=30)
            for proc in self._seen.values():
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        finally:
            self.server.stop()

    def workers(self) -> list[psutil.Process]:
        """The engine's live worker processes (its spawned children, not multiprocessing's resource tracker)."""
        if self.engine is None or self.engine.proc is None:
            return []
        try:
            children = psutil.Process(self.engine.proc.pid).children()
        except psutil.Error:
            return []
        out = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if "spawn_main" in " ".join(child.cmdline()):
                    self._seen.setdefault(child.pid, child)
                    out.append(child)
        return out

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the live workers and the broker have used so far."""
        procs = self.workers()
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(self.server.pid))
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def services_by_pid(self) -> dict[int, str]:
        return {int(r["pid"]): str(r["service"]) for r in self.records("worker.started")}

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def records(self, event: str | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The engine log's JSON records from byte ``offset`` on (optionally only those named ``event``)."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        return [r for r in json_records(text) if event is None or r.get("event") == event]

    def gateway_settings(self) -> dict[str, Any]:
        for svc in self.cfg.services.values():
            if svc.routes.get(ORDER_PLACED) == CHAOS_CHARGE:
                return dict(svc.settings.get("gateway", {}))
        raise JetpoolError(f"{self.config_path}: no service charges orders through {CHAOS_CHARGE}")

    def audit_path(self) -> Path:
        svc = next(s for s in self.cfg.services.values() if AUDIT in s.routes.values())
        return Path(str(svc.settings["db_path"]))


# ---- the producer ------------------------------------------------------------------------------------


class _Message:
    """One publish and its re-sends; the Publisher's waiter."""

    __slots__ = ("body", "key", "msg_id", "producer", "subject")

    def __init__(self, producer: Producer, subject: str, body: bytes, msg_id: str, key: str) -> None:
        self.producer, self.subject, self.body, self.msg_id, self.key = producer, subject, body, msg_id, key

    async def on_puback(self, error: Exception | None) -> None:
        self.producer.settle(self, error)


class Producer:
    """Publishes like a storefront that must not lose an order: each message is re-sent under the same
    ``Nats-Msg-Id`` until the stream acknowledges it (the stream drops copies it already stored).

    Args:
        publisher: a started Publisher.
        window: publishes awaiting their PubAck at most.
        retry_s: pause before a re-send.
        give_up_s: stop re-sending a message this long after its first send.
    """

    def __init__(self, publisher: Publisher, window: int = 2000, retry_s: float = 0.5, give_up_s: float = 300) -> None:
        self.publisher = publisher
        self.sent_at: dict[str, float] = {}  # key -> wall time of the first send
        self.stored: set[str] = set()
        self.given_up: set[str] = set()
        self.resends = 0
        self.errors: Counter[str] = Counter()
        self._window, self._retry_s, self._give_up_s = window, retry_s, give_up_s
        self._outstanding = 0
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    async def send(self, subject: str, body: bytes, msg_id: str, key: str | None = None) -> None:
        """Publish (waiting for room in the window); ``key`` (default: the Msg-Id) names it in the books."""
        while self._outstanding >= self._window:
            self._room.clear()
            await self._room.wait()
        key = key or msg_id
        self.sent_at.setdefault(key, time.time())
        self._outstanding += 1
        self._idle.clear()
        await self._publish(_Message(self, subject, body, msg_id, key))

    async def place(self, items: Sequence[tuple[str, bytes, str]], rate: float) -> None:
        """Send ``(subject, body, msg_id)`` items at ``rate`` per second (0: as fast as the window allows)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, (subject, body, msg_id) in enumerate(items):
            ahead_s = start + i / rate - loop.time() if rate > 0 else 0.0
            if ahead_s > 0.002:
                await asyncio.sleep(ahead_s)
            await self.send(subject, body, msg_id)

    async def flush(self, timeout_s: float = 300.0) -> None:
        """Wait until every message is stored or given up on."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _publish(self, message: _Message) -> None:
        try:
            await self.publisher.send(message.subject, message.body, {MSG_ID_HEADER: message.msg_id}, message)
        except PublishError as exc:
            self.settle(message, exc)

    def settle(self, message: _Message, error: Exception | None) -> None:
        if error is None:
            self.stored.add(message.key)
        elif time.time() - self.sent_at[message.key] > self._give_up_s:
            self.given_up.add(message.key)
        else:
            self.errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
            self.resends += 1
            task = asyncio.get_running_loop().create_task(self._resend(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._outstanding -= 1
        if self._outstanding < self._window:
            self._room.set()
        if self._outstanding == 0:
            self._idle.set()

    async def _resend(self, message: _Message) -> None:
        await asyncio.sleep(self._retry_s)
        await self._publish(message)


def order_items(cfg: Config, events: Iterable[Event]) -> list[tuple[str, bytes, str]]:
    """``(subject, body, msg_id)`` of events as a producer publishes them."""
    return [(cfg.subject_for(e.type), e.encode(), e.id) for e in events]


# ---- reading back what happened ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One stored event, as the analysis needs it."""

    seq: int
    at: float  # stream time (wall clock, seconds)
    type: str
    order_id: str
    event_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry; ``original`` is the stream sequence of the message it holds."""

    service: str
    error_type: str
    attempts: int
    order_id: str
    original: int


async def scan(js: Any, stream: str, after_seq: int) -> AsyncIterator[Any]:
    """Every message of ``stream`` after ``after_seq`` up to its current last one (an unacked, ephemeral pull)."""
    last = int((await js.stream_info(stream)).state.last_seq)
    if last <= after_seq:
        return
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=after_seq + 1, inactive_threshold=60.0, max_ack_pending=-1)
    sub = await js.pull_subscribe("", stream=stream, config=config)
    seq, timeouts = after_seq, 0
    try:
        while seq < last and timeouts < _SCAN_TIMEOUTS:
            try:
                msgs = await sub.fetch(_SCAN_BATCH, timeout=5)
            except nats.errors.TimeoutError:
                timeouts += 1  # a slow fetch of large messages, or the rest was deleted meanwhile
                continue
            timeouts = 0
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                yield msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if seq < last:
        raise JetpoolError(f"could not read stream {stream} past sequence {seq} (last {last})")


_SCAN_BATCH = 256
_SCAN_TIMEOUTS = 5


def seen(msg: Any) -> Seen | None:
    """The event in a stream message, or None for a body that is not one (or too big to bother with)."""
    if len(msg.data) > MAX_EVENT_BYTES:
        return None
    try:
        body = orjson.loads(msg.data)
        data = body["data"]
        return Seen(msg.metadata.sequence.stream, msg.metadata.timestamp.timestamp(), str(body["type"]),
                    str(body.get("aggregate_id", "")), str(body["id"]), str(data.get("reason", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


def dead_letter(msg: Any) -> DeadLetter:
    headers = msg.headers or {}
    order_id = ""
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        body = orjson.loads(msg.data) if len(msg.data) <= MAX_EVENT_BYTES else {}
        order_id = str(body.get("aggregate_id", ""))
    return DeadLetter(headers.get("Jetpool-Dlq-Service", ""), headers.get("Jetpool-Dlq-Error-Type", ""),
                      int(headers.get("Jetpool-Dlq-Attempts", "0") or 0), order_id,
                      int(headers.get("Jetpool-Dlq-Stream-Seq", "0") or 0))


@dataclass
class Facts:
    """What the stream and the dead-letter stream hold since the session began."""

    events: list[Seen]
    dead: list[DeadLetter]

    def ended(self) -> dict[str, list[Seen]]:
        """Order id -> its distinct terminal events (more than one is a bug)."""
        out: dict[str, dict[str, Seen]] = {}
        for e in self.events:
            if e.type in TERMINAL:
                out.setdefault(e.order_id, {})[e.event_id] = e
        return {oid: sorted(ends.values(), key=lambda e: e.seq) for oid, ends in out.items()}

    def placed(self) -> dict[str, float]:
        """Order id -> stream time of its first stored OrderPlaced."""
        out: dict[str, float] = {}
        for e in self.events:
            if e.type == ORDER_PLACED and e.order_id not in out:
                out[e.order_id] = e.at
        return out

    def latencies_ms(self, order_ids: Iterable[str]) -> list[float]:
        """Placed → ended of these orders (stream times), sorted."""
        placed, ended = self.placed(), self.ended()
        return sorted((ended[o][0].at - placed[o]) * 1000 for o in order_ids if o in ended and o in placed)

    def dead_events(self) -> int:
        """Distinct messages dead-lettered (one service or several may have written an entry for each)."""
        return len({d.original for d in self.dead})

    def count(self, event_type: str, order_ids: set[str] | None = None) -> int:
        return sum(1 for e in self.events if e.type == event_type and (order_ids is None or e.order_id in order_ids))


def kind_of(end: Seen) -> str:
    if end.type == ORDER_CONFIRMED:
        return "confirmed"
    return "declined" if end.reason.startswith("payment declined") else "out_of_stock"


# ---- one scenario's session --------------------------------------------------------------------------


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
        events = [s async for s in _seen(scan(self.js, self.stream, self._start_seq))]
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
        kinds = {oid: kind_of(ends[0]) for oid, ends in ended.items()}
        dead = {d.order_id for d in facts.dead}
        problems: list[str] = []
        lost = sorted(oid for oid in mine if oid not in ended and oid not in dead)
        _check(problems, not lost, f"{len(lost)} orders lost (e.g. {lost[:3]})")
        unsent = [e.id for e in orders.events if e.id not in self.producer.stored]
        _check(problems, not unsent, f"{len(unsent)} orders never acknowledged by the stream")
        twice = sorted(oid for oid, ends in ended.items() if len(ends) > 1)
        _check(problems, not twice, f"{len(twice)} orders ended more than once (e.g. {twice[:3]})")
        doubles = self._check_money(problems, orders, kinds)
        oversold = await self._check_stock(problems, orders, kinds)
        published = len({e.event_id for e in facts.events if e.order_id in mine and e.type in PRODUCERS})
        audit_rows = await self._audit_rows(orders.run_id)
        _check(problems, audit_rows == published, f"audit holds {audit_rows} events, the stream {published}")
        _check(problems, facts.dead_events() == dlq_expected,
               f"{facts.dead_events()} events dead-lettered, expected {dlq_expected}")
        latencies = facts.latencies_ms(mine)
        counts = Counter(kinds.values())
        base_notes = {"ended": len(ended), **{k: counts[k] for k in ("confirmed", "declined", "out_of_stock")},
                      "p50_ms": round(percentile(latencies, 50)), "p99_ms": round(percentile(latencies, 99)),
                      "producer_resends": self.producer.resends,
                      "dlq_entries_by_service": dict(Counter(d.service for d in facts.dead))}
        return Row(scenario, len(mine), len(lost), doubles, oversold, facts.dead_events(), audit_rows, published,
                   None if recover_s is None else round(recover_s, 2), {**base_notes, **(notes or {})}, problems)

    def _check_money(self, problems: list[str], orders: Orders, kinds: dict[str, str]) -> int:
        """Orders charged twice; also checks every order's money matches how it ended."""
        ledger = SqliteLedger(self.shop.gateway_settings()["ledger"])
        try:
            moves = {oid: [kind for kind, _ in ledger.movements(oid)] for oid in orders.by_id}
        finally:
            ledger.close()
        doubles = sorted(oid for oid, m in moves.items() if m.count("charge") > 1)
        _check(problems, not doubles, f"{len(doubles)} orders charged more than once (e.g. {doubles[:3]})")
        wrong = sorted(oid for oid, m in moves.items() if m != MONEY[kinds.get(oid, "open")] and oid not in doubles)
        _check(problems, not wrong, f"{len(wrong)} orders' money does not match how they ended (e.g. "
                                    f"{[(o, moves[o], kinds.get(o)) for o in wrong[:3]]})")
        return len(doubles)

    async def _check_stock(self, problems: list[str], orders: Orders, kinds: dict[str, str]) -> int:
        """Units reserved beyond the seeded stock; also checks stock adds up and nothing is half-reserved."""
        store = KVState(await self.js.key_value("stock"))
        sold = Counter[str]()
        for oid, kind in kinds.items():
            if kind == "confirmed":
                sold[orders.line(oid)["sku"]] += orders.line(oid)["qty"]
        oversold, wrong = 0, []
        for sku, seeded in orders.stock.items():
            level = (await store.get(inventory.sku_key(sku)))[0] or {"available": 0, "reserved": 0, "pending": {}}
            oversold += max(0, level["reserved"] - seeded, sold[sku] - seeded)
            if level["available"] + level["reserved"] != seeded or level["reserved"] != sold[sku] or level["pending"]:
                wrong.append(f"{sku}: seeded {seeded}, sold {sold[sku]}, now {level}")
        _check(problems, not oversold, f"{oversold} units oversold")
        _check(problems, not wrong, f"stock inconsistent on {len(wrong)} skus (e.g. {wrong[:1]})")
        return oversold

    async def _audit_rows(self, run_id: str) -> int:
        store = SqliteAuditStore(self.shop.audit_path())
        try:
            return await store.count(order_prefix=run_id + "-")
        finally:
            store.close()


async def _seen(messages: AsyncIterator[Any]) -> AsyncIterator[Seen]:
    async for msg in messages:
        event = seen(msg)
        if event is not None:
            yield event


def _check(problems: list[str], ok: bool, text: str) -> None:
    if not ok:
        problems.append(text)


def mark(orders: Orders, positions: Iterable[float], marker: str) -> list[Event]:
    """Mark the orders at these fractions of the run (0.5: the middle one) with a chaos marker."""
    events = [orders.events[min(len(orders.events) - 1, int(p * len(orders.events)))] for p in positions]
    for event in events:
        event.data[MARKER] = marker
    return events


# ---- the scenarios -----------------------------------------------------------------------------------


async def worker_kill(shop: Shop, orders: int = 10_000, rate: float = RATE, every_s: float = 2.0,
                      seed: int | None = None) -> Row:
    """A random worker (any service) is ``kill -9``ed every ``every_s`` while the orders are placed."""
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        kills = await _kill_while(shop, placing, every_s, s.rng)
        await placing
        settled = await s.settle(orders)
        facts = await s.facts()
        fault_end = kills[-1][0] if kills else s.started
        exits = s.records("worker.exited")
        row = await s.row("worker-kill", batch, facts, recover_s=s.recovery_s(facts, batch, fault_end), notes={
            "kills": len(kills), "killed": dict(Counter(service for _, service in kills)),
            "worker_exits": len(exits), "settled": settled})
        _check(row.problems, len(exits) == len(kills), f"{len(exits)} worker exits logged for {len(kills)} kills")
        return row


async def _kill_while(shop: Shop, running: asyncio.Task[None], every_s: float,
                      rng: random.Random) -> list[tuple[float, str]]:
    """Every ``every_s`` until ``running`` is done, SIGKILL one worker: the services in a random order,
    each once per round, so that every service is hit."""
    kills: list[tuple[float, str]] = []
    turns: list[str] = []
    while True:
        await asyncio.wait({running}, timeout=every_s)
        if running.done():
            return kills
        live = {shop.services_by_pid().get(p.pid): p for p in shop.workers()}
        for _ in range(len(shop.cfg.services)):
            turns = turns or rng.sample(sorted(shop.cfg.services), len(shop.cfg.services))
            service = turns.pop(0)
            victim = live.get(service)
            if victim is not None:  # else its worker is still being restarted: the next service's turn
                with contextlib.suppress(psutil.Error):
                    victim.kill()
                    kills.append((time.time(), service))
                    log.info("chaos.killed", service=service, pid=victim.pid)
                break


async def broker_restart(shop: Shop, orders: int = 10_000, rate: float = RATE, at: float = 0.4,
                         down_s: float = 2.0, seed: int | None = None) -> Row:
    """nats-server is SIGKILLed once mid-run and restarted ``down_s`` later with the same store and port."""
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        killed_at = await s.until_sent(int(at * orders))
        await asyncio.to_thread(shop.server.kill)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(shop.server.start, 60.0)
        back_at = time.time()
        log.info("chaos.broker_restarted", down_s=round(back_at - killed_at, 2))
        await placing
        settled = await s.settle(orders)
        facts = await s.facts()
        row = await s.row("broker-restart", batch, facts, recover_s=s.recovery_s(facts, batch, back_at), notes={
            "broker_down_s": round(back_at - killed_at, 2), "worker_reconnects": len(s.records("nats.reconnected")),
            "worker_exits": len(s.records("worker.exited")), "producer_errors": dict(s.producer.errors),
            "settled": settled})
        _check(row.problems, not s.records("supervisor.crash_loop"), "the supervisor saw a crash loop")
        return row


async def gateway_outage(shop: Shop, orders: int = 10_000, rate: float = RATE, at: float = 0.3,
                         outage_s: float = 20.0, seed: int | None = None) -> Row:
    """The payment gateway is down for ``outage_s`` mid-run (its outage switch): nothing may be dead-lettered."""
    control = ControlFile(shop.gateway_settings()["control_file"])
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        down_at = await s.until_sent(int(at * orders))
        control.write(outage=True)
        await asyncio.sleep(outage_s)
        control.write()
        up_at = time.time()
        await placing
        settled = await s.settle(orders)
        facts = await s.facts()
        # Orders sent in the first second may have reached the gateway before it saw the switch.
        during = [e.aggregate_id for e in batch.events if down_at + 1.0 <= s.producer.sent_at[e.id] < up_at]
        ended = facts.ended()
        early = [oid for oid in during if oid in ended and ended[oid][0].at < up_at]
        row = await s.row("gateway-outage", batch, facts, recover_s=s.recovery_s(facts, batch, up_at), notes={
            "outage_s": outage_s, "placed_during_outage": len(during), "breaker_opened": len(s.records("breaker.open")),
            "settled": settled})
        _check(row.problems, bool(during), "no order was placed during the outage")
        _check(row.problems, not early, f"{len(early)} orders placed during the outage ended before it was over")
        return row


async def sigterm_restart(shop: Shop, orders: int = 10_000, rate: float = RATE, at: float = 0.4,
                          down_s: float = 2.0, seed: int | None = None) -> Row:
    """SIGTERM to the supervisor mid-run (it drains and exits), orders keep coming, then a new engine starts."""
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        stopped_at = await s.until_sent(int(at * orders))
        stop = await _sigterm(shop)
        await asyncio.sleep(down_s)
        await shop.start_engine()
        back_at = time.time()
        stop["engine_down_s"] = round(back_at - stopped_at, 2)
        await placing
        settled = await s.settle(orders)
        facts = await s.facts()
        row = await s.row("sigterm-restart", batch, facts, recover_s=s.recovery_s(facts, batch, back_at),
                          notes={**stop, "settled": settled})
        _check(row.problems, stop["exit_code"] == 0, f"the supervisor exited with {stop['exit_code']}, not 0")
        _check(row.problems, stop["drain_s"] < stop["deadline_s"], "the supervisor did not exit before the deadline")
        _check(row.problems, not stop["left_running"], f"processes left running: {stop['left_running']}")
        return row


async def _sigterm(shop: Shop) -> dict[str, Any]:
    """SIGTERM the supervisor and wait for it: exit code, drain time, the deadline, and what outlived it."""
    engine = shop.engine
    assert engine is not None and engine.proc is not None
    workers = shop.workers()
    deadline_s = max(svc.drain_timeout_s for svc in shop.cfg.services.values()) + DRAIN_MARGIN_S
    started = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(engine.proc.wait, deadline_s + 60)
    drain_s = time.monotonic() - started
    code = engine.proc.poll()
    await asyncio.to_thread(psutil.wait_procs, workers, 10)
    left = [p.pid for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    engine.kill()
    log.info("chaos.engine_stopped", exit_code=code, drain_s=round(drain_s, 2))
    return {"exit_code": code, "drain_s": round(drain_s, 2), "deadline_s": deadline_s, "left_running": left}


async def poison(shop: Shop, orders: int = 2000, rate: float = RATE, seed: int | None = None) -> Row:
    """One order whose payment handler always raises: max_deliver attempts, one DLQ entry, the rest unaffected."""
    max_deliver = next(svc.max_deliver for svc in shop.cfg.services.values()
                       if svc.routes.get(ORDER_PLACED) == CHAOS_CHARGE)
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        [bad] = mark(batch, [0.5], "poison")
        await s.place(batch, rate)
        settled = await s.settle(orders - 1)
        facts = await s.facts()
        failures = [r for r in s.records("event.failed") if r.get("event_id") == bad.id]
        outcomes = Counter(str(r["outcome"]) for r in failures)
        attempts = [d.attempts for d in facts.dead if d.order_id == bad.aggregate_id]
        row = await s.row("poison", batch, facts, dlq_expected=1, notes={
            "max_deliver": max_deliver, "attempts": len(failures), "outcomes": dict(outcomes),
            "dlq_attempts": attempts, "settled": settled})
        _check(row.problems, len(failures) == max_deliver and outcomes["dead_letter"] == 1,
               f"the poison order was tried {len(failures)} times ({dict(outcomes)}), expected {max_deliver}")
        _check(row.problems, attempts == [max_deliver], f"its dead-letter entries say {attempts} attempts")
        _check(row.problems, row.notes["ended"] == orders - 1, "not every other order ended")
        return row


async def malformed(shop: Shop, orders: int = 10_000, rate: float = RATE / 2, bad: int = 1000, blocks: int = 5,
                    seed: int | None = None) -> Row:
    """``orders`` valid orders with ``bad`` malformed events spread among them: each malformed event is
    dead-lettered on its first delivery and no worker crashes. At half the other scenarios' rate: at 150
    orders/s the shop keeps about 1.7 of a 2-core machine's cores busy, and a p99 then measures a backlog
    rather than what bad input costs. What bad input costs the valid orders is
    measured against clean traffic in alternating blocks: ``blocks`` mixed blocks (the orders and the malformed
    events split evenly over them) between ``blocks + 1`` clean blocks of the same size, clean first and last.

    Valid orders' p99 is taken over all the mixed blocks' orders and over all the clean blocks' orders; the
    per-block p99s and their medians are reported too. Interleaving gives both kinds of block the same share
    of whatever else the machine runs meanwhile, and the same mean position in a shop whose state grows run
    after run. CPU (workers and broker) per block tells the cost of bad input better than latency does on a
    busy machine; ``other_cores_busy`` is what the rest of the machine (neither the shop nor the producer) kept
    busy, in cores, during each kind of block."""
    async with Session(shop, seed) as s:
        pids = {p.pid for p in shop.workers()}
        size = max(1, orders // max(1, blocks))
        mixed_batch = await s.new_orders(orders)
        clean_batch = await s.new_orders(size * (blocks + 1))
        plan: list[tuple[str, list[Event], int]] = []
        for k in range(blocks):
            plan.append(("clean", clean_batch.events[k * size:(k + 1) * size], 0))
            plan.append(("mixed", mixed_batch.events[k * orders // blocks:(k + 1) * orders // blocks],
                         (k + 1) * bad // blocks - k * bad // blocks))
        plan.append(("clean", clean_batch.events[blocks * size:], 0))
        phases, ended = [], 0
        for kind, events, n_bad in plan:
            ended += len(events)
            phases.append((kind, events, *await _phase(s, events, ended, rate, n_bad)))
        settled = await s.settle(ended)
        facts = await s.facts()

        def of(kind: str) -> list[tuple[str, list[Event], float, float, float]]:
            return [p for p in phases if p[0] == kind]

        def p99(events: Iterable[Event]) -> float:
            return percentile(facts.latencies_ms(e.aggregate_id for e in events), 99)

        p99_clean, p99_mixed = p99(clean_batch.events), p99(mixed_batch.events)
        block_p99 = {kind: [p99(p[1]) for p in of(kind)] for kind in ("clean", "mixed")}
        median_clean, median_mixed = statistics.median(block_p99["clean"]), statistics.median(block_p99["mixed"])
        cpu = {kind: [p[2] for p in of(kind)] for kind in ("clean", "mixed")}
        cpu_per_clean_order = sum(cpu["clean"]) / max(1, len(clean_batch.events))
        extra_cpu_s = sum(cpu["mixed"]) - cpu_per_clean_order * len(mixed_batch.events)
        other = {kind: sum(p[3] for p in of(kind)) / max(1e-9, sum(p[4] for p in of(kind)))
                 for kind in ("clean", "mixed")}
        first = len({d.original for d in facts.dead if d.attempts == 1 and d.error_type == "MalformedEvent"})
        retried = sum(1 for d in facts.dead if d.attempts != 1)
        exits = s.records("worker.exited")
        row = await s.row("malformed", mixed_batch, facts, dlq_expected=bad, notes={
            "malformed": bad, "dlq_on_first_delivery": first, "worker_crashes": len(exits),
            "blocks": {"clean": len(of("clean")), "mixed": len(of("mixed")), "orders_per_block": size},
            "p99_clean_ms": round(p99_clean), "p99_mixed_ms": round(p99_mixed),
            "p99_ratio": round(p99_mixed / p99_clean, 2) if p99_clean else None,
            "p99_blocks_clean_ms": [round(v) for v in block_p99["clean"]],
            "p99_blocks_mixed_ms": [round(v) for v in block_p99["mixed"]],
            "p99_median_ratio": round(median_mixed / median_clean, 2) if median_clean else None,
            "cpu_s_clean": [round(v, 1) for v in cpu["clean"]], "cpu_s_mixed": [round(v, 1) for v in cpu["mixed"]],
            "cpu_ms_per_malformed": round(extra_cpu_s * 1000 / max(1, bad), 2),
            "other_cores_busy": {k: round(v, 2) for k, v in other.items()}, "settled": settled})
        _check(row.problems, first == bad and not retried,
               f"{first} of {bad} malformed events dead-lettered on first delivery, {retried} entries after more")
        _check(row.problems, not exits and {p.pid for p in shop.workers()} == pids, "a worker crashed")
        return row


async def _phase(s: Session, events: list[Event], ended: int, rate: float, bad: int) -> tuple[float, float, float]:
    """Place ``events`` (with ``bad`` malformed events spread among them) at ``rate`` valid orders/s and wait
    until ``ended`` orders ended in all; the CPU seconds the shop spent on them, the CPU seconds anything else
    but this process (the producer) spent meanwhile, and the phase's wall time."""
    cpu, others, began = s.shop.cpu_s(), _others_cpu_s(), time.monotonic()
    items = _interleave(order_items(s.cfg, events), _malformed(s.cfg, bad))
    await s.producer.place(items, rate * len(items) / max(1, len(events)))
    await s.producer.flush()
    await s.settle(ended)
    shop_s = s.shop.cpu_s() - cpu
    return shop_s, _others_cpu_s() - others - shop_s, time.monotonic() - began


def _others_cpu_s() -> float:
    """CPU seconds the machine has spent busy (all cores) outside this process: the shop and everything else."""
    machine, mine = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = machine.user + machine.nice + machine.system + getattr(machine, "irq", 0.0) + getattr(machine, "softirq", 0)
    return float(busy - mine.user - mine.system)


def _malformed(cfg: Config, count: int) -> list[tuple[str, bytes, str]]:
    """Bodies no consumer can read as an event, cycling through the ways a producer gets it wrong."""
    bodies = [b"\x00\x01 not json", b'["an", "array"]', b'{"id": "m", "type": "OrderPlaced"}',
              b'{"id": "m", "type": "OrderPlaced", "data": "not an object"}', b'{"id": 7, "type": "OrderPlaced"}']
    subject = cfg.subject_for(ORDER_PLACED)
    return [(subject, bodies[i % len(bodies)], f"malformed-{uuid.uuid4().hex}") for i in range(count)]


def _interleave(good: list[tuple[str, bytes, str]], bad: list[tuple[str, bytes, str]]) -> list[tuple[str, bytes, str]]:
    """``bad`` spread evenly through ``good``."""
    out, step = [], len(good) / max(1, len(bad))
    j = 0
    for i, item in enumerate(good):
        out.append(item)
        while j < len(bad) and j * step <= i:
            out.append(bad[j])
            j += 1
    return out + bad[j:]


async def hang(shop: Shop, orders: int = 2000, rate: float = RATE, hung: int = 3, seed: int | None = None) -> Row:
    """Payment handlers that hang (first attempt) are cancelled at handler_timeout_s; the worker keeps consuming."""
    timeout_s = next(svc.handler_timeout_s for svc in shop.cfg.services.values()
                     if svc.routes.get(ORDER_PLACED) == CHAOS_CHARGE)
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        stuck = mark(batch, [(i + 1) / (hung + 2) for i in range(hung)], "hang")
        pids = {p.pid for p in shop.workers()}
        await s.place(batch, rate)
        settled = await s.settle(orders)
        facts = await s.facts()
        windows = _hang_windows(s, {e.id for e in stuck})
        paid = [e.at for e in facts.events if e.type in PAYMENT_OUTPUTS]
        meanwhile = [sum(1 for at in paid if start < at < end) for start, end in windows.values()]
        cancelled = [round(end - start, 2) for start, end in windows.values()]
        row = await s.row("hang", batch, facts, recover_s=max(cancelled, default=None), notes={
            "hung": hung, "handler_timeout_s": timeout_s, "cancelled_after_s": cancelled,
            "payments_while_hung": meanwhile, "settled": settled})
        _check(row.problems, len(windows) == hung, f"{len(windows)} of {hung} hung handlers were cancelled")
        _check(row.problems, all(c >= timeout_s for c in cancelled), "a handler was cancelled before its timeout")
        _check(row.problems, all(meanwhile), "the payments worker stopped consuming while a handler hung")
        _check(row.problems, {p.pid for p in shop.workers()} == pids, "a worker was restarted")
        return row



def _hang_windows(s: Session, event_ids: set[str]) -> dict[str, tuple[float, float]]:
    """Event id -> (when its handler began to hang, when the engine cancelled it), from the engine's log."""
    began = {str(r["event_id"]): _when(r) for r in s.records("chaos.hang") if r.get("event_id") in event_ids}
    out: dict[str, tuple[float, float]] = {}
    for r in s.records("event.failed"):
        event_id = str(r.get("event_id"))
        if event_id in began and str(r.get("reason", "")).startswith("HandlerTimeout") and event_id not in out:
            out[event_id] = (began[event_id], _when(r))
    return out


def _when(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


async def slow_handler(shop: Shop, orders: int = 2000, rate: float = RATE, at: float = 0.3, slow_for_s: float = 5.0,
                       seed: int | None = None) -> Row:
    """The gateway answers in ack_wait + 2 s for a while: in-progress acks keep the server from redelivering."""
    control = ControlFile(shop.gateway_settings()["control_file"])
    latency_s = ACK_WAIT_S + 2
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        await s.until_sent(int(at * orders))
        control.write(latency_ms=latency_s * 1000)
        await asyncio.sleep(slow_for_s)
        control.write()
        await placing
        settled = await s.settle(orders)
        facts = await s.facts()
        service = next(n for n, svc in shop.cfg.services.items() if svc.routes.get(ORDER_PLACED) == CHAOS_CHARGE)
        inputs = sum(facts.count(t) for t in shop.cfg.services[service].routes)
        redelivered = await s.deliveries(service) - inputs
        slow = _slow_payments(facts, ACK_WAIT_S)
        row = await s.row("slow-handler", batch, facts, notes={
            "ack_wait_s": ACK_WAIT_S, "gateway_latency_s": latency_s, "payments_slower_than_ack_wait": slow,
            "redeliveries": redelivered, "settled": settled})
        _check(row.problems, slow > 0, "no payment took longer than ack_wait: the slowdown did not bite")
        _check(row.problems, redelivered == 0, f"{redelivered} payment inputs were delivered again")
        return row


def _slow_payments(facts: Facts, than_s: float) -> int:
    placed = facts.placed()
    return sum(1 for e in facts.events if e.type in PAYMENT_OUTPUTS and e.at - placed.get(e.order_id, e.at) > than_s)


async def duplicates(shop: Shop, orders: int = 2000, rate: float = RATE, share: float = 0.1,
                     seed: int | None = None) -> Row:
    """Orders sent again: the same Msg-Id (stored once), a new Msg-Id (stored twice, charged once), a new event
    for the same order (charged once); some at once, racing the original, some after the order ended."""
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        picks = s.rng.sample(batch.events, min(orders, int(3 * share * orders)))
        n = len(picks) // 3
        same, new_id, new_event = picks[:n], picks[n:2 * n], picks[2 * n:]
        await s.producer.place(_with_duplicates(s.cfg, batch.events, same, new_id, new_event), rate)
        await s.producer.flush()
        settled = await s.settle(orders)
        late = [(s.cfg.subject_for(e.type), e.encode(), f"late-{uuid.uuid4().hex}") for e in same]
        await s.producer.place(late, rate)
        await s.producer.flush()
        settled = await s.settle(orders) and settled
        facts = await s.facts()
        stored = facts.count(ORDER_PLACED, set(batch.by_id))
        expected = orders + len(new_id) + len(new_event) + len(late)
        row = await s.row("duplicates", batch, facts, notes={
            "same_msg_id": len(same), "new_msg_id": len(new_id) + len(late), "new_event_id": len(new_event),
            "order_placed_stored": stored, "order_placed_expected": expected, "settled": settled})
        _check(row.problems, stored == expected, f"{stored} OrderPlaced stored, expected {expected}")
        return row


def _with_duplicates(cfg: Config, events: list[Event], same: list[Event], new_id: list[Event],
                     new_event: list[Event]) -> list[tuple[str, bytes, str]]:
    subject = cfg.subject_for(ORDER_PLACED)
    again = {e.id: [(subject, e.encode(), e.id)] for e in same}
    for e in new_id:
        again[e.id] = [(subject, e.encode(), f"resend-{uuid.uuid4().hex}")]
    for e in new_event:
        copy = Event(type=e.type, data=dict(e.data), aggregate_id=e.aggregate_id)
        again[e.id] = [(subject, copy.encode(), copy.id)]
    out = []
    for item in order_items(cfg, events):
        out.append(item)
        out.extend(again.get(item[2], []))
    return out


async def oversized(shop: Shop, orders: int = 2000, rate: float = RATE, big: int = 100, waves: int = 4,
                    per_wave: int = 1500, seed: int | None = None) -> Row:
    """Events over the stream's max_msg_size are refused in the producer's PubAck; events over the services'
    max_event_bytes (but under the stream's limit) are dead-lettered unread, and each worker's memory stays
    within its in-flight window however many of them pass through."""
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        rss = RssSampler(shop)
        sampling = asyncio.create_task(rss.run())
        placing = asyncio.create_task(s.place(batch, rate))
        try:
            refused = await _refused(s, big)
            baseline = rss.take_peaks()
            peaks = []
            for wave in range(1, waves + 1):
                await s.producer.place(_large(s.cfg, per_wave), 0)
                await s.producer.flush()
                await s.until_dead_lettered(wave * per_wave)
                peaks.append(rss.take_peaks())
            await placing
            settled = await s.settle(orders)
        finally:
            sampling.cancel()
        facts = await s.facts()
        row = await s.row("oversized", batch, facts, dlq_expected=waves * per_wave, notes={
            **refused, "large_events": waves * per_wave, "large_event_bytes": LARGE_BYTES, "settled": settled,
            "received_per_worker_mib": round(waves * per_wave * LARGE_BYTES / 2**20),
            "rss_baseline_mib": _mib(baseline), "rss_peak_per_wave_mib": [_mib(p) for p in peaks]})
        _check(row.problems, refused["refused"] == big, f"{refused['refused']} of {big} oversized events refused")
        for service, bound in _rss_bounds(shop.cfg).items():
            grew = max(p.get(service, 0) for p in peaks) - baseline.get(service, 0)
            _check(row.problems, grew <= bound, f"{service}'s memory grew {grew / 2**20:.0f} MiB, more than its "
                                                f"in-flight window allows ({bound / 2**20:.0f} MiB)")
        return row


LARGE_BYTES = 96 * 1024  # above max_event_bytes, below the stream's max_msg_size
RSS_SLACK_MIB = 32


def _rss_bounds(cfg: Config) -> dict[str, int]:
    """Service -> what its worker may hold for large events: the in-flight window of them, twice (the received
    message and its copy on the way to the dead-letter stream), plus slack for the interpreter."""
    return {name: 2 * svc.max_in_flight * LARGE_BYTES + RSS_SLACK_MIB * 2**20
            for name, svc in cfg.services.items() if ORDER_PLACED in svc.routes}


def _mib(values: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 2**20, 1) for k, v in values.items()}


async def _refused(s: Session, count: int) -> dict[str, Any]:
    """Publish ``count`` events over the stream's max_msg_size, and one over the server's max_payload."""
    publisher = s.producer.publisher
    subject = s.cfg.subject_for(ORDER_PLACED)
    errors: Counter[str] = Counter()
    for _ in range(count):
        event = Event(type=ORDER_PLACED, aggregate_id="oversized", data={"pad": "x" * (STREAM_MAX_MSG_BYTES + 1024)})
        try:
            await publisher.publish(subject, event.encode(), event.headers())
        except PublishError as exc:
            errors[str(exc)] += 1
    huge = Event(type=ORDER_PLACED, aggregate_id="oversized", data={"pad": "x" * (2 * 1024 * 1024)})
    payload_error = "none"
    try:
        await publisher.publish(subject, huge.encode(), huge.headers())
    except PublishError as exc:
        payload_error = str(exc)
    return {"oversized_bytes": STREAM_MAX_MSG_BYTES + 1024, "refused": sum(errors.values()),
            "producer_errors": dict(errors), "over_max_payload_error": payload_error}


class RssSampler:
    """Samples the resident memory of every worker process; keeps each service's largest value."""

    def __init__(self, shop: Shop, every_s: float = 0.1) -> None:
        self.shop = shop
        self.every_s = every_s
        self._peaks: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.every_s)

    def take_peaks(self) -> dict[str, int]:
        """Service -> largest RSS since the last call (bytes)."""
        self._sample()
        peaks, self._peaks = self._peaks, {}
        return peaks

    def _sample(self) -> None:
        services = self.shop.services_by_pid()
        for proc in self.shop.workers():
            with contextlib.suppress(psutil.Error):
                service = services.get(proc.pid, str(proc.pid))
                self._peaks[service] = max(self._peaks.get(service, 0), int(proc.memory_info().rss))


def _large(cfg: Config, count: int) -> list[tuple[str, bytes, str]]:
    pad = "y" * LARGE_BYTES
    return order_items(cfg, [Event(type=ORDER_PLACED, aggregate_id="large", data={"pad": pad}) for _ in range(count)])


# ---- running them ------------------------------------------------------------------------------------


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

