"""CPU per order and the per-order budget of the shop (issue 16), measured on the running process tree.

    .venv/bin/python -m benchmarks.shop_cpu                 # warm-up, backlog drain, 300 orders/s
    SHOP_BENCH_CPU_RATE=500 SHOP_BENCH_CPU_S=15 .venv/bin/python -m benchmarks.shop_cpu --out /tmp/cpu

The shop of ``benchmarks/test_shop_e2e.py`` (nats-server with a monitoring port, PostgreSQL, the gateway,
the engine's supervisor and one worker process per service, the load generator in this process). Two
windows, each between two :class:`Mark` s:

- *steady*: orders offered at a fixed rate (``SHOP_BENCH_CPU_RATE``, default 300/s); after
  ``SHOP_BENCH_CPU_WARMUP_S`` (default 5) of it, ``SHOP_BENCH_CPU_S`` (default 20) seconds measured;
- *backlog*: all orders offered at once, from the load's start (it connects, seeds the stock of its
  skus: 20 KV writes) to the last order ended.

A mark reads, for every process of the tree, utime+stime and wake-ups from ``/proc``
(:mod:`benchmarks.proc_stats`, shared with ``benchmarks/paced.py``), grouped by role: ``nats_server``,
each service by name (its workers, told apart by the engine's ``worker.started`` log lines),
``supervisor``, ``engine_other`` (the multiprocessing resource tracker), ``gateway``, ``postgres``
(postmaster and backends) and ``load`` (this process: the load generator, and the probe itself). And
from the server's monitoring port: ``/varz`` (messages in and out), ``/jsz`` (each stream's last
sequence, each consumer's deliveries and pending acks, JetStream API requests) and ``/connz`` (messages
each client sent and received). Between two marks this gives CPU ms per order by role, cores busy and
the *budget*: per order ended, deliveries, settlements, events stored on SHOP, KV writes per bucket,
API requests, the server's messages in and out.

The server counts neither direct gets (``$JS.API.DIRECT.GET``) as API requests nor what a request was
for, so after the steady window a *sniff* window (``SHOP_BENCH_CPU_SNIFF_S``, default 5; 0: none)
subscribes to ``$JS.API.>``, ``$JS.ACK.>`` and ``$KV.>`` and counts what clients send there, by kind:
pull requests, KV reads (direct or through the API), acks/naks/in-progress, KV writes (compare-and-set
or not). Each copy costs the server a delivery, so these counts are kept out of the CPU window.

CPU-seconds are less disturbed than wall-clock figures by the other work of a shared machine, not
immune: a process waiting for a core still pays its wake-ups, and on a virtual machine whose host runs
other guests on the same cores, every process pays more per order (its caches are cold when its vCPU
comes back). So each window also records the machine's *steal*: the share of all vCPU time the
hypervisor gave to something else (``/proc/stat``); compare figures only between windows of similar
steal. Steal does not show everything the host's other guests take (caches, memory, a busy sibling
hyper-thread): the same code measured 3.2 and 5.2 ms per order an hour apart at under 6 % steal. So the
run also times a fixed piece of interpreter work before and after (``reference_speed``, µs per round),
and the load average is recorded too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import psutil
from nats.aio.msg import Msg

from benchmarks.proc_stats import (
    Counters,
    MachineTimes,
    load,
    monitor_json,
    read_counters,
    read_machine,
    reference_speed,
)
from engine.process import EngineProcess
from handlers.tools.load import ShopLoad, Summary

T = TypeVar("T")
POLL_S = 0.05
CPU_RATE = float(os.environ.get("SHOP_BENCH_CPU_RATE", "300"))
CPU_WARMUP_S = float(os.environ.get("SHOP_BENCH_CPU_WARMUP_S", "5"))
CPU_S = float(os.environ.get("SHOP_BENCH_CPU_S", "20"))
CPU_SNIFF_S = float(os.environ.get("SHOP_BENCH_CPU_SNIFF_S", "5"))
TAIL_S = 2.0  # orders go on being placed this long past the last window, so no window sees placing stop
SNIFFED = ("$JS.API.>", "$JS.ACK.>", "$KV.>")
FIXED_ROLES = ("nats_server", "supervisor", "engine_other", "gateway", "postgres", "load")


@dataclass(frozen=True)
class CpuSizes:
    """How long the steady point runs: ``rate`` orders/s, warm-up, measured window, sniff window (s)."""

    rate: float = CPU_RATE
    warmup_s: float = CPU_WARMUP_S
    window_s: float = CPU_S
    sniff_s: float = CPU_SNIFF_S

    @property
    def orders(self) -> int:
        return int(self.rate * (self.warmup_s + self.window_s + self.sniff_s + TAIL_S))


# ---- the process tree and the broker ---------------------------------------------------------------


@dataclass
class ShopTree:
    """The processes of a running shop and the broker's monitoring port; :meth:`mark` reads them all."""

    app: str
    server_pid: int
    monitor_port: int
    engine: EngineProcess
    gateway_pid: int | None = None
    database_pid: int | None = None

    def roles(self) -> dict[int, str]:
        """Every live process of the tree (this one included) -> its role, resolved now."""
        out = {self.server_pid: "nats_server", os.getpid(): "load", self.engine.pid: "supervisor"}
        services = {pid: service for (service, _), pid in self.engine.worker_pids().items()}
        for proc in self.engine.descendants():
            out[proc.pid] = services.get(proc.pid, "engine_other")
        for root, role in ((self.gateway_pid, "gateway"), (self.database_pid, "postgres")):
            if root is not None:
                out[root] = role
                with contextlib.suppress(psutil.Error):
                    out.update({child.pid: role for child in psutil.Process(root).children(recursive=True)})
        return out

    async def mark(self) -> Mark:
        at, machine = time.monotonic(), read_machine()
        procs = {pid: (role, read_counters(pid)) for pid, role in self.roles().items()}
        broker = await asyncio.to_thread(self.broker)
        return Mark(at, procs, broker, machine)

    def broker(self) -> Broker:
        varz = monitor_json(self.monitor_port, "/varz")
        jsz = monitor_json(self.monitor_port, "/jsz?streams=true&consumers=true")
        connz = monitor_json(self.monitor_port, "/connz?limit=4096")
        streams: dict[str, int] = {}
        consumers: dict[str, tuple[int, int]] = {}
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []):
                streams[stream["name"]] = int(stream["state"]["last_seq"])
                for c in stream.get("consumer_detail", []):
                    consumers[f"{stream['name']}/{c['name']}"] = (int(c["delivered"]["consumer_seq"]),
                                                                  int(c["num_ack_pending"]))
        clients: Counter[str] = Counter()
        for conn in connz.get("connections", []):
            side = self.client_role(conn.get("name", ""))
            clients[f"{side}.in"] += int(conn.get("in_msgs", 0))
            clients[f"{side}.out"] += int(conn.get("out_msgs", 0))
        api = jsz.get("api", {})
        totals = {k: int(varz.get(k, 0)) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}
        return Broker(totals, streams, consumers, int(api.get("total", 0)), int(api.get("errors", 0)), clients)

    def client_role(self, name: str) -> str:
        """``shop.orders.0`` -> ``orders``; ``shop.load`` -> ``load``; anything else as named."""
        prefix = f"{self.app}."
        return name[len(prefix):].split(".")[0] if name.startswith(prefix) else name or "unnamed"


