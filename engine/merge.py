"""Concurrent read-modify-writes of one key, merged into one compare-and-set.

A hot key (a product's stock, a counter) changed by many deliveries at once costs each of them a
compare-and-set, and within one process they would only conflict with each other. Through
:func:`merged`, the changes a process makes to one key take turns in *rounds*: while a round's write
is in flight, new changes queue, and the next round applies all of them, in arrival order, in a
single :meth:`StateStore.mutate <engine.state.StateStore.mutate>`. Under load a round carries many
changes; a lone change costs what it did before.

Each change is a pure function like those :meth:`~engine.state.StateStore.mutate` takes (it may be
called again when the compare-and-set conflicts with another process, always on fresh data). One
change raising fails only its caller: the round goes on without it. A failed write (the store's
error) fails every caller of that round, which then retry as they would have alone.

Rounds run in a task of their own, so a caller that is cancelled (a handler timeout) never stalls
the others; its change may still be written, which the change's own idempotence must allow (as it
must for a worker that dies after a write). A key's queue exists only while it has changes.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from engine.state import Mutation, StateStore, Value


class _Change:
    __slots__ = ("error", "fn", "future")

    def __init__(self, fn: Mutation, future: asyncio.Future[Value | None]) -> None:
        self.fn = fn
        self.future = future
        self.error: BaseException | None = None


class MergedWrites:
    """A store's changes per key, applied a round at a time (see the module's docstring)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._queues: dict[str, list[_Change]] = {}
        self._rounds: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Keys with changes queued or being written."""
        return len(self._queues)

    async def mutate(self, key: str, fn: Mutation) -> Value | None:
        """Apply ``fn`` to ``key`` in the next round; the key's value after that round (None if absent)."""
        future: asyncio.Future[Value | None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = queue = []
            task = asyncio.get_running_loop().create_task(self._run(key))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
        queue.append(_Change(fn, future))
        return await future

    async def _run(self, key: str) -> None:
        batch: list[_Change] = []
        try:
            while batch := self._queues[key]:
                self._queues[key] = []
                await self._round(key, batch)
        finally:  # cancelled (the worker stops): nobody may wait for a round that will not come
            self._fail([*batch, *self._queues.pop(key, [])], RuntimeError("merged writes stopped"))

    async def _round(self, key: str, batch: list[_Change]) -> None:
        def combined(current: Value | None) -> Value | None:
            value, changed = current, False
            for change in batch:
                change.error = None
                try:
                    new = change.fn(value)
                except Exception as exc:  # this caller's problem, not the round's
                    change.error = exc
                    continue
                if new is not None:
                    value, changed = new, True
            return value if changed else None

        try:
            result = await self._store.mutate(key, combined)
        except Exception as exc:
            self._fail(batch, exc)
            return
        for change in batch:
            if change.future.done():
                continue
            if change.error is not None:
                change.future.set_exception(change.error)
            else:
                change.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Change], exc: BaseException) -> None:
        for change in batch:
            if not change.future.done():
                change.future.set_exception(exc)


_merged: weakref.WeakKeyDictionary[Any, MergedWrites] = weakref.WeakKeyDictionary()


def merged(store: StateStore) -> MergedWrites:
    """The merged writes of ``store`` in this process (one per store, made on first use)."""
    writes = _merged.get(store)
    if writes is None:
        _merged[store] = writes = MergedWrites(store)
    return writes
