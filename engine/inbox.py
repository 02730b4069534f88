"""Inline delivery for the two hot subscriptions: the read loop runs the callback, no queue, no task hop.

nats-py hands each message of a subscription to an ``asyncio.Queue`` that a task of that subscription
drains, awaiting the callback before it takes the next message: per message a put, a get and, per
burst, a switch to that task. The pull inbox and the PubAck inbox carry every message a worker
handles, and their callbacks rarely wait for anything (a handler that computes and returns, an ack
written to the outgoing buffer), so jetpool runs them where the message is parsed: :func:`inline`
puts a :class:`_Sink` where the subscription's queue was, and the sink starts the callback at once
with :func:`engine.eager.start_here`. A callback that does suspend becomes a task and finishes later while
the next messages are handled — ordering between messages of one inbox was never relied on (each
delivery and each PubAck is matched by its own reply subject).

This leans on two private attributes of ``nats.aio.subscription.Subscription`` (``_pending_queue``,
``_pending_size``), as nats-py 2.x has them; :func:`inline` checks they exist and leaves the
subscription on nats-py's normal path when they do not (tests/integration/test_inbox.py fails then,
so a nats-py upgrade that changes them is noticed). Measured on the throughput benchmark: see the
README's benchmark section.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from engine import eager

log = structlog.get_logger("jetpool.inbox")

Callback = Callable[[Any], Coroutine[Any, Any, None]]


class _Sink:
    """Stands where a subscription's pending queue was: every message put in is handled at once."""

    __slots__ = ("_cb", "_name", "_sub", "_tasks")

    def __init__(self, sub: Any, cb: Callback, name: str) -> None:
        self._sub = sub
        self._cb = cb
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def put_nowait(self, msg: Any) -> None:
        self._sub._pending_size -= len(msg.data)  # nats-py added it; nothing stays pending here
        try:
            task = eager.start_here(self._cb(msg))
        except Exception as exc:  # must never reach nats-py's read loop
            self._failed(exc)
            return
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())

    def _failed(self, exc: BaseException | None) -> None:
        # What nats-py does with a callback's exception (its error callback logs it), said once here.
        log.error("inbox.callback_failed", inbox=self._name, error=repr(exc))

    # What nats-py may still ask of a subscription's queue (drain, unsubscribe, stats).

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def task_done(self) -> None:
        return None

    async def get(self) -> Any:
        """Where the subscription's own task waits: nothing ever arrives here; unsubscribe cancels it."""
        await asyncio.get_running_loop().create_future()

    async def join(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def inline(sub: Any, cb: Callback, name: str) -> bool:
    """Deliver ``sub``'s messages to ``cb`` inline from now on; False if this nats-py cannot (then unchanged).

    ``sub`` must have been created with ``cb`` as its callback: the messages nats-py already queued
    (none, when called right after ``subscribe``) are still delivered by its own task.
    """
    if not (hasattr(sub, "_pending_queue") and hasattr(sub, "_pending_size")):
        log.warning("inbox.inline_unavailable", inbox=name, reason="nats-py internals changed")
        return False
    sub._pending_queue = _Sink(sub, cb, name)
    return True


def is_inline(sub: Any) -> bool:
    return isinstance(getattr(sub, "_pending_queue", None), _Sink)
