"""Handlers the engine's integration and fault tests route to (imported by engine subprocesses via PYTHONPATH).

Keep them tiny and deterministic: each behaviour a test relies on is driven by the delivery attempt
or by the event's data, never by timing or shared state across processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from engine import Context, Event


def _pong(event: Event) -> Event:
    return Event(type="Pong", data=event.data, aggregate_id=event.aggregate_id)


async def flaky(event: Event, ctx: Context) -> Event:
    """Fail the first delivery of every event, answer a Pong on any later one."""
    if ctx.attempt == 1:
        raise RuntimeError(f"first attempt of {event.id} fails on purpose")
    return _pong(event)


async def slow_echo(event: Event, ctx: Context) -> Event:
    """A Pong after ``data.sleep_s`` seconds (0 when absent), so drains have work in flight."""
    await asyncio.sleep(float(event.data.get("sleep_s", 0)))
    return _pong(event)


async def unstored_then_pong(event: Event, ctx: Context) -> list[Event]:
    """First delivery: a Pong plus an event no stream captures, so the publish fails and the input is
    nakked after its Pong was already stored. Later deliveries: the same Pong (same position, same id)
    and a Pang, which the stream does capture.
    """
    second = "Lost" if ctx.attempt == 1 else "Pang"
    return [_pong(event), Event(type=second, data={"attempt": ctx.attempt}, aggregate_id=event.aggregate_id)]


async def attempts(event: Event, ctx: Context) -> Event:
    """A Pong that records which delivery attempt produced it and in which process."""
    return Event(type="Pong", data={**event.data, "attempt": ctx.attempt, "pid": os.getpid()},
                 aggregate_id=event.aggregate_id)


async def die(event: Event, ctx: Context) -> None:
    """Kill the worker process on the spot (a poison message), exit code from ``data.code``."""
    os._exit(int(event.data.get("code", 9)))


async def blocking_sleep(event: Event, ctx: Context) -> Event:
    """Block the worker's event loop for ``data.sleep_s`` seconds: a handler no drain can interrupt."""
    time.sleep(float(event.data.get("sleep_s", 0)))
    return _pong(event)


class _Together:
    """This worker's handlers inside :func:`together` now, and the event set once enough were at once."""

    inside = 0
    all_in: asyncio.Event | None = None


async def together(event: Event, ctx: Context) -> Event:
    """A Pong only once ``data.together`` handlers of this worker are running at the same time.

    If a worker ran its handlers one after the other, the first would wait here alone and time out: the
    Pongs prove concurrency without measuring time.
    """
    if _Together.all_in is None:
        _Together.all_in = asyncio.Event()
    _Together.inside += 1
    try:
        if _Together.inside >= int(event.data["together"]):
            _Together.all_in.set()
        await asyncio.wait_for(_Together.all_in.wait(), 60)
    finally:  # a handler cancelled at its timeout (and redelivered) must not count twice
        _Together.inside -= 1
    return _pong(event)


async def gated_echo(event: Event, ctx: Context) -> Event:
    """A Pong once the file ``settings.gate`` is gone: the lag test holds a worker's window with it."""
    gate = Path(str(ctx.settings["gate"]))
    while gate.exists():
        await asyncio.sleep(0.05)
    return _pong(event)
