"""Client CPU per read of a replicated (R3) bucket: nats-py's ``KeyValue.get`` against the leader read of
the fast state path (``STREAM.MSG.GET`` through the worker's own inbox, engine/kv.py).

    .venv/bin/python -m benchmarks.kv_leader_reads [--reads 3000] [--loops 32] [--reps 3]

Starts a 3-node embedded cluster, creates an R3 bucket as ``jetpool provision`` does (no direct gets),
writes 100 keys, and reads them ``--reads`` times on one connection from ``--loops`` concurrent loops,
alternating the two paths, ``--reps`` times. It reports this process's CPU time (``time.process_time``,
the client's share alone) per read, the median and every run. Single-replica buckets are read with direct
gets instead: ``benchmarks/kv_ops.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from engine.config import BucketConfig
from engine.embedded import EmbeddedCluster
from engine.kv import FastKV, KVClient
from engine.publisher import Publisher
from engine.state import open_buckets

KEYS = 100


async def cpu_per_read(read: Callable[[str], Awaitable[Any]], reads: int, loops: int) -> float:
    """µs of this process's CPU per read, ``reads`` reads from ``loops`` concurrent loops."""
    keys = iter([f"k{i % KEYS}" for i in range(reads)])

    async def loop() -> None:
        for key in keys:
            await read(key)

    started = time.process_time()
    await asyncio.gather(*(loop() for _ in range(loops)))
    return (time.process_time() - started) / reads * 1e6


async def run(cluster: EmbeddedCluster, args: argparse.Namespace) -> dict[str, list[float]]:
    nc = await nats.connect([node.url for node in cluster.nodes])
    publisher = Publisher(nc, "bench", captured=[])
    await publisher.start()
    client = KVClient(nc, publisher)
    await client.start()
    try:
        js = nc.jetstream()
        store = (await open_buckets(js, {"r3": BucketConfig(replicas=3)}, create=True, fast=client))["r3"]
        assert isinstance(store, FastKV) and store.fast_reads and not store.direct
        kv = await js.key_value("r3")
        for i in range(KEYS):
            await store.put(f"k{i}", {"n": i})
        runs: dict[str, list[float]] = {"nats-py KeyValue.get": [], "leader read (engine/kv.py)": []}
        for _ in range(args.reps):
            runs["nats-py KeyValue.get"].append(await cpu_per_read(kv.get, args.reads, args.loops))
            runs["leader read (engine/kv.py)"].append(await cpu_per_read(store.get, args.reads, args.loops))
        return runs
    finally:
        await client.stop()
        await publisher.stop()
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=3000, help="reads per run and path (default 3000)")
    parser.add_argument("--loops", type=int, default=32, help="concurrent loops on the connection (default 32)")
    parser.add_argument("--reps", type=int, default=3, help="runs per path; the median is kept (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cluster = EmbeddedCluster(base_dir=Path(directory))
        cluster.start()
        try:
            runs = asyncio.run(run(cluster, args))
        finally:
            cluster.stop()
    print(f"load average {os.getloadavg()[0]:.2f}; µs of client CPU per read of an R3 bucket, median of {args.reps}:")
    for path, values in runs.items():
        print(f"  {path}: {statistics.median(values):.1f}  (runs: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
