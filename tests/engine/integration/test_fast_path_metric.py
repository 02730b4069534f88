"""``jetpool_fast_path{path}`` on a real connection: 1 for every path with the pinned nats-py and prometheus-client.

The four paths are installed the way a worker installs them (jetpool's connect, a hot subscription, an
outbox, a metrics flush); a check the fence fails (here: another nats-py release, passed as the version
to judge) turns that path's gauge to 0, and installing again turns it back.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from prometheus_client import REGISTRY

from engine import transport
from engine.config import NatsConfig
from engine.connection import connect
from engine.embedded import EmbeddedServer
from engine.metrics import RouteMetrics
from engine.transport import fence, outbox


def gauge(path: str) -> float | None:
    return REGISTRY.get_sample_value("jetpool_fast_path", {"path": path})


def test_every_fast_path_reads_1_on_the_pinned_versions(nats_server: EmbeddedServer) -> None:
    async def main() -> None:
        nc = await connect(NatsConfig(url=nats_server.url), name="fence")
        try:
            assert transport.install(nc) == {"parser": True, "inbox": True, "outbox": True}
            assert isinstance(nc._ps, transport.parser.FastParser)

            async def cb(msg: Any) -> None:
                return None

            sub = await nc.subscribe(nc.new_inbox(), cb=cb)
            assert transport.inline(nc, sub, cb, "fence")
            assert transport.Outbox(nc).fast
        finally:
            await nc.close()

    asyncio.run(main())
    tallies = RouteMetrics(f"fence-{uuid.uuid4().hex[:8]}", ["Ping"])
    tallies.duration("Ping", 0.003)
    tallies.flush(0, {})  # the histogram path is decided on the process's first write
    assert {path: gauge(path) for path in transport.PATHS} == dict.fromkeys(transport.PATHS, 1.0)


def test_a_nats_py_release_outside_the_range_reads_0_until_installed_again(nats_server: EmbeddedServer) -> None:
    async def main() -> None:
        nc = await connect(NatsConfig(url=nats_server.url), name="fence")
        try:
            assert not fence.enable("outbox", outbox.missing(nc), version="2.17.0")
            assert gauge("outbox") == 0
            assert transport.install(nc)["outbox"]
            assert gauge("outbox") == 1
        finally:
            await nc.close()

    asyncio.run(main())
