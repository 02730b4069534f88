"""Handlers for the failure-semantics tests (imported by engine subprocesses via PYTHONPATH).

Behaviour is driven by the event's data, the delivery attempt or a control file a test writes, never
by timing alone.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from engine import Context, Event, Reject, Retry


def _pong(event: Event) -> Event:
    return Event(type="Pong", data=event.data, aggregate_id=event.aggregate_id)


async def poison_aware(event: Event, ctx: Context) -> Event:
    """Raise for events marked ``poison``, reject ``reject``, kill the worker for ``kill``; else Pong."""
    if event.data.get("poison"):
        raise RuntimeError(f"poison event {event.id}")
    if event.data.get("reject"):
        raise Reject("card number is not valid")
    if event.data.get("kill"):
        os._exit(9)  # the worker dies mid-handler, every time
    if event.data.get("retry_once") and ctx.attempt == 1:
        raise Retry(0.2, "dependency asked us to come back")
    if event.data.get("hang"):
        await asyncio.sleep(3600)
    await asyncio.sleep(float(event.data.get("sleep_s", 0)))
    return _pong(event)


async def _dependency(control: Path) -> str:
    """A stand-in for an external service: down while the control file exists."""
    await asyncio.sleep(0.002)
    if control.exists():
        raise ConnectionError("dependency unavailable")
    return "ok"


async def through_breaker(event: Event, ctx: Context) -> Event:
    """Call the dependency through the ``dependency`` breaker; Pong on success."""
    control = Path(str(ctx.settings["control_file"]))
    await ctx.breaker("dependency").call(_dependency, control)
    return _pong(event)


NEXT_HOP = {"Start": "Mid", "Mid": "End"}


async def chain(event: Event, ctx: Context) -> Event | None:
    """Start → Mid → End: three services passing one flow along (for trace propagation)."""
    following = NEXT_HOP.get(event.type)
    return Event(type=following, data=event.data, aggregate_id=event.aggregate_id) if following else None


async def fails_early_or_through_breaker(event: Event, ctx: Context) -> Event:
    """Like :func:`through_breaker`, but fails before reaching the breaker while ``<control>.early`` exists."""
    control = Path(str(ctx.settings["control_file"]))
    if control.with_suffix(".early").exists():
        raise RuntimeError("failed before calling the dependency")
    await ctx.breaker("dependency").call(_dependency, control)
    return _pong(event)
