"""Handler state in JetStream key-value buckets, behind a small interface handlers can use.

Handlers never hold a NATS object; they reach state through ``ctx.state("stock")``. The store is
shared by every worker and replica and survives restarts. Concurrent writers are made safe by
compare-and-set on the key's revision: :meth:`StateStore.mutate` reads, applies a pure function and
writes back only if nobody wrote in between, retrying on conflict. :class:`MemoryState` has the same
semantics in memory, for unit tests of handlers.

Two stores over JetStream: :class:`KVState` over nats-py's ``KeyValue`` (a request per operation
through nats-py's request plumbing), and :class:`engine.kv.FastKV`, what workers use, which reads by
direct gets on one inbox and writes through the engine's windowed publisher. Both keep the revision
cache of :class:`RevisionCache`.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError

from engine.errors import JetpoolError

Value = dict[str, Any]
Mutation = Callable[[Value | None], Value | None]


class Conflict(JetpoolError):
    """Another writer changed the key since it was read (compare-and-set failed)."""


class StateStore(Protocol):
    """A key-value store with revisions. Values are JSON objects."""

    async def get(self, key: str) -> tuple[Value | None, int]:
        """The value (None if absent) and its revision (0 if absent)."""
        ...

    async def create(self, key: str, value: Value) -> int:
        """Write only if the key does not exist; raise Conflict otherwise."""
        ...

    async def update(self, key: str, value: Value, revision: int) -> int:
        """Write only if the key is still at ``revision``; raise Conflict otherwise."""
        ...

    async def put(self, key: str, value: Value) -> int:
        """Write unconditionally (last writer wins)."""
        ...

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50, *, fresh: bool = False) -> Value | None:
        """Read-modify-write with compare-and-set, retried on conflict. ``fn`` returning None writes nothing.

        ``fresh``: the caller expects the key not to exist yet: try a create first instead of reading
        (a wrong expectation costs one failed create, then the loop reads as usual).
        """
        ...


async def mutate_with_cas(store: StateStore, key: str, fn: Mutation, attempts: int = 50,
                          known: tuple[Value | None, int] | None = None, *, fresh: bool = False) -> Value | None:
    """The compare-and-set loop shared by every store.

    ``known`` is a (value, revision) the caller believes current (what it last wrote): the first
    attempt tries it without reading. Compare-and-set keeps that safe — a stale guess fails and the
    loop reads — and a no-op answer from ``fn`` on a guess is confirmed on fresh data. ``fresh``
    without ``known`` guesses (None, 0): the key does not exist yet.
    """
    if fresh and known is None:
        known = (None, 0)
    for attempt in range(attempts):
        guessed = known is not None
        current, revision = known if known is not None else await store.get(key)
        known = None
        new = fn(current)
        if new is None:
            if guessed:
                continue  # only a freshly read value may justify doing nothing
            return current
        try:
            if revision == 0:
                await store.create(key, new)
            else:
                await store.update(key, new, revision)
            return new
        except Conflict:
            # Back off a little so hot keys under many writers converge instead of live-locking.
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
    raise Conflict(f"key {key!r}: still conflicting after {attempts} attempts")


class RevisionCache(ABC):
    """A StateStore that remembers the last value and revision it read or wrote for up to ``remember`` keys.

    So a read-modify-write of a key this process touched last costs one request (the compare-and-set)
    instead of two; with many writers a stale guess just fails and is read again.
    """

    def __init__(self, remember: int = 4096) -> None:
        self._limit = remember
        self._known: OrderedDict[str, tuple[bytes, int]] = OrderedDict()

    def _note(self, key: str, raw: bytes, revision: int) -> None:
        self._known[key] = (raw, revision)
        self._known.move_to_end(key)
        if len(self._known) > self._limit:
            self._known.popitem(last=False)

    @abstractmethod
    async def get(self, key: str) -> tuple[Value | None, int]: ...

    @abstractmethod
    async def create(self, key: str, value: Value) -> int: ...

    @abstractmethod
    async def update(self, key: str, value: Value, revision: int) -> int: ...

    @abstractmethod
    async def put(self, key: str, value: Value) -> int: ...

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50, *, fresh: bool = False) -> Value | None:
        known = self._known.get(key)  # what this process last saw beats the caller's expectation
        guess = (orjson.loads(known[0]), known[1]) if known is not None else None
        return await mutate_with_cas(self, key, fn, attempts, known=guess, fresh=fresh)


class KVState(RevisionCache):
    """A StateStore over a nats-py ``KeyValue`` (one nats-py request per operation), with the revision cache."""

    def __init__(self, kv: Any, remember: int = 4096) -> None:
        super().__init__(remember)
        self._kv = kv

    async def get(self, key: str) -> tuple[Value | None, int]:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:  # also raised for deleted keys
            self._known.pop(key, None)
            return None, 0
        revision = int(entry.revision or 0)
        if entry.value:
            self._note(key, entry.value, revision)
        return (orjson.loads(entry.value) if entry.value else None), revision

    async def create(self, key: str, value: Value) -> int:
        raw = orjson.dumps(value)
        try:
            revision = int(await self._kv.create(key, raw))
        except KeyWrongLastSequenceError:
            self._known.pop(key, None)
            raise Conflict(f"key {key!r} already exists") from None
        self._note(key, raw, revision)
        return revision

    async def update(self, key: str, value: Value, revision: int) -> int:
        raw = orjson.dumps(value)
        try:
            new_revision = int(await self._kv.update(key, raw, last=revision))
        except KeyWrongLastSequenceError:
            self._known.pop(key, None)
            raise Conflict(f"key {key!r} changed since revision {revision}") from None
        self._note(key, raw, new_revision)
        return new_revision

    async def put(self, key: str, value: Value) -> int:
        raw = orjson.dumps(value)
        revision = int(await self._kv.put(key, raw))
        self._note(key, raw, revision)
        return revision


class MemoryState:
    """An in-memory StateStore with the same revision semantics, for unit tests."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[Value, int]] = {}
        self._revision = 0

    async def get(self, key: str) -> tuple[Value | None, int]:
        value, revision = self.data.get(key, (None, 0))
        return (orjson.loads(orjson.dumps(value)) if value is not None else None), revision

    async def create(self, key: str, value: Value) -> int:
        if key in self.data:
            raise Conflict(f"key {key!r} already exists")
        return self._write(key, value)

    async def update(self, key: str, value: Value, revision: int) -> int:
        if self.data.get(key, (None, 0))[1] != revision:
            raise Conflict(f"key {key!r} changed since revision {revision}")
        return self._write(key, value)

    async def put(self, key: str, value: Value) -> int:
        return self._write(key, value)

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50, *, fresh: bool = False) -> Value | None:
        return await mutate_with_cas(self, key, fn, attempts, fresh=fresh)

    def _write(self, key: str, value: Value) -> int:
        self._revision += 1
        self.data[key] = (orjson.loads(orjson.dumps(value)), self._revision)
        return self._revision


