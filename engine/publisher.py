"""Windowed JetStream publishing: many publishes in flight, one PubAck subscription.

``js.publish`` in nats-py is a request per message (a new inbox future and a round-trip wait each
time). Here every publish carries a reply subject ``<inbox>.<n>`` under one wildcard subscription,
so publishes pipeline on the socket and PubAcks are matched to their waiter as they arrive.

A waiter is any object with ``async def on_puback(error: Exception | None)``: the consumer's
in-flight delivery (which acks its input once the last output is stored — no task or future per
message) or a :class:`FutureWaiter` for callers that simply ``await``. A sweeper fails waiters whose
PubAck is late, so a publish lost in a broker restart surfaces as :class:`PublishTimeout` instead of
hanging; the input is then nakked and its outputs re-published under the same ``Nats-Msg-Id``,
which JetStream deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from engine.errors import PublishError, PublishTimeout
from engine.events import Event

STATUS_HEADER = "Status"
_SWEEP_INTERVAL_S = 0.25


class Waiter(Protocol):
    async def on_puback(self, error: Exception | None) -> None: ...


class FutureWaiter:
    """Collects the PubAcks of a group of publishes into one future (for callers that await)."""

    __slots__ = ("error", "future", "remaining")

    def __init__(self, count: int) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.remaining = count
        self.error: Exception | None = None

    async def on_puback(self, error: Exception | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            if self.error is not None:
                self.future.set_exception(self.error)
            else:
                self.future.set_result(None)


class Publisher:
    """Publishes to JetStream and tells a waiter about each PubAck.

    Args:
        nc: a connected ``nats.aio.client.Client``.
        subject_prefix: events are published on ``<subject_prefix>.<type>``.
        timeout_s: how long a PubAck may take before the publish counts as failed.
    """

    def __init__(self, nc: Any, subject_prefix: str, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._prefix = subject_prefix + "."
        self._timeout_s = timeout_s
        self._inbox = nc.new_inbox() + "."
        self._seq = 0
        # reply subject -> (waiter, deadline); insertion order is deadline order.
        self._pending: dict[str, tuple[Waiter, float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def pending(self) -> int:
        """Publishes waiting for their PubAck."""
        return len(self._pending)

    def subject_for(self, event_type: str) -> str:
        return self._prefix + event_type

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox + "*", cb=self._on_puback, pending_msgs_limit=0,
                                             pending_bytes_limit=0)
        self._sweeper = self._loop.create_task(self._sweep())

    async def stop(self) -> None:
        """Stop sweeping and fail whatever still waits (the connection is about to close)."""
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        pending, self._pending = self._pending, {}
        for waiter, _ in pending.values():
            await waiter.on_puback(PublishError("publisher stopped before the PubAck arrived"))

    async def send(self, subject: str, payload: bytes, headers: dict[str, str] | None, waiter: Waiter) -> None:
        """Publish one message; ``waiter.on_puback`` is called once with its outcome."""
        self._seq += 1
        reply = self._inbox + str(self._seq)
        self._pending[reply] = (waiter, self._loop.time() + self._timeout_s)
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
        except Exception as exc:
            del self._pending[reply]
            raise PublishError(f"publish to {subject} failed: {exc!r}") from exc

    async def send_events(self, events: Sequence[Event], waiter: Waiter) -> None:
        """Publish events in order; the waiter hears one PubAck (or failure) per event."""
        prefix = self._prefix
        for event in events:
            await self.send(prefix + event.type, event.encode(), event.headers(), waiter)

    async def publish_events(self, events: Sequence[Event]) -> None:
        """Publish events and wait until every one is stored; raise on the first failure."""
        if not events:
            return
        waiter = FutureWaiter(len(events))
        await self.send_events(events, waiter)
        await waiter.future

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish one message and wait until it is stored."""
        waiter = FutureWaiter(1)
        await self.send(subject, payload, headers, waiter)
        await waiter.future

    async def _on_puback(self, msg: Any) -> None:
        entry = self._pending.pop(msg.subject, None)
        if entry is not None:
            await entry[0].on_puback(_puback_error(msg))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = self._loop.time()
            expired = []
            for reply, (_, deadline) in self._pending.items():
                if deadline > now:
                    break
                expired.append(reply)
            for reply in expired:
                entry = self._pending.pop(reply, None)
                if entry is not None:
                    await entry[0].on_puback(PublishTimeout(f"no PubAck within {self._timeout_s}s"))


def _puback_error(msg: Any) -> Exception | None:
    """None for a stored message, else the reason the stream did not store it."""
    if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
        return PublishError("no stream captures this subject (503 no responders)")
    try:
        reply = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return PublishError(f"unreadable PubAck: {msg.data[:200]!r}")
    error = reply.get("error")
    if error:
        return PublishError(f"stream refused the message: {error.get('description')} "
                            f"(err_code {error.get('err_code')})")
    return None
