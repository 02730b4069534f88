"""The fast state path (engine/kv.py) on a real nats-server: StateStore semantics, contention, lost PubAcks.

Each test opens its own bucket (a unique name) on the session's server, through ``open_buckets`` as a
worker does (``fast=KVClient(nc, publisher)``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
import yaml
from nats.js import api

from engine.config import BucketConfig
from engine.embedded import EmbeddedServer
from engine.errors import BrokerError, PublishTimeout
from engine.kv import WRITE, DirectGets, FastKV, KVClient
from engine.publisher import Publisher
from engine.state import Conflict, KVState, Value, open_buckets
from engine.transport import fence, inbox
from engine.transport.outbox import Outbox
from tests.support import App, run_cli


class CountingGets(DirectGets):
    """Counts the direct gets a store sends."""

    reads = 0

    async def last(self, stream: str, subject: str) -> Any:
        self.reads += 1
        return await super().last(stream, subject)


class LossyPublisher(Publisher):
    """Loses the next ``lose_acks`` PubAcks of state writes (stored, unheard), or the next ``lose_sends``
    state writes on their way out (never stored); the publisher's timeout then resends them."""

    lose_acks = 0
    lose_sends = 0

    async def _on_puback(self, msg: Any) -> None:
        entry = self._pending.get(msg.subject)
        if self.lose_acks and entry is not None and entry.subject.startswith("$KV."):
            self.lose_acks -= 1
            return
        await super()._on_puback(msg)

    async def _send(self, entry: Any) -> None:
        if self.lose_sends and entry.subject.startswith("$KV.") and entry.headers and WRITE in entry.headers:
            self.lose_sends -= 1
            self._seq += 1
            self._pending[self._inbox + str(self._seq)] = entry  # waits for a PubAck that never comes
            return
        await super()._send(entry)


Scenario = Callable[[Any, str, dict[str, Any]], Awaitable[None]]


def run(server: EmbeddedServer, scenario: Scenario, *, direct: bool = True, lossy: bool = False) -> None:
    """Run ``scenario(nc, bucket, fast)`` on a fresh bucket; ``fast`` holds the store and its parts."""
    async def main() -> None:
        nc = await nats.connect(server.url, allow_reconnect=False)
        bucket = f"kv{uuid.uuid4().hex[:10]}"
        publisher = (LossyPublisher(nc, "t", timeout_s=0.3, retry_s=5.0, captured=[]) if lossy
                     else Publisher(nc, "t", captured=[]))
        await publisher.start()
        client = KVClient(nc, publisher)
        client.gets = CountingGets(nc)
        await client.start()
        try:
            js = nc.jetstream()
            if direct:
                await open_buckets(js, {bucket: BucketConfig(storage="memory")}, create=True)
            else:  # as nats-py creates a bucket: no allow_direct
                await js.create_key_value(api.KeyValueConfig(bucket=bucket, storage=api.StorageType.MEMORY))
            stores = await open_buckets(js, {bucket: BucketConfig(storage="memory")}, create=False, fast=client)
            store = stores[bucket]
            assert isinstance(store, FastKV)
            await scenario(nc, bucket, {"store": store, "publisher": publisher, "gets": client.gets,
                                        "kv": await js.key_value(bucket)})
        finally:
            await client.stop()
            await publisher.stop()
            await nc.close()

    asyncio.run(main())


