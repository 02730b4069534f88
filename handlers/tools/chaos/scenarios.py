"""The chaos scenarios: each places orders on a fresh :class:`~handlers.tools.chaos.shop.Shop` while one fault
happens, waits for the shop to settle, and returns the scenario's :class:`~handlers.tools.chaos.session.Row`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psutil
import structlog

from engine import Event
from engine.config import Config
from engine.errors import PublishError
from handlers.saga import ORDER_PLACED, PAYMENT_AUTHORIZED, PAYMENT_DECLINED
from handlers.tools.chaos.facts import Facts
from handlers.tools.chaos.producer import order_items
from handlers.tools.chaos.session import Row, Session, check, mark
from handlers.tools.chaos.shop import ACK_WAIT_S, CHAOS_CHARGE, DRAIN_MARGIN_S, STREAM_MAX_MSG_BYTES, Shop
from handlers.tools.orders import percentile

log = structlog.get_logger("jetpool.chaos")

RATE = 150.0  # orders/s offered at full size: well inside what the shop sustains on a 2-core machine
PAYMENT_OUTPUTS = (PAYMENT_AUTHORIZED, PAYMENT_DECLINED)


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
        check(row.problems, len(exits) == len(kills), f"{len(exits)} worker exits logged for {len(kills)} kills")
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
        check(row.problems, not s.records("supervisor.crash_loop"), "the supervisor saw a crash loop")
        return row


async def gateway_outage(shop: Shop, orders: int = 10_000, rate: float = RATE, at: float = 0.3,
                         outage_s: float = 20.0, seed: int | None = None) -> Row:
    """The payment gateway is down for ``outage_s`` mid-run (its outage switch): nothing may be dead-lettered."""
    control = shop.gateway_admin()
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        down_at = await s.until_sent(int(at * orders))
        await control.set_faults(outage=True)
        await asyncio.sleep(outage_s)
        await control.reset_faults()
        await control.close()
        up_at = time.time()
        await placing
        settled = await s.settle(orders)
        facts = await s.facts()
        # Orders sent in the first second may have been on their way to the gateway before the switch.
        during = [e.aggregate_id for e in batch.events if down_at + 1.0 <= s.producer.sent_at[e.id] < up_at]
        ended = facts.ended()
        early = [oid for oid in during if oid in ended and ended[oid][0].at < up_at]
        row = await s.row("gateway-outage", batch, facts, recover_s=s.recovery_s(facts, batch, up_at), notes={
            "outage_s": outage_s, "placed_during_outage": len(during), "breaker_opened": len(s.records("breaker.open")),
            "settled": settled})
        check(row.problems, bool(during), "no order was placed during the outage")
        check(row.problems, not early, f"{len(early)} orders placed during the outage ended before it was over")
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
        check(row.problems, stop["exit_code"] == 0, f"the supervisor exited with {stop['exit_code']}, not 0")
        check(row.problems, stop["drain_s"] < stop["deadline_s"], "the supervisor did not exit before the deadline")
        check(row.problems, not stop["left_running"], f"processes left running: {stop['left_running']}")
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
    engine.kill_tree()
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
        check(row.problems, len(failures) == max_deliver and outcomes["dead_letter"] == 1,
               f"the poison order was tried {len(failures)} times ({dict(outcomes)}), expected {max_deliver}")
        check(row.problems, attempts == [max_deliver], f"its dead-letter entries say {attempts} attempts")
        check(row.problems, row.notes["ended"] == orders - 1, "not every other order ended")
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
        check(row.problems, first == bad and not retried,
               f"{first} of {bad} malformed events dead-lettered on first delivery, {retried} entries after more")
        check(row.problems, not exits and {p.pid for p in shop.workers()} == pids, "a worker crashed")
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
        check(row.problems, len(windows) == hung, f"{len(windows)} of {hung} hung handlers were cancelled")
        check(row.problems, all(c >= timeout_s for c in cancelled), "a handler was cancelled before its timeout")
        check(row.problems, all(meanwhile), "the payments worker stopped consuming while a handler hung")
        check(row.problems, {p.pid for p in shop.workers()} == pids, "a worker was restarted")
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
    control = shop.gateway_admin()
    latency_s = ACK_WAIT_S + 2
    async with Session(shop, seed) as s:
        batch = await s.new_orders(orders)
        placing = asyncio.create_task(s.place(batch, rate))
        await s.until_sent(int(at * orders))
        await control.set_faults(latency_ms=latency_s * 1000)
        await asyncio.sleep(slow_for_s)
        await control.reset_faults()
        await control.close()
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
        check(row.problems, slow > 0, "no payment took longer than ack_wait: the slowdown did not bite")
        check(row.problems, redelivered == 0, f"{redelivered} payment inputs were delivered again")
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
        check(row.problems, stored == expected, f"{stored} OrderPlaced stored, expected {expected}")
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
        check(row.problems, refused["refused"] == big, f"{refused['refused']} of {big} oversized events refused")
        for service, bound in _rss_bounds(shop.cfg).items():
            grew = max(p.get(service, 0) for p in peaks) - baseline.get(service, 0)
            check(row.problems, grew <= bound, f"{service}'s memory grew {grew / 2**20:.0f} MiB, more than its "
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
