"""Replicated buckets are read from their leader (through the worker's own inbox); only single-replica
buckets allow direct gets.

On a replicated stream every replica answers a direct get, one that has not applied the last write
yet included, so a record created a moment ago could read as absent. A 3-node cluster, real servers.
"""

from __future__ import annotations

import asyncio

import nats

from engine.config import BucketConfig
from engine.embedded import EmbeddedCluster
from engine.kv import FastKV, KVClient
from engine.provision import _tune_bucket
from engine.publisher import Publisher
from engine.state import open_buckets


def test_a_replicated_bucket_is_read_from_its_leader(cluster: EmbeddedCluster) -> None:
    async def main() -> None:
        nc = await nats.connect([node.url for node in cluster.nodes])
        publisher = Publisher(nc, "t", captured=[])
        await publisher.start()
        client = KVClient(nc, publisher)
        await client.start()
        try:
            js = nc.jetstream()
            buckets = {"r3": BucketConfig(replicas=3), "r1": BucketConfig()}
            stores = await open_buckets(js, buckets, create=True, fast=client)
            r1, r3 = stores["r1"], stores["r3"]
            assert isinstance(r1, FastKV) and isinstance(r3, FastKV)
            assert (await js.stream_info("KV_r1")).config.allow_direct and r1.direct
            assert not (await js.stream_info("KV_r3")).config.allow_direct and not r3.direct
            assert r3.fast_reads  # through the connection's own inbox (STREAM.MSG.GET), not nats-py's requests
            revision = await r3.create("k", {"n": 1})
            assert await r3.get("k") == ({"n": 1}, revision)
            assert await r3.get("absent") == (None, 0)
            for i in range(20):  # every read right after its write sees it: the leader answers
                written = await r3.update("k", {"n": i + 2}, revision)
                assert await r3.get("k") == ({"n": i + 2}, written)
                revision = written
            kv = await js.key_value("r3")
            await kv.put("gone", b'{"n": 0}')
            await kv.delete("gone")
            assert await r3.get("gone") == (None, 0)  # a delete marker reads as absent
            assert await r3.create("gone", {"n": 1}) > 0  # and is created over, as nats-py does

            # A replicated bucket that allows direct gets (set by hand, or by an earlier jetpool) is
            # turned back by provisioning.
            info = await js.stream_info("KV_r3")
            info.config.allow_direct = True
            await js.update_stream(info.config)
            await _tune_bucket(js, "r3", None)
            assert not (await js.stream_info("KV_r3")).config.allow_direct
            await _tune_bucket(js, "r1", None)
            assert (await js.stream_info("KV_r1")).config.allow_direct  # left as it is
        finally:
            await client.stop()
            await publisher.stop()
            await nc.close()

    asyncio.run(main())
