"""CPU time per processed event in one process: the engine's consumer and publisher against the floor's loop.

    .venv/bin/python -m benchmarks.cpu_per_event [--events 150000] [--rounds 3]

The throughput benchmark measures whole process trees, where the broker shares the two CPUs and a
slow spell of the VM moves every number. This runs the process loop (one output per input, ack after
its PubAck) inside this one process against an embedded nats-server, and reads this process's own CPU
time (``time.process_time``) from the first pull to the last ack, so it says what one event costs a
worker, the broker's share excluded. Rounds alternate floor and engine on a freshly prefilled stream
(prefilled from a child process, so this process's clock counts only the loop under test).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import uvloop

from benchmarks.engine_bench import engine_config
from benchmarks.floor import FloorWorker
from benchmarks.prefill import DURABLE
from engine.config import parse_config
from engine.connection import connect
from engine.consumer import Consumer
from engine.dispatch import build_router
from engine.embedded import EmbeddedServer
from engine.publisher import Publisher

_POLL_S = 0.005


def fresh_stream(url: str, n: int) -> None:
    """Delete, prefill and give BENCH its consumer, from a child process."""
    script = ("import asyncio; from benchmarks.prefill import create_consumer, delete_stream, prefill; "
              f"asyncio.run(delete_stream({url!r})); asyncio.run(prefill({url!r}, {n})); "
              f"asyncio.run(create_consumer({url!r}))")
    subprocess.run([sys.executable, "-c", script], check=True)


async def floor_cpu(url: str, n: int) -> float:
    """µs of CPU per event for the floor's process loop."""
    nc = await nats.connect(url, skip_subject_validation=True)
    worker = FloorWorker(nc, "process")
    await worker.subscribe()
    try:
        return await _timed(worker.pull, lambda: worker.progress.acked, n)
    finally:
        await nc.close()


async def engine_cpu(url: str, n: int) -> float:
    """µs of CPU per event for the engine's consumer and publisher (the process loop's no-op handler)."""
    cfg = parse_config(engine_config(url, 1, "process"))
    nc = await connect(cfg.nats, name="cpu-per-event")
    publisher = Publisher(nc, cfg.subject_prefix)
    await publisher.start()
    consumer = Consumer(nc, cfg, DURABLE, build_router(cfg, DURABLE), publisher)
    try:
        return await _timed(consumer.start, lambda: consumer.counts["ack"], n)
    finally:
        await consumer.stop(1.0)
        await publisher.stop()
        await nc.close()


async def _timed(start: Callable[[], Awaitable[None]], acked: Callable[[], int], n: int) -> float:
    gc.collect()
    gc.freeze()  # as a worker does after start-up
    try:
        began = time.process_time()
        await start()
        while acked() < n:
            await asyncio.sleep(_POLL_S)
        return (time.process_time() - began) / n * 1e6
    finally:
        gc.unfreeze()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=150_000, help="events per round (default 150000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each loop (default 3)")
    args = parser.parse_args(argv)
    server = EmbeddedServer(store_dir=Path(tempfile.mkdtemp(prefix="jetpool-cpu-"))).start()
    results: dict[str, list[float]] = {"floor": [], "engine": []}
    try:
        for _ in range(args.rounds):
            for name, measure in (("floor", floor_cpu), ("engine", engine_cpu)):
                fresh_stream(server.url, args.events)
                results[name].append(uvloop.run(measure(server.url, args.events)))
                print(f"{name:6s} {results[name][-1]:6.2f} µs of CPU per processed event", flush=True)
    finally:
        server.stop()
    floor, engine = statistics.median(results["floor"]), statistics.median(results["engine"])
    print(f"medians: floor {floor:.2f} µs, engine {engine:.2f} µs, engine - floor {engine - floor:+.2f} µs")


if __name__ == "__main__":
    main()
