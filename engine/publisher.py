"""Windowed JetStream publishing: many publishes in flight, one PubAck subscription.

``js.publish`` in nats-py is a request per message (a new inbox future and a round-trip wait each
time). Here every publish carries a reply subject ``<inbox>.<n>`` under one wildcard subscription,
so publishes pipeline on the socket and PubAcks are matched to futures as they arrive. A sweeper
fails futures whose PubAck is late, so a publish lost in a broker restart surfaces as
:class:`PublishTimeout` instead of hanging; the caller's message is then nakked and redelivered,
and its outputs re-published under the same ``Nats-Msg-Id``, which JetStream deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import orjson

from engine.errors import PublishError, PublishTimeout
from engine.events import Event

STATUS_HEADER = "Status"
_SWEEP_INTERVAL_S = 0.25


class Publisher:
    """Publishes to JetStream and resolves a future per PubAck.

    Args:
        nc: a connected ``nats.aio.client.Client``.
        subject_prefix: events are published on ``<subject_prefix>.<type>``.
        timeout_s: how long a PubAck may take before the publish counts as failed.
    """

    def __init__(self, nc: Any, subject_prefix: str, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._prefix = subject_prefix + "."
        self._timeout_s = timeout_s
        self._inbox = nc.new_inbox()
        self._seq = 0
        # reply subject -> (future, deadline); insertion order is deadline order.
        self._pending: dict[str, tuple[asyncio.Future[int], float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Publishes waiting for their PubAck."""
        return len(self._pending)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_puback, pending_msgs_limit=0,
                                             pending_bytes_limit=0)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(PublishError("publisher stopped before the PubAck arrived"))
        self._pending.clear()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> asyncio.Future[int]:
        """Send one message; the returned future resolves to its stream sequence."""
        self._seq += 1
        reply = f"{self._inbox}.{self._seq}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending[reply] = (future, loop.time() + self._timeout_s)
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
        except Exception as exc:
            del self._pending[reply]
            raise PublishError(f"publish to {subject} failed: {exc!r}") from exc
        return future

    async def publish_events(self, events: Sequence[Event]) -> list[int]:
        """Publish events in order and wait for every PubAck; raise on the first failure."""
        futures = [await self.publish(self._prefix + e.type, e.encode(), e.headers()) for e in events]
        return [await f for f in futures]

    async def _on_puback(self, msg: Any) -> None:
        entry = self._pending.pop(msg.subject, None)
        if entry is None or entry[0].done():
            return  # late PubAck of a publish that already timed out
        future = entry[0]
        if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
            future.set_exception(PublishError("no stream captures this subject (503 no responders)"))
            return
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            future.set_exception(PublishError(f"unreadable PubAck: {msg.data[:200]!r}"))
            return
        error = reply.get("error")
        if error:
            future.set_exception(PublishError(
                f"stream refused the message: {error.get('description')} (err_code {error.get('err_code')})"))
        else:
            future.set_result(int(reply.get("seq", 0)))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = loop.time()
            expired = []
            for reply, (future, deadline) in self._pending.items():
                if deadline > now:
                    break
                expired.append(reply)
                if not future.done():
                    future.set_exception(PublishTimeout(f"no PubAck within {self._timeout_s}s"))
            for reply in expired:
                del self._pending[reply]
