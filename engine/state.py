"""Handler state in JetStream key-value buckets, behind a small interface handlers can use.

Handlers never hold a NATS object; they reach state through ``ctx.state("stock")``. The store is
shared by every worker and replica and survives restarts. Concurrent writers are made safe by
compare-and-set on the key's revision: :meth:`StateStore.mutate` reads, applies a pure function and
writes back only if nobody wrote in between, retrying on conflict. :class:`MemoryState` has the same
semantics in memory, for unit tests of handlers.
"""

from __future__ import annotations

import asyncio
import random
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

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50) -> Value | None:
        """Read-modify-write with compare-and-set, retried on conflict. ``fn`` returning None writes nothing."""
        ...


async def mutate_with_cas(store: StateStore, key: str, fn: Mutation, attempts: int = 50,
                          known: tuple[Value | None, int] | None = None) -> Value | None:
    """The compare-and-set loop shared by every store.

    ``known`` is a (value, revision) the caller believes current (what it last wrote): the first
    attempt tries it without reading. Compare-and-set keeps that safe — a stale guess fails and the
    loop reads — and a no-op answer from ``fn`` on a guess is confirmed on fresh data.
    """
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


class KVState:
    """A StateStore over a JetStream key-value bucket.

    It remembers the last value and revision it read or wrote for up to ``remember`` keys, so a
    read-modify-write of a key this process touched last costs one request (the compare-and-set)
    instead of two; with many writers a stale guess just fails and is read again.
    """

    def __init__(self, kv: Any, remember: int = 4096) -> None:
        self._kv = kv
        self._limit = remember
        self._known: OrderedDict[str, tuple[bytes, int]] = OrderedDict()

    def _note(self, key: str, raw: bytes, revision: int) -> None:
        self._known[key] = (raw, revision)
        self._known.move_to_end(key)
        if len(self._known) > self._limit:
            self._known.popitem(last=False)

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

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50) -> Value | None:
        known = self._known.get(key)
        guess = (orjson.loads(known[0]), known[1]) if known is not None else None
        return await mutate_with_cas(self, key, fn, attempts, known=guess)


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

    async def mutate(self, key: str, fn: Mutation, attempts: int = 50) -> Value | None:
        return await mutate_with_cas(self, key, fn, attempts)

    def _write(self, key: str, value: Value) -> int:
        self._revision += 1
        self.data[key] = (orjson.loads(orjson.dumps(value)), self._revision)
        return self._revision


async def open_buckets(js: Any, buckets: dict[str, Any], create: bool) -> dict[str, StateStore]:
    """Open (and with ``create``, create) the configured buckets as state stores."""
    stores: dict[str, StateStore] = {}
    for name, cfg in buckets.items():
        try:
            kv = await js.key_value(name)
        except BucketNotFoundError:
            if not create:
                raise JetpoolError(f"state bucket {name!r} does not exist: run 'jetpool provision'") from None
            kv = await js.create_key_value(api.KeyValueConfig(
                bucket=name, history=cfg.history,
                storage=api.StorageType.FILE if cfg.storage == "file" else api.StorageType.MEMORY,
                replicas=cfg.replicas))
        stores[name] = KVState(kv)
    return stores
