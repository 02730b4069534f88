"""Group commit: callers that write one item each, one database round trip for all that gathered.

A caller queues its item and waits for its own result. One writer task at a time takes everything
queued while the previous write ran and writes it with one call, so under load a commit carries many
items, and alone an item is written at once (no timer, no added latency). If the group's write fails,
each item of it is written alone: one item the database refuses fails its own caller, not its group.

Used by the audit store (rows of events) and the gateway's ledger (charges).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Queue items and write each group that gathered with one call of ``write``.

    Args:
        write: stores a list of items all or none, and returns one result per item, in their order.
        max_group: the most items one call gets (a bound on one statement's size).
    """

    def __init__(self, write: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_group: int = 1000) -> None:
        self._write = write
        self._max_group = max_group
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Write ``item`` with whatever else is queued; its result once the write is done."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_queued())
        return await done

    async def _write_queued(self) -> None:
        while self._queue:
            group, self._queue = self._queue[:self._max_group], self._queue[self._max_group:]
            try:
                results = await self._write([item for item, _ in group])
                if len(results) != len(group):
                    raise RuntimeError(f"a group write returned {len(results)} results for {len(group)} items")
            except Exception:
                for item, done in group:
                    await self._write_one(item, done)
            else:
                for (_, done), result in zip(group, results, strict=True):
                    if not done.done():
                        done.set_result(result)

    async def _write_one(self, item: T, done: asyncio.Future[R]) -> None:
        try:
            (result,) = await self._write([item])
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(result)