@dataclass
class Broker:
    """What the server counted so far (cumulative): its messages, streams, consumers, API, clients."""

    totals: dict[str, int]
    streams: dict[str, int]  # stream -> last sequence
    consumers: dict[str, tuple[int, int]]  # "stream/consumer" -> (delivered, ack pending)
    api_total: int
    api_errors: int
    clients: Counter[str]  # "<role>.in" / "<role>.out" -> messages the server received from / sent to it


@dataclass
class Mark:
    at: float
    procs: dict[int, tuple[str, Counters]]
    broker: Broker
    machine: MachineTimes = field(default_factory=MachineTimes)


# ---- between two marks -----------------------------------------------------------------------------


def window(a: Mark, b: Mark, ended: int, placed: int) -> dict[str, Any]:
    """CPU by role and the budget per order ended between two marks."""
    seconds, per = b.at - a.at, max(ended, 1)
    roles: dict[str, Counters] = {}
    for pid, (role, after) in b.procs.items():
        before = a.procs.get(pid, (role, Counters()))[1]  # a process started in the window counts from 0
        roles[role] = roles.get(role, Counters()) + (after - before)
    gone = sorted(pid for pid in a.procs if pid not in b.procs)  # what they spent in the window is lost
    cpu = {role: c.cpu_s for role, c in sorted(roles.items(), key=lambda kv: _order(kv[0]))}
    total = sum(cpu.values())
    steal = b.machine.steal_share(a.machine)
    return {
        "seconds": round(seconds, 3), "orders_ended": ended, "orders_placed": placed,
        "ended_per_s": round(ended / seconds, 1), "placed_per_s": round(placed / seconds, 1),
        "cpu_ms_per_order": {**{r: round(s / per * 1e3, 3) for r, s in cpu.items()},
                             "total": round(total / per * 1e3, 3)},
        "cores": {**{r: round(s / seconds, 3) for r, s in cpu.items()}, "total": round(total / seconds, 3)},
        "wakeups_per_order": {r: round(c.wakeups / per, 2) for r, c in roles.items()},
        "budget": budget(a.broker, b.broker, per), "processes_gone": gone,
        "steal_share": None if steal is None else round(steal, 4),
    }


