"""Inline delivery for the two hot subscriptions: the read loop runs the callback on a lean message.

nats-py turns every message into a ``Msg`` (subject and reply decoded, every header line parsed into a
dict) and hands it to an ``asyncio.Queue`` that a task of the subscription drains, awaiting the
callback before it takes the next message. The pull inbox and the PubAck inbox carry every message a
worker handles, and the engine reads the headers of almost none of them (a delivery's only matter for
tracing or a dead letter; a PubAck has none unless it is a 503), so for those two subscriptions
:func:`inline` routes the messages straight from the protocol parser to the callback, as a
:class:`Message` whose headers are parsed on first use, and starts the callback at once with
:func:`engine.eager.start_here`. A callback that does suspend becomes a task and finishes later while
the next messages are handled — ordering between messages of one inbox was never relied on (each
delivery and each PubAck is matched by its own reply subject).

This leans on nats-py's internals: ``Client._process_msg(sid, subject, reply, data, headers)`` (what
its parser calls for each message), ``Client._process_headers``, ``Client._subs`` and
``Subscription._id``, as nats-py 2.16 has them. :func:`inline` asks the fence
(:mod:`engine.transport.fence`: a supported nats-py with those names) and otherwise leaves the
subscription on nats-py's normal path, with ``jetpool_fast_path{path="inbox"}`` at 0;
tests/engine/integration/test_inbox.py fails then, so an upgrade that changes them is noticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from engine import eager
from engine.transport.fence import enable

log = structlog.get_logger("jetpool.inbox")

Callback = Callable[[Any], Coroutine[Any, Any, None]]
_NEEDS_CLIENT = ("_process_msg", "_process_headers", "_subs", "stats")


class Message:
    """A message of an inline inbox: what nats-py's ``Msg`` offers the engine, headers parsed when read."""

    __slots__ = ("_headers", "_inbox", "_raw", "data", "reply", "subject")

    def __init__(self, inbox: _Inline, subject: str, reply: str, data: bytes, raw_headers: bytes | None) -> None:
        self._inbox = inbox
        self.subject = subject
        self.reply = reply
        self.data = data
        self._raw = raw_headers
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        if self._raw is not None:
            self._headers, self._raw = self._inbox.parse_headers(self._raw), None
        return self._headers

    @property
    def raw_headers(self) -> bytes | None:
        """The header block as it came (``NATS/1.0...``); None when there was none or it was parsed already."""
        return self._raw

    def header(self, name: str) -> str | None:
        """One header's value; without parsing anything when the raw block does not mention it."""
        if self._raw is not None:
            encoded = _ENCODED.get(name) or _ENCODED.setdefault(name, name.encode())
            if encoded not in self._raw:
                return None
        return (self.headers or {}).get(name)


_ENCODED: dict[str, bytes] = {}  # header names as bytes, encoded once


def header(msg: Any, name: str) -> str | None:
    """A header of a message from either path (a :class:`Message` or nats-py's ``Msg``)."""
    if type(msg) is Message:
        return msg.header(name)
    return (msg.headers or {}).get(name)


class _Inline:
    """One connection's inline subscriptions: sid -> callback; every other sid goes to nats-py as before."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._routes: dict[int, tuple[Callback, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._original = nc._process_msg
        nc._process_msg = self._process_msg

    def add(self, sid: int, cb: Callback, name: str) -> None:
        self._routes[sid] = (cb, name)

    def has(self, sid: int) -> bool:
        return sid in self._routes

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        route = self._routes.get(sid)
        if route is None:
            await self._original(sid, subject, reply, data, headers)
            return
        nc = self._nc
        sub = nc._subs.get(sid)
        if sub is None:  # unsubscribed: nats-py drops what still arrives for it
            del self._routes[sid]
            return
        sub._received += 1
        stats = nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        cb, name = route
        try:
            task = eager.start_here(cb(Message(self, subject.decode(), reply.decode(), data, headers or None)))
        except Exception as exc:  # must never reach nats-py's read loop
            _failed(name, exc)
            return
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._done(name))

    def _done(self, name: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                _failed(name, task.exception())
        return done

    def parse_headers(self, raw: bytes) -> dict[str, str] | None:
        """nats-py's own header parsing (a coroutine that never waits), run to completion here."""
        coro = self._nc._process_headers(raw)
        try:
            coro.send(None)
        except StopIteration as stop:
            parsed: dict[str, str] | None = stop.value
            return parsed
        coro.close()
        raise RuntimeError("nats-py's header parsing suspended")


def _failed(name: str, exc: BaseException | None) -> None:
    # What nats-py does with a callback's exception (its error callback logs it), said once here.
    log.error("inbox.callback_failed", inbox=name, error=repr(exc))


def missing(nc: Any, sub: Any = None) -> list[str]:
    """The nats-py names inline delivery needs that ``nc`` (and ``sub``, when given) lack."""
    absent = [f"Client.{name}" for name in _NEEDS_CLIENT if not hasattr(nc, name)]
    if sub is not None and not hasattr(sub, "_id"):
        absent.append("Subscription._id")
    return absent


def available(nc: Any) -> bool:
    """Whether the fence lets ``nc``'s subscriptions be delivered inline (checked once per connection)."""
    return enable("inbox", missing(nc))


def inline(nc: Any, sub: Any, cb: Callback, name: str) -> bool:
    """Deliver ``sub``'s messages to ``cb`` inline from now on; False if the fence says no (then unchanged).

    Call it right after ``nc.subscribe(..., cb=cb)``, before anything can arrive for ``sub``.
    """
    if not enable("inbox", missing(nc, sub)):
        return False
    dispatch = nc.__dict__.get("_jetpool_inline")
    if dispatch is None:
        dispatch = nc._jetpool_inline = _Inline(nc)
    dispatch.add(sub._id, cb, name)
    return True


def is_inline(nc: Any, sub: Any) -> bool:
    dispatch = getattr(nc, "_jetpool_inline", None)
    return isinstance(dispatch, _Inline) and dispatch.has(sub._id)
