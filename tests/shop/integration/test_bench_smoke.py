"""The shop's end-to-end benchmark harness works: a tiny run of its drain, sweep and plot into a temp dir.

Not a performance test (nothing here is timed against a limit): it keeps `make bench` from rotting.
It runs :func:`benchmarks.test_shop_e2e.run_e2e`, the benchmark's own code path (a fresh nats-server
and engine, the demo's load generator with its invariant checks at every point), with small sizes,
the CPU per order and the per-order budget (:mod:`benchmarks.shop_cpu`) included: their fields are
checked, never their values.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from benchmarks import shop_ab, shop_hops
from benchmarks.proc_stats import MachineTimes, read_machine, reference_speed
from benchmarks.shop_cpu import CpuSizes, kind_of, report
from benchmarks.shop_floor import floor_config
from benchmarks.test_shop_e2e import FRACTIONS, Sizes, run_cpu, run_e2e, sustained_point, within_p99
from handlers import SHOP_YAML
from handlers.tools.load import Summary

# Points long enough that the placing period yields a steady rate (Tracker.steady_rate needs >= 1 s).
TINY = Sizes(orders=300, point_s=1.5, warmup=100, min_point_orders=100,
             cpu=CpuSizes(rate=100, warmup_s=1, window_s=2, sniff_s=1.5))
SERVICES = {"orders", "payments", "inventory", "notifications", "audit"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a well-formed PNG has right after its signature."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _summary(raw: dict[str, Any]) -> Summary:
    return Summary(**raw)  # fails on a missing or unknown field


def test_the_shop_benchmark_sweeps_offered_load_and_writes_its_json_and_plot(tmp_path: Path) -> None:
    out = io.StringIO()
    sweep = run_e2e(tmp_path, Console(file=out, width=160), TINY)

    result = json.loads((tmp_path / "shop_e2e.json").read_text())
    assert set(result) == {"backlog_drain", "sustained", "half_load", "points", "cpu", "cpus", "loadavg_before",
                           "loadavg_after", "sustained_p99_under_250_ms"}
    drain, sustained, half = (_summary(result[k]) for k in ("backlog_drain", "sustained", "half_load"))
    points = [_summary(p) for p in result["points"]]
    assert (drain, points, sustained, half) == (sweep.drain, sweep.points, sweep.sustained, sweep.half)
    assert drain.orders == drain.ended == TINY.orders and drain.offered_per_s == 0 and drain.orders_per_s > 0
    assert [p.offered_per_s for p in points] == [round(drain.orders_per_s * f) for f in FRACTIONS]
    for point in [*points, half]:
        assert point.ended == point.orders >= TINY.min_point_orders, point
        assert point.confirmed + point.declined + point.out_of_stock == point.orders, point
        assert 0 < point.p50_ms <= point.p95_ms <= point.p99_ms, point
    assert sustained == sustained_point(points)
    fast = within_p99(points)
    under = result["sustained_p99_under_250_ms"]
    assert (under is None and fast is None) or (fast is not None and _summary(under) == fast)
    assert sustained.steady_per_s > 0  # the points were long enough to measure a rate while placing
    assert half.offered_per_s == round(sustained.steady_per_s / 2)
    assert result["cpus"] >= 1 and len(result["loadavg_before"]) == len(result["loadavg_after"]) == 3
    assert "invariants violated" not in out.getvalue()
    _check_cpu(result["cpu"], drain)
    assert result["cpu"] == sweep.cpu
    assert report(sweep.cpu) in out.getvalue()  # the tables were printed

    png = (tmp_path / "shop_e2e.png").read_bytes()
    assert _png_size(png) == (770, 770)  # figsize 7x7 inches at 110 dpi
    assert png.endswith(b"IEND\xaeB`\x82")  # written to the end


def _check_cpu(cpu: dict[str, Any], drain: Summary) -> None:
    """The CPU point and the drain's CPU have every role and every budget field (values are not judged)."""
    assert {"run", "sizes", "steady", "steady_summary", "backlog", "backlog_summary", "load_after"} <= cpu.keys()
    assert cpu["sizes"]["rate"] == TINY.cpu.rate and _summary(cpu["backlog_summary"]) == drain
    steady = _summary(cpu["steady_summary"])
    assert steady.offered_per_s == TINY.cpu.rate and steady.ended == steady.orders == TINY.cpu.orders
    assert cpu["run"]["commit"] and cpu["run"]["cpus"] >= 1 and len(cpu["run"]["load_before"]["loadavg"]) == 3
    assert cpu["run"]["speed_before_us"] > 0 and cpu["load_after"]["speed_us"] > 0
    for got in (cpu["steady"], cpu["backlog"]):
        roles = set(got["cpu_ms_per_order"])
        assert {"nats_server", "supervisor", "gateway", "postgres", "load", "total"} | SERVICES <= roles, roles
        assert set(got["cores"]) == roles and got["orders_ended"] > 0 and got["seconds"] > 0
        assert all(ms >= 0 for ms in got["cpu_ms_per_order"].values())
        assert 0 <= got["steal_share"] < 1  # this machine's /proc/stat has a steal column
        b = got["budget"]
        assert {"deliveries", "settled", "deliveries_by_consumer", "events_stored_on_shop", "kv_writes",
                "kv_writes_by_bucket", "js_api_requests", "js_api_errors", "server", "client_msgs"} <= b.keys()
        assert {f"SHOP/{s}" for s in SERVICES} <= b["deliveries_by_consumer"].keys()
        assert {"orders", "payments", "stock"} <= b["kv_writes_by_bucket"].keys()
        assert set(b["server"]) == {"in_msgs", "out_msgs", "in_bytes", "out_bytes"}
        assert b["deliveries"] > 0 and b["events_stored_on_shop"] > 0 and b["server"]["in_msgs"] > 0
    assert cpu["backlog"]["orders_ended"] == drain.orders
    sniff = cpu["steady"]["sniff"]
    assert sniff["orders_ended"] > 0 and {"ack", "pull"} <= sniff["per_order_by_kind"].keys()