def budget(a: Broker, b: Broker, per: int) -> dict[str, Any]:
    """Per order: deliveries and settlements by consumer, events stored, KV writes, API requests, messages."""
    def d(after: int, before: int) -> float:
        return round((after - before) / per, 3)

    consumers = {name: (d(dv, a.consumers.get(name, (0, 0))[0]),
                        d(dv - pending, a.consumers.get(name, (0, 0))[0] - a.consumers.get(name, (0, 0))[1]))
                 for name, (dv, pending) in b.consumers.items()}
    appends = {s: d(seq, a.streams.get(s, 0)) for s, seq in b.streams.items()}
    kv = {s.removeprefix("KV_"): n for s, n in appends.items() if s.startswith("KV_")}
    shop = {name: got for name, got in consumers.items() if name.startswith("SHOP/")}
    return {
        "deliveries": round(sum(dv for dv, _ in shop.values()), 3),
        "settled": round(sum(settled for _, settled in shop.values()), 3),
        "deliveries_by_consumer": {name: dv for name, (dv, _) in consumers.items() if dv},
        "events_stored_on_shop": appends.get("SHOP", 0.0),
        "kv_writes": round(sum(kv.values()), 3),
        "kv_writes_by_bucket": kv,
        "other_stream_appends": {s: n for s, n in appends.items() if n and s != "SHOP" and not s.startswith("KV_")},
        "js_api_requests": d(b.api_total, a.api_total), "js_api_errors": d(b.api_errors, a.api_errors),
        "server": {k: d(v, a.totals.get(k, 0)) for k, v in b.totals.items()},
        "client_msgs": {k: d(v, a.clients.get(k, 0)) for k, v in sorted(b.clients.items()) if v - a.clients.get(k, 0)},
    }


def _order(role: str) -> tuple[int, str]:
    return (FIXED_ROLES.index(role), role) if role in FIXED_ROLES and role != "nats_server" else \
        (-1 if role == "nats_server" else 0, role)


# ---- the sniffer: what the clients send, by kind ---------------------------------------------------


@dataclass
class Sniffer:
    """Counts the requests, acks and KV writes clients send, by kind (a core subscription gets a copy)."""

    counts: Counter[str] = field(default_factory=Counter)

    async def on_msg(self, msg: Msg) -> None:
        self.counts[kind_of(msg.subject, msg.data, msg.headers)] += 1


