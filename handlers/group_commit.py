"""Group commit: callers that write one item each, one database round trip for all that gathered.

A caller queues its item and waits for its own result. One writer task at a time takes everything
queued while the previous write ran and writes it with one call, so under load a commit carries many
items, and alone an item is written at once (no timer, no added latency). If the group's write fails
on one item's data (``alone`` says which errors are such), each item of it is written alone, so that
item fails its own caller and not its group; any other error (a lost connection, a timeout) fails the
whole group at once, since writing each item alone would only wait that much longer.

Used by the audit store (rows of events) and the gateway's ledger (charges).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Miscounted(Exception):
    """A group's write returned another number of results than it had items."""


class GroupCommit(Generic[T, R]):
    """Queue items and write each group that gathered with one call of ``write``.

    Args:
        write: stores a list of items all or none, and returns one result per item, in their order.
        max_group: the most items one call gets (a bound on one statement's size).
        alone: whether a group that failed with this error is written again item by item (default: any).
    """

    def __init__(self, write: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_group: int = 1000,
                 alone: Callable[[Exception], bool] = lambda exc: True) -> None:
        self._write = write
        self._max_group = max_group
        self._alone = alone
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
        group: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                group, self._queue = self._queue[:self._max_group], self._queue[self._max_group:]
                await self._write_group(group)
        finally:  # the writer cancelled (its loop is closing): nobody may wait for it forever
            for _, done in [*group, *self._queue]:
                if not done.done():
                    done.cancel()

    async def _write_group(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._write([item for item, _ in group])
            if len(results) != len(group):
                raise Miscounted(f"a group write returned {len(results)} results for {len(group)} items")
        except Exception as exc:
            if isinstance(exc, Miscounted) or self._alone(exc):
                for item, done in group:
                    await self._write_one(item, done)
                return
            for _, done in group:
                if not done.done():
                    done.set_exception(exc)
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
