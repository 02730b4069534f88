"""What dead-lettering bad input costs: CPU of the workers and the broker per malformed event, nothing else.

A fresh chaos shop (:class:`handlers.tools.chaos.shop.Shop`: a private nats-server and the engine with all five
services) gets ``count`` malformed OrderPlaced events at ``rate`` per second and no valid traffic. Each
is dead-lettered by the three services that consume OrderPlaced (orders, payments, audit). The CPU
seconds every worker and the broker used from the first publish until the last of the ``3 * count``
entries was stored and every consumer settled, divided by ``count``, is the cost of one malformed event.
CPU time is far steadier than latency on a shared machine, so two versions of the dead-letter path can be
compared with a few runs each.

    .venv/bin/python -m benchmarks.dlq_cost [--count 3000] [--rate 300] [--workdir DIR]

Prints one JSON line: the cost per malformed event in CPU ms, in all and per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path

import psutil
import uvloop

from handlers.tools.chaos.scenarios import _malformed
from handlers.tools.chaos.session import Session
from handlers.tools.chaos.shop import Shop


def _cpu_by_process(shop: Shop) -> dict[str, float]:
    services = shop.services_by_pid()
    procs = {services.get(p.pid, str(p.pid)): p for p in shop.workers()}
    with contextlib.suppress(psutil.Error):
        procs["broker"] = psutil.Process(shop.server.pid)
    out = {}
    for name, proc in procs.items():
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[name] = times.user + times.system
    return out


async def measure(workdir: Path, count: int, rate: float) -> dict[str, object]:
    shop = Shop(workdir)
    try:
        await shop.start()
        async with Session(shop) as s:
            await asyncio.sleep(2)  # let start-up work finish
            before, began = _cpu_by_process(shop), time.monotonic()
            await s.producer.place(_malformed(s.cfg, count), rate)
            await s.producer.flush()
            await s.until_dead_lettered(3 * count, timeout_s=300)
            await s.settle(0)
            after, wall_s = _cpu_by_process(shop), time.monotonic() - began
    finally:
        shop.close()
    per = {name: (after[name] - before.get(name, 0.0)) * 1000 / count for name in after}
    return {"malformed": count, "rate": rate, "wall_s": round(wall_s, 1),
            "cpu_ms_per_malformed": round(sum(per.values()), 2),
            "per_process_ms": {k: round(v, 3) for k, v in per.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dlq-cost-") as tmp:
        result = uvloop.run(measure(args.workdir or Path(tmp), args.count, args.rate))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
