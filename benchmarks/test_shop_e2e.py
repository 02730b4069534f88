"""End-to-end benchmark of the shop: orders/s through all five services, and latency against offered load.

Runs config/shop.yaml as shipped (only the broker URL and the probes port changed) on a fresh embedded
nats-server and a fresh embedded PostgreSQL (the audit store and the gateway's ledger), the payment gateway
as a process of its own, and the engine as ``python -m engine run --no-sidecars`` — the same process
tree as ``jetpool demo`` — and drives it with the demo's load generator, so every point also checks the
invariants (no order lost, no double charge, stock consistent, audit complete).

1. *Backlog drain*: all orders offered at once (``rate=0``); orders / time until the last one ended.
   An upper bound: the services work through the backlog in phases and the load generator is idle.
2. *Offered-load sweep* at fractions of that bound: p50/p99 placed → ended, and the rate at which
   orders end while they are being placed (``steady_per_s``: the offered rate while the system keeps
   up, its capacity once it does not). *Sustained throughput* is the fastest point that kept up
   (ended at >= 95 % of the offered rate).
3. *Half load*: one more point at half the sustained rate — the latency the issue asks about.

4. *CPU per order* (issue 16, :mod:`benchmarks.shop_cpu`): the backlog drain of 1. is measured from the
   first order placed to the last ended, and one more point offers a steady ``SHOP_BENCH_CPU_RATE``
   (default 300) orders/s: CPU ms per order of every process (nats-server, each service's workers, the
   supervisor, the gateway, PostgreSQL, the load generator) and the per-order budget (deliveries, events
   stored, KV writes, API requests, the server's messages; what the clients send by kind), from ``/proc``
   and the server's monitoring port. ``python -m benchmarks.shop_cpu`` runs only this (:func:`run_cpu`).

Writes ``benchmarks/results/shop_e2e.json`` and ``shop_e2e.png`` (throughput and p50/p99 latency
against offered load).

5. *Over HTTP* (:func:`run_http_e2e`, ``test_shop_end_to_end_over_http``): the same shop with its order API,
   driven by ``wrk`` (Debian's; ``make bench-tools`` installs it) POSTing orders, each with its own
   ``Idempotency-Key``, paced at the event path's half-load and sustained rates for ``SHOP_BENCH_HTTP_S``
   seconds (default 30); orders/s and p50/p99 placed → ended read from the audit store
   (:mod:`benchmarks.shop_http`). Writes ``shop_e2e_http.json``. Run it with ``make bench`` or
``.venv/bin/pytest benchmarks/test_shop_e2e.py --benchmark-only -s``. Sizes can be set with
``SHOP_BENCH_ORDERS`` (sustained run, default 6000) and ``SHOP_BENCH_POINT_S`` (seconds per load
point, default 8). :func:`run_e2e` is the whole run; ``tests/shop/integration/test_bench_smoke.py``
runs a tiny one of it into a temp dir so the sweep and the plot cannot rot unnoticed.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
import yaml
from rich.console import Console

from benchmarks.proc_stats import reference_speed
from benchmarks.shop_cpu import CpuSizes, ShopTree, drain_window, report, run_info, steady_windows, with_probe
from benchmarks.shop_floor import floor_config
from benchmarks.shop_http import (
    HttpRun,
    new_run,
    run_wrk,
    seed_stock,
    summarise,
    wait_ended,
    wrk_binary,
    wrk_version,
)
from engine.config import Config, load_config
from engine.embedded import EmbeddedServer
from engine.process import EngineProcess
from engine.runtime import provision_only
from handlers import SHOP_YAML
from handlers.database import DATABASE_URL_ENV, EmbeddedPostgres, provision
from handlers.gateway import GATEWAY_URL_ENV
from handlers.gateway.process import GatewayProcess
from handlers.tools.api_process import ApiProcess
from handlers.tools.load import ShopLoad, Summary
from handlers.tools.orders import Plan

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SUSTAINED_ORDERS = int(os.environ.get("SHOP_BENCH_ORDERS", "6000"))
POINT_S = float(os.environ.get("SHOP_BENCH_POINT_S", "8"))
FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
HTTP_RATES = (140.0, 280.0)  # the event path's half-load and sustained rates (shop_e2e.md, 2026-11-29)
HTTP_S = float(os.environ.get("SHOP_BENCH_HTTP_S", "30"))
HTTP_CONNECTIONS = 16
T = TypeVar("T")
Measured = tuple[Summary, dict[str, Any] | None]  # a run and what the CPU probe found


@dataclass(frozen=True)
class Sizes:
    """How big a run is; the defaults are the benchmark's.

    Attributes:
        orders: orders of the backlog drain.
        point_s: seconds of orders at each offered-load point.
        warmup: orders of the warm-up run.
        min_point_orders: orders of a point at least.
        cpu: the steady-rate CPU point (rate, warm-up, measured and sniff windows).
    """

    orders: int = SUSTAINED_ORDERS
    point_s: float = POINT_S
    warmup: int = 500
    min_point_orders: int = 200
    cpu: CpuSizes = field(default_factory=CpuSizes)


@dataclass(frozen=True)
class Sweep:
    """The runs of one benchmark: the backlog drain, the offered-load points, the best and half load, and
    the CPU per order (:func:`benchmarks.shop_cpu.report`'s input)."""

    drain: Summary
    points: list[Summary]
    sustained: Summary
    half: Summary
    cpu: dict[str, Any]


@dataclass(frozen=True)
class Shop:
    """A running shop: its config and its process tree (for :mod:`benchmarks.shop_cpu`)."""

    cfg: Config
    tree: ShopTree
    floor: bool = False  # pass-through handlers (benchmarks/shop_floor.py): the shop's checks do not apply


def shop_config(directory: Path, url: str, floor: bool = False) -> Path:
    """handlers/shop.yaml with this run's broker and a free probes port (its sidecars are started here);
    ``floor``: with the pass-through handlers of :mod:`benchmarks.shop_floor`."""
    raw: dict[str, Any] = yaml.safe_load(SHOP_YAML.read_text())
    if floor:
        raw = floor_config(raw)
    raw["nats"] = {**raw.get("nats", {}), "url": url}
    raw["http"] = {"host": "127.0.0.1", "port": 0}
    raw["log"] = {"level": "warning", "format": "json"}
    path = directory / "shop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextmanager
def exported(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment while the block runs (the load's checks read the DSN there)."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def shop(directory: Path) -> Iterator[Config]:
    """A broker, PostgreSQL, the gateway and the engine with all five services, stopped by PID afterwards.

    ``directory`` must be reachable by an unprivileged user (as root PostgreSQL runs as one) and short
    (the server's socket lives in it).
    """
    with running_shop(directory) as running:
        yield running.cfg


@contextmanager
def running_shop(directory: Path, floor: bool = False) -> Iterator[Shop]:
    """:func:`shop`, with its processes and the broker's monitoring port (``floor``: see :func:`shop_config`)."""
    server = EmbeddedServer(store_dir=directory / "nats", monitor_port=0).start()  # a free port, picked on start
    monitor_port = server.monitor_port or 0
    database = EmbeddedPostgres(directory / "postgres", die_with_parent=True)
    gateway: GatewayProcess | None = None
    engine: EngineProcess | None = None
    try:
        path = shop_config(directory, server.url, floor)
        cfg = load_config(path)
        database.start()
        uvloop.run(provision(database.dsn))
        gateway = GatewayProcess(database.dsn, path, directory / "gateway.log", tied=True).start()
        env = {DATABASE_URL_ENV: database.dsn, GATEWAY_URL_ENV: gateway.url}
        engine = EngineProcess(path, directory / "engine.log", env={**os.environ, **env}, nats_url=server.url,
                               args=["--no-provision", "--no-sidecars", "--log-level", "info"])
        uvloop.run(provision_only(cfg))
        engine.start()
        engine.wait_workers(sum(s.workers for s in cfg.services.values()))
        assert server.pid is not None and gateway.proc is not None
        tree = ShopTree(cfg.app, server.pid, monitor_port, engine, gateway.proc.pid, database.pid)
        with exported(env):
            yield Shop(cfg, tree, floor)
    finally:
        try:
            if engine is not None:
                engine.stop(timeout_s=30)
            if gateway is not None:
                gateway.stop()
            database.stop()
        finally:
            server.stop()


@contextmanager
def workdir() -> Iterator[Path]:
    """A temp dir an unprivileged PostgreSQL can reach (mode 0755, short path), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="shop-bench-") as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


def measure(cfg: Config, orders: int, rate: float, console: Console, checked: bool = True) -> Summary:
    load = ShopLoad(cfg, Plan(orders=orders, rate=rate, stall_s=30), console)
    code = uvloop.run(load.run())
    assert load.summary is not None
    assert code == 0 or not checked, "an invariant failed: see the output above"
    return load.summary


def measure_cpu(running: Shop, orders: int, rate: float, console: Console,
                probe: Callable[[ShopLoad, ShopTree], Coroutine[Any, Any, T]]) -> tuple[Summary, T | None]:
    """:func:`measure` with ``probe`` reading the process tree beside the load (None: it did not finish)."""
    load = ShopLoad(running.cfg, Plan(orders=orders, rate=rate, stall_s=30), console)
    code, got = uvloop.run(with_probe(load, lambda run: probe(run, running.tree)))
    assert load.summary is not None
    assert code == 0 or running.floor, "an invariant failed: see the output above"
    return load.summary, got


def steady_cpu(running: Shop, sizes: CpuSizes, console: Console) -> Measured:
    """The steady-rate CPU point: ``sizes.rate`` orders/s, CPU and budget windows after a warm-up."""
    url = str(running.cfg.nats.url)
    return measure_cpu(running, sizes.orders, sizes.rate, console,
                       lambda load, tree: steady_windows(load, tree, url, sizes))


def cpu_result(info: dict[str, Any], sizes: CpuSizes, steady: Measured, backlog: Measured | None) -> dict[str, Any]:
    """The CPU point and the drain's CPU as one record (what :func:`benchmarks.shop_cpu.report` reads)."""
    return {"run": info, "sizes": asdict(sizes), "steady": steady[1], "steady_summary": asdict(steady[0]),
            "backlog": backlog[1] if backlog else None, "backlog_summary": asdict(backlog[0]) if backlog else None,
            "load_after": {"loadavg": [round(x, 2) for x in os.getloadavg()], "speed_us": reference_speed()}}


def run_cpu(console: Console, sizes: CpuSizes | None = None, drain_orders: int = SUSTAINED_ORDERS,
            warmup: int = 500, floor: bool = False) -> dict[str, Any]:
    """A fresh shop: warm-up, the backlog drain of ``drain_orders`` (0: none) and the steady point, with
    CPU per order and the budget (``python -m benchmarks.shop_cpu``); ``floor``: its event topology
    with pass-through handlers (:mod:`benchmarks.shop_floor`)."""
    sizes = sizes or CpuSizes()
    info = {**run_info(REPO), "floor": floor}
    with workdir() as tmp, running_shop(tmp, floor) as running:
        measure(running.cfg, warmup, 0, console, checked=not floor)
        drained = measure_cpu(running, drain_orders, 0, console, drain_window) if drain_orders else None
        steady = steady_cpu(running, sizes, console)
    return cpu_result(info, sizes, steady, drained)


def plot(points: list[Summary], drain: Summary, sustained: Summary, half: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted([*points, half], key=lambda p: p.offered_per_s)
    offered = [p.offered_per_s for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    top.plot(offered, [p.steady_per_s for p in points], "o-", label="ended orders/s while placing")
    # Past saturation the bottleneck (orders) works through events of later orders before earlier ones
    # end, so ends lag behind; the whole-run rate (until the last order ended) shows the work done.
    top.plot(offered, [p.orders_per_s for p in points], "^--", color="tab:purple", label="ended orders/s, whole run")
    top.plot(offered, offered, ":", color="grey", label="ended = offered")
    top.axhline(sustained.steady_per_s, color="tab:green", ls="--",
                label=f"sustained {sustained.steady_per_s:.0f}/s")
    top.axhline(drain.orders_per_s, color="tab:red", ls="--", label=f"backlog drain {drain.orders_per_s:.0f}/s")
    top.set_ylabel("orders/s")
    top.legend(loc="upper left")
    top.set_title(f"jetpool shop: five services, one worker each, {len(os.sched_getaffinity(0))} CPUs")
    bottom.plot(offered, [p.p50_ms for p in points], "o-", label="p50")
    bottom.plot(offered, [p.p99_ms for p in points], "s-", label="p99")
    bottom.axvline(half.offered_per_s, color="grey", ls=":", label=f"half load ({half.offered_per_s:g}/s)")
    bottom.set_yscale("log")
    bottom.set_xlabel("offered load (orders/s)")
    bottom.set_ylabel("placed → ended (ms)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KEEPS_UP = 0.95
P99_TARGET_MS = 250.0  # issue 16's sustained target: kept up with p99 placed → ended under this


def sustained_point(points: list[Summary]) -> Summary:
    """The fastest point the shop kept up with: orders ended, while placing, at >= 95 % of the offered rate.

    Past saturation the rate at which orders end while placing is no capacity: the busiest service works
    through newer events before the ones that end older orders, so it rises and falls with the phase of
    the run (measured on 2026-11-29: 297/s ended at 423 offered, 574/s at 705). If no point kept up,
    the fastest one.
    """
    kept = [p for p in points if p.offered_per_s and p.steady_per_s >= KEEPS_UP * p.offered_per_s]
    return max(kept or points, key=lambda p: p.steady_per_s)


def within_p99(points: list[Summary], p99_ms: float = P99_TARGET_MS) -> Summary | None:
    """The fastest point the shop kept up with (as :func:`sustained_point`) at a p99 placed → ended under
    ``p99_ms``: the sustained rate as issue 16's target counts it. None if no point qualifies."""
    kept = [p for p in points if p.offered_per_s and p.steady_per_s >= KEEPS_UP * p.offered_per_s
            and p.p99_ms < p99_ms]
    return max(kept, key=lambda p: p.steady_per_s, default=None)


def run_e2e(results: Path, console: Console, sizes: Sizes | None = None,
            timed: Callable[[Callable[[], Measured]], Measured] | None = None) -> Sweep:
    """Drain, sweep, half load on a fresh shop; write ``shop_e2e.json`` and ``shop_e2e.png`` into ``results``.

    Args:
        results: the output directory (created if missing).
        console: where the load generator reports.
        sizes: how big (default: the benchmark's sizes).
        timed: runs the backlog drain, e.g. through pytest-benchmark (default: just run it).
    """
    sizes = sizes or Sizes()
    results.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    info = run_info(REPO)
    with workdir() as tmp, running_shop(tmp) as running:
        cfg = running.cfg
        measure(cfg, sizes.warmup, 0, console)  # warm-up: imports, connections, first KV keys
        drain_run = functools.partial(measure_cpu, running, sizes.orders, 0, console, drain_window)
        drained = timed(drain_run) if timed is not None else drain_run()
        drain = drained[0]
        points = []
        for fraction in FRACTIONS:
            rate = round(drain.orders_per_s * fraction)
            points.append(measure(cfg, max(sizes.min_point_orders, int(rate * sizes.point_s)), rate, console))
        sustained = sustained_point(points)
        half_rate = round(sustained.steady_per_s / 2)
        half = measure(cfg, max(sizes.min_point_orders, int(half_rate * sizes.point_s)), half_rate, console)
        cpu = cpu_result(info, sizes.cpu, steady_cpu(running, sizes.cpu, console), drained)
    fast = within_p99(points)
    result = {"backlog_drain": asdict(drain), "sustained": asdict(sustained), "half_load": asdict(half),
              f"sustained_p99_under_{P99_TARGET_MS:g}_ms": asdict(fast) if fast is not None else None,
              "points": [asdict(p) for p in points], "cpu": cpu, "cpus": len(os.sched_getaffinity(0)),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (results / "shop_e2e.json").write_text(json.dumps(result, indent=2))
    plot(points, drain, sustained, half, results / "shop_e2e.png")
    console.print(report(cpu), markup=False, highlight=False, soft_wrap=True)
    return Sweep(drain, points, sustained, half, cpu)


@pytest.mark.timeout(900)
def test_shop_end_to_end(benchmark: Any) -> None:
    console = Console(width=120)
    sweep = run_e2e(RESULTS, console, timed=lambda run: benchmark.pedantic(run, rounds=1, iterations=1))
    drain, sustained, half = sweep.drain, sweep.sustained, sweep.half
    benchmark.extra_info.update(sustained_orders_per_s=round(sustained.steady_per_s, 1),
                                backlog_drain_orders_per_s=round(drain.orders_per_s, 1),
                                half_load_p50_ms=round(half.p50_ms, 1), half_load_p99_ms=round(half.p99_ms, 1))
    fast = within_p99(sweep.points)
    under = (f"{fast.steady_per_s:.0f} orders/s (p99 {fast.p99_ms:.0f} ms)" if fast is not None
             else f"no point kept up with p99 under {P99_TARGET_MS:g} ms")
    console.print(f"backlog drain {drain.orders_per_s:.0f} orders/s; sustained {sustained.steady_per_s:.0f} "
                  f"orders/s (p99 {sustained.p99_ms:.0f} ms); sustained with p99 under {P99_TARGET_MS:g} ms: {under}; "
                  f"at half of it ({half.offered_per_s:g}/s): p50 {half.p50_ms:.0f} ms, "
                  f"p99 {half.p99_ms:.0f} ms; plot: {RESULTS / 'shop_e2e.png'}")


def run_http_e2e(results: Path, console: Console, rates: tuple[float, ...] = HTTP_RATES, duration_s: float = HTTP_S,
                 connections: int = HTTP_CONNECTIONS) -> list[HttpRun]:
    """The shop and its order API on a fresh broker and database, wrk at each of ``rates`` for ``duration_s``;
    write ``shop_e2e_http.json`` into ``results``."""
    binary = wrk_binary()
    tool = wrk_version(binary)
    runs: list[HttpRun] = []
    load_before = os.getloadavg()
    with workdir() as tmp, shop(tmp) as cfg:
        api = ApiProcess(Path(cfg.source), str(cfg.nats.url), tmp / "api.log", tied=True).start()
        try:
            # Warm-up, not reported: the API's and the workers' first connections, pools and KV keys.
            run, customer = new_run()
            uvloop.run(seed_stock(cfg, run))
            run_wrk(binary, api.url, tmp, run, customer, rates[0], 3, connections)
            uvloop.run(wait_ended(os.environ[DATABASE_URL_ENV], customer))
            for rate in rates:
                run, customer = new_run()
                uvloop.run(seed_stock(cfg, run))
                command, numbers = run_wrk(binary, api.url, tmp, run, customer, rate, duration_s, connections)
                result = uvloop.run(summarise(os.environ[DATABASE_URL_ENV], customer, tool, command, rate,
                                              duration_s, connections, numbers))
                console.print(f"{tool} at {rate:g}/s: {result.requests} POSTs ({result.posts_per_s:.0f}/s, "
                              f"p99 {result.post_p99_ms:.1f} ms), {result.ended} of {result.orders} orders ended, "
                              f"{result.orders_per_s:.0f} orders/s, placed → ended p50 {result.p50_ms:.0f} ms "
                              f"p99 {result.p99_ms:.0f} ms")
                runs.append(result)
        finally:
            api.stop()
    results.mkdir(parents=True, exist_ok=True)
    report = {"runs": [asdict(r) for r in runs], "cpus": len(os.sched_getaffinity(0)),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (results / "shop_e2e_http.json").write_text(json.dumps(report, indent=2))
    return runs


@pytest.mark.timeout(900)
def test_shop_end_to_end_over_http(benchmark: Any) -> None:
    runs = benchmark.pedantic(lambda: run_http_e2e(RESULTS, Console(width=160)), rounds=1, iterations=1)
    for run in runs:
        assert run.non_2xx == 0 and run.orders >= run.requests, run  # POSTs still in flight when wrk stopped count too
        assert run.ended == run.orders and run.double_charges == 0, run
        benchmark.extra_info[f"http_{run.offered_per_s:g}_orders_per_s"] = round(run.orders_per_s, 1)
        benchmark.extra_info[f"http_{run.offered_per_s:g}_p99_ms"] = round(run.p99_ms, 1)