class FastStores(Protocol):
    """Opens a bucket as a faster store than :class:`KVState` (engine.kv.KVClient, a worker's)."""

    async def store(self, js: Any, bucket: str, kv: Any) -> StateStore: ...


def direct_gets_for(replicas: int) -> bool:
    """Whether a bucket of ``replicas`` allows direct gets: only with one replica.

    On a replicated stream every replica answers direct gets, including one that has not applied the
    last write yet; a read after a write could then miss it (a record created a moment ago reads as
    absent). Replicated buckets are read from their leader instead (``STREAM.MSG.GET``).
    """
    return replicas == 1


def key_value_config(name: str, cfg: Any) -> api.KeyValueConfig:
    """How a configured bucket is created: with direct gets allowed when it has one replica."""
    return api.KeyValueConfig(bucket=name, history=cfg.history, direct=direct_gets_for(cfg.replicas),
                              replicas=cfg.replicas,
                              storage=api.StorageType.FILE if cfg.storage == "file" else api.StorageType.MEMORY)


async def open_buckets(js: Any, buckets: dict[str, Any], create: bool,
                       fast: FastStores | None = None) -> dict[str, StateStore]:
    """Open (and with ``create``, create) the configured buckets as state stores.

    Created buckets of one replica allow direct gets. With ``fast``, each bucket is opened as ``fast`` makes it;
    otherwise as a :class:`KVState`.
    """
    stores: dict[str, StateStore] = {}
    for name, cfg in buckets.items():
        try:
            kv = await js.key_value(name)
        except BucketNotFoundError:
            if not create:
                raise JetpoolError(f"state bucket {name!r} does not exist: run 'jetpool provision'") from None
            kv = await js.create_key_value(key_value_config(name, cfg))
        stores[name] = await fast.store(js, name, kv) if fast is not None else KVState(kv)
    return stores
