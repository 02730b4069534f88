"""No-op handlers for the throughput benchmark: the engine's own cost, nothing else."""

from __future__ import annotations

from engine import Context, Event


async def process(event: Event, ctx: Context) -> Event:
    """The process loop: one output per input."""
    return Event(type="BenchOut", data=event.data, aggregate_id=event.aggregate_id)


async def consume(event: Event, ctx: Context) -> None:
    """Consume-only: nothing to publish."""
    return None