def kind_of(subject: str, data: bytes, headers: dict[str, str] | None) -> str:
    """What one sniffed message is: ``pull``, ``kv_read_direct``, ``ack``, ``kv_cas.<bucket>``..."""
    if subject.startswith("$JS.ACK."):
        verb = data[:4]
        return {b"": "ack", b"+ACK": "ack", b"-NAK": "nak", b"+WPI": "in_progress", b"+TER": "term",
                b"+NXT": "ack_next"}.get(verb, "ack_other")
    if subject.startswith("$KV."):
        bucket = subject.split(".")[1]
        cas = headers is not None and "Nats-Expected-Last-Subject-Sequence" in headers
        return f"kv_{'cas' if cas else 'put'}.{bucket}"
    tokens = subject.split(".")  # $JS.API.<A>.<B>...
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return "pull"
    if subject.startswith("$JS.API.DIRECT.GET."):
        return f"kv_read_direct.{tokens[4].removeprefix('KV_')}" if len(tokens) > 4 else "kv_read_direct"
    if subject.startswith("$JS.API.STREAM.MSG.GET."):
        return f"kv_read_api.{tokens[5].removeprefix('KV_')}" if len(tokens) > 5 else "kv_read_api"
    return "api." + ".".join(tokens[2:4])


async def sniff(url: str, seconds: float, ended: Callable[[float, float], int]) -> dict[str, Any]:
    """Per order ended over ``seconds``: each kind of request, ack and KV write the clients sent."""
    nc = await nats.connect(url, name="shop-cpu-sniffer")
    sniffer = Sniffer()
    try:
        for subject in SNIFFED:
            await nc.subscribe(subject, cb=sniffer.on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()
        started = time.monotonic()
        await asyncio.sleep(seconds)
        stopped = time.monotonic()
        await nc.flush()
    finally:
        await nc.close()
    orders = ended(started, stopped)
    per = max(orders, 1)
    kinds = {k: round(n / per, 3) for k, n in sorted(sniffer.counts.items())}
    groups: dict[str, float] = {}
    for k, n in kinds.items():
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0.0) + n
    return {"seconds": round(stopped - started, 3), "orders_ended": orders, "per_order": kinds,
            "per_order_by_kind": {k: round(v, 3) for k, v in sorted(groups.items())}}


# ---- running a load with marks ---------------------------------------------------------------------


def ended_between(load: ShopLoad) -> Callable[[float, float], int]:
    def count(start: float, stop: float) -> int:
        return sum(1 for at, _, _ in list(load.tracker.ended.values()) if start <= at <= stop)
    return count


def placed_between(load: ShopLoad, start: float, stop: float) -> int:
    return sum(1 for at in list(load.tracker.placed_at.values()) if start <= at <= stop)


async def _placing(load: ShopLoad) -> None:
    while not load.tracker.placed_at:
        await asyncio.sleep(POLL_S / 5)


async def steady_windows(load: ShopLoad, tree: ShopTree, url: str, sizes: CpuSizes) -> dict[str, Any]:
    """The steady point's CPU window after its warm-up, then its sniff window."""
    await _placing(load)
    await asyncio.sleep(sizes.warmup_s)
    a = await tree.mark()
    await asyncio.sleep(sizes.window_s)
    b = await tree.mark()
    got = window(a, b, ended_between(load)(a.at, b.at), placed_between(load, a.at, b.at))
    if sizes.sniff_s > 0:
        got["sniff"] = await sniff(url, sizes.sniff_s, ended_between(load))
    return got


async def drain_window(load: ShopLoad, tree: ShopTree) -> dict[str, Any]:
    """From the load's start (its connection, the stock of its skus) to the last order ended.

    Not from the first order placed: placing without a rate hands the whole backlog to the publisher
    before this task runs again, and by then the first services have worked through much of it.
    """
    a = await tree.mark()
    total = len(load.orders.events)
    while len(load.tracker.ended) < total:
        await asyncio.sleep(POLL_S)
    b = await tree.mark()
    return window(a, b, ended_between(load)(a.at, b.at), placed_between(load, a.at - 1, b.at))


