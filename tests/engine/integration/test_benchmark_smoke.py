"""The benchmark harness itself works: a tiny run of the floor and the engine on the BENCH stream.

Not a performance test (nothing here is timed against a limit): it keeps `make bench` from rotting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.engine_bench import run_engine
from benchmarks.floor import Mode, run_floor
from benchmarks.prefill import create_consumer, delete_stream, prefill
from engine.embedded import EmbeddedServer

N = 2000


@pytest.fixture
def bench_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(store_dir=tmp_path / "bench-store")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["process", "consume"])
def test_floor_and_engine_drain_the_same_stream(bench_server: EmbeddedServer, mode: Mode) -> None:
    url = bench_server.url
    asyncio.run(prefill(url, N))
    asyncio.run(create_consumer(url))
    floor = run_floor(url, N, 1, mode, timeout_s=120)
    assert floor["msgs"] == N and floor["msg_per_s"] > 0

    asyncio.run(delete_stream(url))
    asyncio.run(prefill(url, N))
    engine = run_engine(url, N, 1, mode, timeout_s=120)
    assert engine["msgs"] == N and engine["msg_per_s"] > 0
    assert len(engine["peak_rss_mib_per_proc"]) == 1 and engine["peak_rss_mib_per_proc"][0] > 0
