"""Tiny handlers used by config/example.yaml and the engine's tests and benchmarks."""

from __future__ import annotations

from engine import Context, Event


async def echo(event: Event, ctx: Context) -> Event:
    """Answer every ``Ping`` with a ``Pong`` carrying the same data."""
    return Event(type="Pong", data=event.data, aggregate_id=event.aggregate_id)


async def sink(event: Event, ctx: Context) -> None:
    """Consume and publish nothing."""
    return None
