"""The shop's end-to-end benchmark harness works: a tiny run of its drain, sweep and plot into a temp dir.

Not a performance test (nothing here is timed against a limit): it keeps `make bench` from rotting.
It runs :func:`benchmarks.test_shop_e2e.run_e2e`, the benchmark's own code path (a fresh nats-server
and engine, the demo's load generator with its invariant checks at every point), with small sizes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.test_shop_e2e import FRACTIONS, Sizes, run_e2e, sustained_point
from handlers.tools.load import Summary

# Points long enough that the placing period yields a steady rate (Tracker.steady_rate needs >= 1 s).
TINY = Sizes(orders=300, point_s=1.5, warmup=100, min_point_orders=100)
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
    assert set(result) == {"backlog_drain", "sustained", "half_load", "points", "cpus", "loadavg_before",
                           "loadavg_after"}
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
    assert sustained.steady_per_s > 0  # the points were long enough to measure a rate while placing
    assert half.offered_per_s == round(sustained.steady_per_s / 2)
    assert result["cpus"] >= 1 and len(result["loadavg_before"]) == len(result["loadavg_after"]) == 3
    assert "invariants violated" not in out.getvalue()

    png = (tmp_path / "shop_e2e.png").read_bytes()
    assert _png_size(png) == (770, 770)  # figsize 7x7 inches at 110 dpi
    assert png.endswith(b"IEND\xaeB`\x82")  # written to the end


def test_sustained_is_the_fastest_point_that_kept_up() -> None:
    base = Summary(**{name: 0 for name in Summary.__dataclass_fields__})

    def point(offered: float, steady: float) -> Summary:
        return dataclasses.replace(base, offered_per_s=offered, steady_per_s=steady)

    kept, overloaded = point(282, 281), point(705, 574)
    assert sustained_point([point(141, 141), kept, point(423, 297), overloaded]) == kept
    assert sustained_point([point(423, 297), overloaded]) == overloaded  # none kept up: the fastest