def test_sniffed_messages_are_told_apart_by_kind() -> None:
    assert kind_of("$JS.ACK.SHOP.orders.1.2.3.4.5", b"", None) == "ack"
    assert kind_of("$JS.ACK.SHOP.orders.1.2.3.4.5", b"-NAK {\"delay\": 1}", None) == "nak"
    assert kind_of("$JS.ACK.SHOP.orders.1.2.3.4.5", b"+WPI", None) == "in_progress"
    assert kind_of("$JS.ACK.SHOP.orders.1.2.3.4.5", b"+TERM", None) == "term"
    assert kind_of("$JS.API.CONSUMER.MSG.NEXT.SHOP.orders", b"{}", None) == "pull"
    assert kind_of("$JS.API.DIRECT.GET.KV_stock.$KV.stock.sku.a", b"", None) == "kv_read_direct.stock"
    assert kind_of("$JS.API.STREAM.MSG.GET.KV_payments", b"{}", None) == "kv_read_api.payments"
    assert kind_of("$JS.API.CONSUMER.INFO.SHOP.orders", b"", None) == "api.CONSUMER.INFO"
    assert kind_of("$KV.stock.sku.a", b"{}", {"Nats-Expected-Last-Subject-Sequence": "3"}) == "kv_cas.stock"
    assert kind_of("$KV.orders.o-1", b"{}", None) == "kv_put.orders"


def test_sustained_is_the_fastest_point_that_kept_up() -> None:
    base = Summary(**{name: 0 for name in Summary.__dataclass_fields__})

    def point(offered: float, steady: float) -> Summary:
        return dataclasses.replace(base, offered_per_s=offered, steady_per_s=steady)

    kept, overloaded = point(282, 281), point(705, 574)
    assert sustained_point([point(141, 141), kept, point(423, 297), overloaded]) == kept
    assert sustained_point([point(423, 297), overloaded]) == overloaded  # none kept up: the fastest


def test_the_sustained_rate_the_issue_counts_has_p99_under_250_ms() -> None:
    base = Summary(**{name: 0 for name in Summary.__dataclass_fields__})

    def point(offered: float, steady: float, p99: float) -> Summary:
        return dataclasses.replace(base, offered_per_s=offered, steady_per_s=steady, p99_ms=p99)

    fast_enough, too_slow = point(481, 479, 105), point(641, 630, 292)
    assert within_p99([point(160, 160, 72), fast_enough, too_slow, point(801, 734, 1202)]) == fast_enough
    assert within_p99([too_slow]) is None
    assert within_p99([too_slow], p99_ms=300) == too_slow


def test_hops_are_measured_from_each_orders_own_events() -> None:
    times = {
        "o-1": {"OrderPlaced": 10.0, "PaymentAuthorized": 10.020, "StockReserved": 10.030,
                "OrderConfirmed": 10.035, "NotificationSent": 10.050},
        "o-2": {"OrderPlaced": 20.0, "PaymentDeclined": 20.010, "OrderCancelled": 20.014},
        "o-3": {"OrderPlaced": 30.0},  # not ended: in no hop
    }
    found = {hop.start[0]: [round(ms) for ms in hop.ms] for hop in shop_hops.hops(times)}
    assert found == {"OrderPlaced": [20, 10], "PaymentAuthorized": [10], "OutOfStock": [],
                     "StockReserved": [5, 4], "OrderConfirmed": [15]}
    assert shop_hops.Hop(("A",), ("B",), [float(n) for n in range(100, 0, -1)]).line().endswith("| 50 | 90 | 99 |")
    assert shop_hops.Hop(("A",), ("B",), []).line().endswith("| 0 | - | - | - |")


def test_the_hops_benchmark_runs() -> None:
    tables = shop_hops.run([100.0], 1.5, Console(file=io.StringIO()), warmup=20)
    assert len(tables) == 1 and "| OrderPlaced → PaymentAuthorized / PaymentDeclined |" in tables[0]
    first = next(line for line in tables[0].splitlines() if line.startswith("| OrderPlaced"))
    assert int(first.split("|")[2]) > 0  # orders were measured on that hop


