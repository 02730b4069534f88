"""Scaling out on one box: one durable consumer shared by more workers and more "pods" (supervisors).

    make bench   # runs this too; or: .venv/bin/pytest benchmarks/test_scaling.py --benchmark-only -s

Every layout drains the same prefilled stream with the process loop; the table shows msg/s (median) so
the README can say how far sharing one consumer goes on this machine.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.engine_bench import run_engine
from benchmarks.prefill import delete_stream, prefill
from engine.embedded import EmbeddedServer

N = int(os.environ.get("JETPOOL_BENCH_N", "200000"))
ROUNDS = int(os.environ.get("JETPOOL_BENCH_ROUNDS", "3"))
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (pods, workers per pod)
RESULTS: dict[tuple[int, int], list[float]] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    broker = EmbeddedServer(store_dir=tmp_path_factory.mktemp("scaling-store"))
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.mark.parametrize(("pods", "workers"), LAYOUTS, ids=[f"{p}pods-{w}workers" for p, w in LAYOUTS])
def test_shared_consumer_scaling(benchmark: Any, server: EmbeddedServer, pods: int, workers: int) -> None:
    rates: list[float] = []

    def setup() -> None:
        asyncio.run(delete_stream(server.url))
        asyncio.run(prefill(server.url, N))

    benchmark.pedantic(lambda: rates.append(run_engine(server.url, N, workers, "process", pods=pods)["msg_per_s"]),
                       setup=setup, rounds=ROUNDS, iterations=1)
    RESULTS[(pods, workers)] = rates
    benchmark.extra_info.update({"median_msg_per_s": statistics.median(rates), "rates": [round(r) for r in rates]})


@pytest.fixture(scope="session", autouse=True)
def _report() -> Iterator[None]:
    yield
    if RESULTS:
        lines = [f"{N:,} events x {ROUNDS} rounds, process loop, medians", "",
                 "| pods (supervisors) | workers per pod | total workers | msg/s |", "|---|---|---|---|"]
        for (pods, workers), rates in sorted(RESULTS.items()):
            lines.append(f"| {pods} | {workers} | {pods * workers} | {statistics.median(rates):,.0f} |")
        text = "\n".join(lines)
        print("\n" + text)
        Path(".benchmarks").mkdir(exist_ok=True)
        Path(".benchmarks/scaling.md").write_text(text + "\n")