async def with_probe(load: ShopLoad, probe: Callable[[ShopLoad], Coroutine[Any, Any, T]]) -> tuple[int, T | None]:
    """Run the load with ``probe`` beside it; the load's exit code and what the probe found (None: it
    had not finished when the load did, e.g. orders stalled)."""
    task = asyncio.create_task(probe(load))
    try:
        code = await load.run()
    finally:
        if not task.done():
            task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
    got = results[0]
    if isinstance(got, BaseException) and not isinstance(got, asyncio.CancelledError):
        raise got
    return code, None if isinstance(got, BaseException) else got


# ---- the report ------------------------------------------------------------------------------------


def run_info(repo: Path) -> dict[str, Any]:
    """When, on which commit (and whether engine/ or handlers/ differed from it), on what machine."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "handlers"], cwd=repo,
                           capture_output=True, text=True, check=False).stdout.strip()
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": head + (" (engine/ or handlers/ modified)" if dirty else ""), "repo": str(repo),
            "cpus": len(os.sched_getaffinity(0)), "load_before": load(), "speed_before_us": reference_speed()}


def cpu_table(steady: dict[str, Any] | None, backlog: dict[str, Any] | None, rate: float) -> list[str]:
    """Markdown: CPU ms per order by role at the steady rate and in the backlog drain."""
    cols = _columns(steady, backlog, rate)
    roles = list(dict.fromkeys(r for _, got in cols for r in got["cpu_ms_per_order"]))
    lines = ["| CPU ms per order | " + " | ".join(name for name, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for role in roles:
        cells = [_ms(got, role) for _, got in cols]
        lines.append(f"| {'**total**' if role == 'total' else role} | " + " | ".join(cells) + " |")
    lines.append("| cores busy (total) | " + " | ".join(f"{got['cores']['total']:.2f}" for _, got in cols) + " |")
    lines.append("| orders ended/s in the window | " + " | ".join(f"{got['ended_per_s']:.0f}" for _, got in cols)
                 + " |")
    lines.append("| hypervisor steal, share of all vCPU time | "
                 + " | ".join(_share(got.get("steal_share")) for _, got in cols) + " |")
    lines.append("| window: s, orders ended | " + " | ".join(f"{got['seconds']:.1f}, {got['orders_ended']}"
                                                         for _, got in cols) + " |")
    return lines


def _speed(us: float | None) -> str:
    return "-" if us is None else f"{us:.2f} µs per round"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f} %"


def _columns(steady: dict[str, Any] | None, backlog: dict[str, Any] | None,
             rate: float) -> list[tuple[str, dict[str, Any]]]:
    cols = [(f"steady {rate:g}/s", steady), ("backlog drain", backlog)]
    return [(name, got) for name, got in cols if got is not None]


def _getter(part: str, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(budget: dict[str, Any]) -> float | None:
        value = budget[part].get(key)
        return None if value is None else float(value)
    return get


def _ms(got: dict[str, Any], role: str) -> str:
    value = got["cpu_ms_per_order"].get(role)
    if value is None:
        return "-"
    return f"**{value:.2f}**" if role == "total" else f"{value:.2f}"


def budget_table(steady: dict[str, Any] | None, backlog: dict[str, Any] | None, rate: float) -> list[str]:
    """Markdown: the per-order budget from the server's counters (and the sniffer's, steady only)."""
    cols = _columns(steady, backlog, rate)
    rows: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
        ("deliveries (SHOP consumers)", lambda b: b["deliveries"]),
        ("settled (delivered - ack pending)", lambda b: b["settled"]),
        ("events stored on SHOP", lambda b: b["events_stored_on_shop"]),
        ("KV writes stored (all buckets)", lambda b: b["kv_writes"]),
        ("JetStream API requests (server's count)", lambda b: b["js_api_requests"]),
        ("server messages in", lambda b: b["server"]["in_msgs"]),
        ("server messages out", lambda b: b["server"]["out_msgs"]),
        ("server bytes in", lambda b: b["server"]["in_bytes"]),
        ("server bytes out", lambda b: b["server"]["out_bytes"]),
    ]
    buckets = sorted({k for _, got in cols for k in got["budget"]["kv_writes_by_bucket"]})
    rows[4:4] = [(f"  KV writes, {k}", _getter("kv_writes_by_bucket", k)) for k in buckets]
    consumers = sorted({k for _, got in cols for k in got["budget"]["deliveries_by_consumer"]})
    rows[1:1] = [(f"  deliveries, {k}", _getter("deliveries_by_consumer", k)) for k in consumers]
    lines = ["| per order | " + " | ".join(name for name, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, get in rows:
        cells = [get(got["budget"]) for _, got in cols]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:,.2f}" for c in cells) + " |")
    return lines


def sniff_table(steady: dict[str, Any] | None) -> list[str]:
    """Markdown: what the clients sent per order, by kind (the sniff window of the steady point)."""
    got = (steady or {}).get("sniff")
    if not got:
        return []
    lines = [f"What the clients sent per order ended, by kind ({got['seconds']:.0f} s sniff window, "
             f"{got['orders_ended']} orders ended; a core subscription on {', '.join(SNIFFED)}):", "",
             "| kind | per order |", "|---|---:|"]
    lines += [f"| {kind} | {n:.2f} |" for kind, n in got["per_order"].items()]
    lines += [f"| **{kind} (all)** | **{n:.2f}** |" for kind, n in got["per_order_by_kind"].items()]
    return lines


def report(result: dict[str, Any]) -> str:
    """The run as markdown: its conditions, CPU per order, the budget, the sniffed kinds."""
    info, steady, backlog = result["run"], result.get("steady"), result.get("backlog")
    rate = result["sizes"]["rate"]
    summary = result.get("steady_summary") or {}
    lines = [f"Run {info['date']} on commit `{info['commit']}` ({info['repo']}), {info['cpus']} CPUs; load "
             f"average before {info['load_before']['loadavg']}, after {result['load_after']['loadavg']}; the "
             f"machine's speed (reference_speed) {_speed(info.get('speed_before_us'))} before, "
             f"{_speed(result['load_after'].get('speed_us'))} after.", ""]
    if info.get("floor"):
        lines += ["The floor: the shop's event topology with pass-through handlers (benchmarks/shop_floor.py); "
                  "no state, gateway or database work, no invariant checks.", ""]
    if summary:
        lines += [f"Steady point: offered {summary['offered_per_s']:g}/s, {summary['orders']} orders, "
                  f"ended {summary['steady_per_s']:.0f}/s while placing, placed → ended p50 "
                  f"{summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms.", ""]
    lines += [*cpu_table(steady, backlog, rate), "", *budget_table(steady, backlog, rate)]
    sniffed = sniff_table(steady)
    return "\n".join(lines + (["", *sniffed] if sniffed else []))


def summary_dict(summary: Summary | None) -> dict[str, Any] | None:
    return None if summary is None else dict(summary.__dict__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shop_cpu",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for shop_e2e_cpu.json and .md (default: print only)")
    parser.add_argument("--drain-orders", type=int, default=int(os.environ.get("SHOP_BENCH_CPU_DRAIN", "3000")),
                        help="orders of the backlog drain, 0: none (default 3000, or SHOP_BENCH_CPU_DRAIN)")
    parser.add_argument("--floor", action="store_true",
                        help="the shop's event topology with pass-through handlers (benchmarks/shop_floor.py): "
                             "no state, gateway or database work, and no invariant checks")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from rich.console import Console

    # Imported here: the e2e benchmark owns the shop's process tree and imports this module.
    from benchmarks.test_shop_e2e import run_cpu

    args = parse_args(argv)
    console = Console(width=140)
    result = run_cpu(console, CpuSizes(), drain_orders=args.drain_orders, floor=args.floor)
    text = report(result)
    if args.out is not None:
        import orjson

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "shop_e2e_cpu.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        (args.out / "shop_e2e_cpu.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