def test_the_floor_runs_the_shops_topology_without_its_work() -> None:
    """``shop_cpu --floor``: the same deliveries and events per order as the shop, no state written."""
    result = run_cpu(Console(file=io.StringIO()), CpuSizes(rate=100, warmup_s=1, window_s=2, sniff_s=0),
                     drain_orders=0, warmup=50, floor=True)
    budget = result["steady"]["budget"]
    assert result["run"]["floor"] is True and "The floor" in report(result)
    assert budget["deliveries_by_consumer"]["SHOP/audit"] > 4.5 and budget["events_stored_on_shop"] > 4.5
    assert budget["kv_writes"] == 0  # the shop's handlers would write 4-5 per order


def test_the_floor_config_keeps_every_route_and_setting_but_the_handlers() -> None:
    shop = yaml.safe_load(SHOP_YAML.read_text())
    floor = floor_config(shop)
    assert "breakers" not in floor and floor["streams"] == shop["streams"] and floor["state"] == shop["state"]
    for name, service in shop["services"].items():
        kept = floor["services"][name]
        assert set(kept["routes"]) == set(service["routes"])
        assert {handler.split(":")[0] for handler in kept["routes"].values()} == {"benchmarks.shop_floor"}
        assert kept["linger_ms"] == service["linger_ms"] and kept["workers"] == service["workers"]
        assert not {"setup", "breakers", "settings"} & set(kept)


def _cpu_run(total: float, p99: float, drained: float, steal: float | None = None) -> dict[str, Any]:
    run: dict[str, Any] = {
        "steady": {"cpu_ms_per_order": {"nats_server": total / 4, "total": total}},
        "steady_summary": {"p50_ms": p99 / 2, "p99_ms": p99},
        "backlog": {"ended_per_s": drained, "cpu_ms_per_order": {"nats_server": 0.3, "total": 2.0}}}
    if steal is not None:  # a base older than the steal figure has none (and no reference speed)
        run["steady"]["steal_share"] = run["backlog"]["steal_share"] = steal
        run["run"], run["load_after"] = {"speed_before_us": 2.3 + steal}, {"speed_us": 2.4 + steal}
    return run


def test_the_ab_report_compares_medians_and_shows_every_run() -> None:
    runs = {"base": [_cpu_run(5.0, 120, 800), _cpu_run(5.2, 150, 900), _cpu_run(4.9, 130, 850)],
            "head": [_cpu_run(4.4, 100, 880), _cpu_run(4.6, 110, 870), _cpu_run(4.5, 140, 860)]}
    lines = shop_ab.table(runs).splitlines()
    steady = next(line for line in lines if line.startswith("| steady: CPU ms per order"))
    assert steady == ("| steady: CPU ms per order, all processes | 5.00 | 4.50 | -10 % | 5.00, 5.20, 4.90 "
                      "| 4.40, 4.60, 4.50 |")
    assert any(line.startswith("| steady: nats_server | 1.25 | 1.12 |") for line in lines)
    assert any(line.startswith("| backlog: orders/s | 850.00 | 870.00 | +2 % |") for line in lines)
    assert "| steady: hypervisor steal, % of vCPU time | - | - | - | -, -, - | -, -, - |" in lines


def test_the_ab_report_shows_each_runs_steal_and_none_for_a_base_without_it() -> None:
    runs = {"base": [_cpu_run(5.0, 120, 800), _cpu_run(5.2, 150, 900)],
            "head": [_cpu_run(4.4, 100, 880, steal=0.02), _cpu_run(4.6, 110, 870, steal=0.31)]}
    lines = shop_ab.table(runs).splitlines()
    assert "| backlog: hypervisor steal, % of vCPU time | - | 16.50 | - | -, - | 2.00, 31.00 |" in lines
    assert "| the machine's speed after the run, µs per reference round | - | 2.56 | - | -, - | 2.42, 2.71 |" in lines


def test_the_reference_speed_is_cpu_time_per_round() -> None:
    us = reference_speed(rounds=200, repeats=3)
    assert 0.05 < us < 100, us  # µs per round (a few here): not seconds, not the total of 200 rounds


def test_the_machines_steal_is_read_from_proc_stat() -> None:
    tick = 1 / os.sysconf("SC_CLK_TCK")
    before = read_machine("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
    after = read_machine("cpu  200 0 100 1500 10 0 10 180 0 0\n")
    assert before.total_s == pytest.approx(1000 * tick) and before.steal_s == pytest.approx(35 * tick)
    assert after.steal_share(before) == pytest.approx(145 / 1000)
    assert after.steal_share(after) is None  # no time passed
    assert read_machine("cpu  100 0 50 800 10 0 5\n").steal_s == 0  # a kernel without the column
    assert read_machine("intr 1 2 3\n") == read_machine("") == MachineTimes()
    since_boot = read_machine().steal_share(MachineTimes())  # this machine's own
    assert since_boot is not None and 0 <= since_boot < 1


def test_the_ab_refuses_a_base_that_is_no_commit() -> None:
    with pytest.raises(SystemExit, match="not a commit"):
        shop_ab.commit_of("no-such-revision-anywhere")