async def _semantics(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
    store, kv = fast["store"], fast["kv"]
    assert await store.get("missing") == (None, 0)
    value: Value = {"name": "wídget ✓", "n": 3, "f": 1.5, "nested": {"list": [1, None, True]}, "big": "x" * 5000}
    first = await store.create("a", value)
    assert await store.get("a") == (value, first)
    assert (await kv.get("a")).revision == first  # nats-py reads what the fast path wrote
    with pytest.raises(Conflict):
        await store.create("a", {"n": 0})
    second = await store.update("a", {"n": 4}, first)
    assert second > first
    with pytest.raises(Conflict):
        await store.update("a", {"n": 5}, first)  # stale revision
    third = await store.put("a", {"n": 6})
    assert await store.get("a") == ({"n": 6}, third)
    # written by nats-py, read by the fast path
    by_nats = await kv.put("b", b'{"from":"nats-py"}')
    assert await store.get("b") == ({"from": "nats-py"}, by_nats)
    # deleted and purged keys are missing, and can be created again
    await kv.delete("a")
    assert await store.get("a") == (None, 0)
    again = await store.create("a", {"n": 7})
    assert await store.get("a") == ({"n": 7}, again)
    await kv.purge("b")
    assert await store.get("b") == (None, 0)
    assert await store.mutate("b", lambda v: {"n": 1} if v is None else None) == {"n": 1}
    with pytest.raises(nats.js.errors.InvalidKeyError):
        await store.get("a b")
    with pytest.raises(nats.js.errors.InvalidKeyError):
        await store.put("a.>", {"n": 1})


def test_fast_store_has_the_state_store_semantics(nats_server: EmbeddedServer) -> None:
    run(nats_server, _semantics)


def test_fast_store_reads_by_direct_gets_on_the_inline_inbox(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        assert fast["store"].direct
        assert inbox.is_inline(nc, fast["gets"]._sub)
        await fast["store"].create("k", {"n": 1})
        assert await fast["store"].get("k") == ({"n": 1}, 1)
        assert fast["gets"].reads == 1
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
        assert info.config.allow_direct  # open_buckets(create=True) made it so

    run(nats_server, scenario)


def test_a_bucket_without_allow_direct_is_read_through_nats_py(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        assert not fast["store"].direct
        await _semantics(nc, bucket, fast)
        assert fast["gets"].reads == 0

    run(nats_server, scenario, direct=False)


def test_fast_store_works_on_the_public_api_when_the_fence_says_no(nats_server: EmbeddedServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fence, "installed", lambda package: "99.0.0")

    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        assert not inbox.is_inline(nc, fast["gets"]._sub) and not Outbox(nc).fast
        await _semantics(nc, bucket, fast)

    try:
        run(nats_server, scenario)
    finally:
        monkeypatch.undo()
        fence.enable("inbox")
        fence.enable("outbox")


def _increment(current: Value | None) -> Value:
    return {"n": (current or {"n": 0})["n"] + 1}


def test_concurrent_mutations_from_two_connections_lose_no_update(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        other = await nats.connect(nats_server.url, allow_reconnect=False)
        publisher = Publisher(other, "t", captured=[])
        await publisher.start()
        client = KVClient(other, publisher)
        await client.start()
        try:
            b = (await open_buckets(other.jetstream(), {bucket: BucketConfig()}, create=False, fast=client))[bucket]
            slow = KVState(await other.jetstream().key_value(bucket))  # the old path in the same race
            stores = [fast["store"], b, slow]
            await asyncio.gather(*(s.mutate(key, _increment) for _ in range(60) for s in stores
                                   for key in ("hot", "warm")))
            for key in ("hot", "warm"):
                value, _ = await fast["store"].get(key)
                assert value == {"n": 180}
        finally:
            await client.stop()
            await publisher.stop()
            await other.close()

    run(nats_server, scenario)


def test_mutate_fresh_creates_without_reading(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        store, gets = fast["store"], fast["gets"]
        assert await store.mutate("new", _increment, fresh=True) == {"n": 1}
        assert gets.reads == 0  # one create, no read
        # a wrong expectation: the key exists (written elsewhere): the create fails, the loop reads
        await fast["kv"].put("old", b'{"n": 41}')
        assert await store.mutate("old", _increment, fresh=True) == {"n": 42}
        assert gets.reads >= 1
        # a no-op answer on the (None, 0) guess is confirmed on fresh data, not taken as the value
        assert await store.mutate("old", lambda v: None, fresh=True) == {"n": 42}

    run(nats_server, scenario)


def test_a_resent_write_whose_first_attempt_landed_is_not_a_conflict(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        store, publisher = fast["store"], fast["publisher"]
        first = await store.create("k", {"n": 1})
        publisher.lose_acks = 1  # stored, but its PubAck is lost: resent, refused with wrong-last-sequence
        second = await store.update("k", {"n": 2}, first)
        assert publisher.lose_acks == 0
        assert await store.get("k") == ({"n": 2}, second)
        publisher.lose_acks = 1
        third = await store.mutate("k", _increment)
        assert third == {"n": 3}
        assert (await store.get("k"))[0] == {"n": 3}  # applied once

    run(nats_server, scenario, lossy=True)


def test_a_resent_write_that_never_landed_is_a_conflict_when_another_writer_won(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        store, publisher, kv = fast["store"], fast["publisher"], fast["kv"]
        first = await store.create("k", {"n": 1})
        publisher.lose_sends = 1
        pending = asyncio.ensure_future(store.update("k", {"n": 2}, first))
        await asyncio.sleep(0.05)
        await kv.update("k", b'{"n": 10}', last=first)  # another writer wins at that revision meanwhile
        with pytest.raises(Conflict):
            await pending

    run(nats_server, scenario, lossy=True)


def test_a_resent_write_is_unknown_when_the_key_moved_on(nats_server: EmbeddedServer) -> None:
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        store, publisher, kv = fast["store"], fast["publisher"], fast["kv"]
        first = await store.create("k", {"n": 1})
        publisher.lose_acks = 1
        pending = asyncio.ensure_future(store.update("k", {"n": 2}, first))
        await asyncio.sleep(0.05)
        await kv.put("k", b'{"n": 10}')  # the key moves on after our write: ours is no longer the last
        with pytest.raises(PublishTimeout, match="unknown"):
            await pending

    run(nats_server, scenario, lossy=True)


def test_provision_allows_direct_gets_on_a_bucket_created_without(make_config: Callable[..., App],
                                                                  private_server: EmbeddedServer) -> None:
    """A bucket as nats-py creates it (no allow_direct) is given it by ``jetpool provision``, and keeps its data."""
    app = make_config(url=private_server.url)
    app.raw["state"] = {"legacy": {"storage": "memory"}}
    app.path.write_text(yaml.safe_dump(app.raw, sort_keys=False))

    async def old_bucket() -> bool:
        nc = await nats.connect(app.url)
        try:
            kv = await nc.jetstream().create_key_value(api.KeyValueConfig(bucket="legacy",
                                                                          storage=api.StorageType.MEMORY))
            await kv.put("k", b'{"n": 1}')
            return bool((await nc.jetstream().stream_info("KV_legacy")).config.allow_direct)
        finally:
            await nc.close()

    assert asyncio.run(old_bucket()) is False
    result = run_cli(["provision", "-c", str(app.path)])
    assert result.returncode == 0, result.stderr

    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        legacy = (await open_buckets(nc.jetstream(), {"legacy": BucketConfig()}, create=False,
                                     fast=KVClient(nc, fast["publisher"])))["legacy"]
        assert isinstance(legacy, FastKV) and legacy.direct

    run(private_server, scenario)


async def _send_raw(url: str, subject: str, header_block: bytes) -> None:
    """Publish a message with a header block exactly as given (nats-py would refuse a malformed one)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
                 + f"HPUB {subject} {len(header_block)} {len(header_block)}\r\n".encode() + header_block
                 + b"\r\nPING\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"PONG")
    writer.close()


def test_a_reply_that_cannot_be_read_fails_its_direct_get_at_once(nats_server: EmbeddedServer) -> None:
    # A stored message's headers are whatever its writer sent: one that cannot be decoded must fail the
    # read that asked for it, not leave it waiting for an answer that was taken off the books.
    async def scenario(nc: Any, bucket: str, fast: dict[str, Any]) -> None:
        async def answer(msg: Any) -> None:
            await _send_raw(nats_server.url, msg.reply, b"NATS/1.0\r\nNats-Sequence: \xff\xfe\r\n\r\n")

        await nc.subscribe("$JS.API.DIRECT.GET.KV_NOBUCKET.>", cb=answer)
        with pytest.raises(BrokerError):
            await asyncio.wait_for(fast["gets"].last("KV_NOBUCKET", "$KV.NOBUCKET.k"), 3)

    run(nats_server, scenario)
