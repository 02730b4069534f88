"""Windowed JetStream publishing: many publishes in flight, one PubAck subscription.

``js.publish`` in nats-py is a request per message (a new inbox future and a round-trip wait each
time). Here every publish carries a reply subject ``<inbox>.<n>`` under one wildcard subscription,
so publishes pipeline on the socket and PubAcks are matched to their waiter as they arrive.

A waiter is any object with ``async def on_puback(error: Exception | None)``: the consumer's
in-flight delivery (which acks its input once the last output is stored — no task or future per
message) or a :class:`FutureWaiter` for callers that simply ``await``.

Transient failures are retried here, under the same ``Nats-Msg-Id`` (JetStream deduplicates, so a
retry can never store twice), with backoff, for up to ``retry_s``: a PubAck that does not come (the
broker restarted, the node died), a 503 for a subject a configured stream captures (a stream leader
election in a cluster), or a PubAck error with code 503. Spending delivery attempts of the input on
an election would dead-letter good events. Only after the budget, or on a permanent error (the
stream refused the message, no stream captures the subject), does the waiter hear of a failure.

:meth:`Publisher.store` is the awaitable form for writes that need their stream sequence (the fast
state path's compare-and-set writes, engine/kv.py): it returns the PubAck's ``seq`` and raises
:class:`Refused` (with the server's ``err_code`` and the number of attempts) when the stream said no.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

import orjson

from engine.config import subject_matches
from engine.errors import PayloadTooLarge, PublishError, PublishTimeout
from engine.events import Event
from engine.transport import inbox
from engine.transport.outbox import Outbox

STATUS_HEADER = "Status"
_SWEEP_INTERVAL_S = 0.25
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0


class _Pending:
    """One publish awaiting its PubAck, with what it takes to send it again."""

    __slots__ = ("ack", "deadline", "first_sent", "headers", "payload", "subject", "tries", "waiter")

    def __init__(self, waiter: Waiter, subject: str, payload: bytes, headers: dict[str, str] | None,
                 now: float, deadline: float) -> None:
        self.waiter = waiter
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.first_sent = now
        self.deadline = deadline
        self.tries = 1
        self.ack = b""  # the PubAck's body, once it came


class Refused(PublishError):
    """The stream answered a publish with an error: not stored. ``err_code`` is JetStream's (10071: wrong
    last sequence); ``attempts`` is how many times it was sent (more than 1: an earlier attempt's PubAck
    was lost or transient, so that attempt may have been stored)."""

    def __init__(self, text: str, code: int | None, err_code: int | None) -> None:
        super().__init__(text)
        self.code = code
        self.err_code = err_code
        self.attempts = 1


class _Transient(Exception):
    """A failure worth retrying under the same Nats-Msg-Id."""


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


class _StoreWaiter:
    """Waits for one publish's PubAck; its entry keeps the PubAck's body and the number of attempts."""

    __slots__ = ("entry", "future")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.entry: _Pending | None = None

    async def on_puback(self, error: Exception | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(None)
            return
        if isinstance(error, Refused) and self.entry is not None:
            error.attempts = self.entry.tries
        self.future.set_exception(error)


class Publisher:
    """Publishes to JetStream and tells a waiter about each PubAck.

    Args:
        nc: a connected ``nats.aio.client.Client``.
        subject_prefix: events are published on ``<subject_prefix>.<type>``.
        timeout_s: how long one PubAck may take before that attempt counts as lost.
        retry_s: how long transient failures are retried before the waiter hears of them.
        captured: subject patterns of the configured streams; a 503 for anything else is permanent
            (None: every 503 is treated as transient).
    """

    def __init__(self, nc: Any, subject_prefix: str, timeout_s: float = 10.0, retry_s: float = 30.0,
                 captured: Sequence[str] | None = None) -> None:
        self._nc = nc
        self._out = Outbox(nc)
        self._prefix = subject_prefix + "."
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._captured = list(captured) if captured is not None else None
        self._inbox: str = nc.new_inbox() + "."
        self._seq = 0
        # reply subject -> pending publish; insertion order is deadline order.
        self._pending: dict[str, _Pending] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def pending(self) -> int:
        """Publishes waiting for their PubAck."""
        return len(self._pending)

    @property
    def max_payload(self) -> int:
        """The largest message (body and headers) the connection's server accepts."""
        return self._out.max_payload

    def capture(self, pattern: str) -> None:
        """Count ``pattern``'s subjects as captured by a stream (a 503 for them is an election, retried)."""
        if self._captured is not None and pattern not in self._captured:
            self._captured.append(pattern)

    def subject_for(self, event_type: str) -> str:
        return self._prefix + event_type

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox + "*", cb=self._on_puback, pending_msgs_limit=0,
                                             pending_bytes_limit=0)
        inbox.inline(self._nc, self._sub, self._on_puback, "puback")
        self._sweeper = self._loop.create_task(self._sweep())

    async def stop(self) -> None:
        """Stop sweeping and fail whatever still waits (the connection is about to close)."""
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._retries):
            task.cancel()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            await entry.waiter.on_puback(PublishError("publisher stopped before the PubAck arrived"))

    async def send(self, subject: str, payload: bytes, headers: dict[str, str] | None, waiter: Waiter) -> None:
        """Publish one message; ``waiter.on_puback`` is called once with its outcome."""
        now = self._loop.time()
        await self._send(_Pending(waiter, subject, payload, headers, now, now + self._timeout_s))

    async def _send(self, entry: _Pending) -> None:
        """One attempt: a fresh reply subject with ``entry`` waiting on it, then the publish."""
        self._seq += 1
        reply = self._inbox + str(self._seq)
        self._pending[reply] = entry
        if self._out.write(entry.subject, entry.payload, reply, entry.headers):
            return
        try:
            await self._out.publish(entry.subject, entry.payload, reply=reply, headers=entry.headers)
        except PayloadTooLarge:
            del self._pending[reply]
            raise
        except Exception as exc:
            del self._pending[reply]
            raise PublishError(f"publish to {entry.subject} failed: {exc!r}") from exc

    async def send_events(self, events: Sequence[Event], waiter: Waiter) -> None:
        """Publish events in order; the waiter hears one PubAck (or failure) per event.

        The hot path of every handler output: one deadline for the batch, no ``send`` layer per event.
        """
        now = self._loop.time()
        deadline = now + self._timeout_s
        for event in events:
            await self._send(_Pending(waiter, self._prefix + event.type, event.encode(), event.headers(), now,
                                      deadline))

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

    async def store(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish one message, wait until it is stored and return its stream sequence.

        Transient failures are retried as for every publish. Raises :class:`Refused` when the stream
        said no (with how many attempts were sent), :class:`PublishError` or its subclasses otherwise.
        """
        waiter = _StoreWaiter()
        now = self._loop.time()
        entry = waiter.entry = _Pending(waiter, subject, payload, headers, now, now + self._timeout_s)
        await self._send(entry)
        await waiter.future
        try:
            return int(orjson.loads(entry.ack)["seq"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PublishError(f"PubAck without a sequence: {entry.ack[:200]!r}") from None

    async def _on_puback(self, msg: Any) -> None:
        entry = self._pending.pop(msg.subject, None)
        if entry is None:
            return  # a late PubAck of an attempt already retried or failed
        error = _puback_error(msg, entry.subject, self._captured)
        if isinstance(error, _Transient):
            self._retry_or_fail(entry, PublishError(str(error)))
        else:
            entry.ack = msg.data
            await entry.waiter.on_puback(error)

    def _retry_or_fail(self, entry: _Pending, error: Exception) -> None:
        """Send again after a backoff if the budget allows, else tell the waiter (from a task)."""
        delay = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (entry.tries - 1))
        if self._loop.time() + delay - entry.first_sent < self._retry_s:
            entry.tries += 1
            self._spawn(self._resend(entry, delay))
        else:
            self._spawn(entry.waiter.on_puback(error))

    async def _resend(self, entry: _Pending, delay: float) -> None:
        await asyncio.sleep(delay)
        entry.deadline = self._loop.time() + self._timeout_s
        try:
            await self._send(entry)
        except PublishError as exc:
            await entry.waiter.on_puback(exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Failure paths only (rare); keeps the PubAck subscription free while a waiter settles.
        task = self._loop.create_task(coro)
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = self._loop.time()
            expired = []
            for reply, entry in self._pending.items():
                if entry.deadline > now:
                    break
                expired.append(reply)
            for reply in expired:
                late = self._pending.pop(reply, None)
                if late is not None:
                    self._retry_or_fail(late, PublishTimeout(f"no PubAck within {self._timeout_s}s "
                                                             f"(tried {late.tries} times over {self._retry_s}s)"))


def _puback_error(msg: Any, subject: str, captured: Sequence[str] | None) -> Exception | None:
    """None for a stored message, a _Transient worth retrying, or the reason it was not stored.

    ``captured``: the subject patterns of the configured streams (None: treat every 503 as transient).
    """
    if msg.headers is None and b'"error"' not in msg.data:
        return None  # stored: the common case, told without parsing the PubAck
    if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
        if captured is None or any(subject_matches(pattern, subject) for pattern in captured):
            return _Transient("no stream leader answered (503 no responders: election or restart)")
        return PublishError("no stream captures this subject (503 no responders)")
    try:
        reply = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return PublishError(f"unreadable PubAck: {msg.data[:200]!r}")
    error = reply.get("error")
    if error:
        text = f"{error.get('description')} (code {error.get('code')}, err_code {error.get('err_code')})"
        if error.get("code") == 503:
            return _Transient(f"JetStream temporarily unavailable: {text}")
        return Refused(f"stream refused the message: {text}", error.get("code"), error.get("err_code"))
    return None
