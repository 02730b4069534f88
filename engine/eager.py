"""Start a coroutine eagerly: run it until its first real suspension, and only then make it a task.

Python 3.12 has ``asyncio.eager_task_factory``; 3.11 does not. Most handlers in a throughput path
finish without ever waiting (they compute and return events), so creating an ``asyncio.Task`` for
each message costs more than the handler itself. :func:`start` runs the coroutine's first step
inline; if it completes, no task exists. If it suspends, a task continues it from where it stopped.

Asyncio's ``Task`` only ever resumes a coroutine with ``send(None)`` or ``throw(exc)`` — the value
of an awaited future is read by the future's own ``__await__`` — so handing a started coroutine to
a task that re-yields the pending future and then delegates with ``yield from`` is exactly what an
eager task does. Each coroutine runs all its steps in one ``contextvars.Context``, so context
variables set by a handler (trace spans, log context) behave as they would in a plain task.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


@types.coroutine
def _continue(coro: Coroutine[Any, Any, T], waiting: Any) -> Generator[Any, None, T]:
    while True:
        try:
            yield waiting  # the future the coroutine is blocked on; the task waits for it
        except BaseException as exc:  # cancellation (or any throw) goes into the coroutine
            try:
                waiting = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            continue
        return (yield from coro)  # type: ignore[no-any-return]


def start_here(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """Like :func:`start`, in the caller's context rather than a copy: for the engine's own callbacks,
    which set no context variables (handlers always get a context of their own through :func:`start`).

    Returns:
        None if the coroutine finished at once (its result is dropped), else the task continuing it.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_continue(coro, waiting))


def start(coro: Coroutine[Any, Any, T]) -> tuple[bool, T | None, asyncio.Task[T] | None]:
    """Run ``coro`` to its first suspension.

    Returns:
        ``(True, result, None)`` if it finished at once, else ``(False, None, task)`` with the
        task that continues it. An exception raised in the first step propagates to the caller.
    """
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration as stop:
        return True, stop.value, None
    task = asyncio.get_running_loop().create_task(_continue(coro, waiting), context=context)
    return False, None, task
