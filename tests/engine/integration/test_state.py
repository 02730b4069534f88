"""KV state on a real server: compare-and-set under contention, and the remembered-revision shortcut."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import nats

from engine.config import BucketConfig
from engine.embedded import EmbeddedServer
from engine.state import KVState, Value, open_buckets


def _increment(current: Value | None) -> Value:
    return {"n": (current or {"n": 0})["n"] + 1}


class CountingKV:
    """Wraps a nats-py KeyValue to count its requests."""

    def __init__(self, kv: Any) -> None:
        self.kv, self.gets, self.writes = kv, 0, 0

    async def get(self, key: str) -> Any:
        self.gets += 1
        return await self.kv.get(key)

    async def create(self, key: str, value: bytes) -> int:
        self.writes += 1
        return int(await self.kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.writes += 1
        return int(await self.kv.update(key, value, last=last))

    async def put(self, key: str, value: bytes) -> int:
        self.writes += 1
        return int(await self.kv.put(key, value))


async def _scenario(url: str) -> tuple[int, int, int, int]:
    bucket = f"t{uuid.uuid4().hex[:8]}"
    nc_a, nc_b = await nats.connect(url), await nats.connect(url)
    try:
        await open_buckets(nc_a.jetstream(), {bucket: BucketConfig(storage="memory")}, create=True)
        raw_a, raw_b = CountingKV(await nc_a.jetstream().key_value(bucket)), await nc_b.jetstream().key_value(bucket)
        a, b = KVState(raw_a), KVState(raw_b)
        for _ in range(10):  # A alone: after the first, each increment is one compare-and-set, no read
            await a.mutate("k", _increment)
        alone = (raw_a.gets, raw_a.writes)
        await b.mutate("k", _increment)  # B writes behind A's back: A's remembered revision is stale
        await a.mutate("k", _increment)
        # Two "processes" racing on one key: every increment lands exactly once.
        await asyncio.gather(*(s.mutate("k", _increment) for _ in range(50) for s in (a, b)))
        value, _ = await KVState(await nc_b.jetstream().key_value(bucket)).get("k")
        assert value is not None
        return alone[0], alone[1], raw_a.gets, int(value["n"])
    finally:
        await nc_a.close()
        await nc_b.close()


def test_remembered_revisions_save_reads_and_compare_and_set_keeps_them_safe(nats_server: EmbeddedServer) -> None:
    gets_alone, writes_alone, gets_total, final = asyncio.run(_scenario(nats_server.url))
    assert (gets_alone, writes_alone) == (1, 10)  # 10 increments, 1 read
    assert gets_total > gets_alone  # the stale guess failed and A read again
    assert final == 10 + 1 + 1 + 100
