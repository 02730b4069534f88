"""payments' ``charge`` with faults on order: the chaos shop routes OrderPlaced here (``jetpool chaos``).

The shop's own :func:`handlers.payments.charge`, unless the order carries a ``chaos`` marker:
``poison`` always raises (max_deliver attempts, then one dead-letter entry); ``hang`` hangs on the
first attempt (the engine cancels it at handler_timeout_s). Never routed by the shop's own YAML.
"""

from __future__ import annotations

import asyncio

import structlog

from engine import Context, Event
from handlers import payments

log = structlog.get_logger("jetpool.chaos")

MARKER = "chaos"


async def charge(event: Event, ctx: Context) -> Event:
    """The shop's ``charge``, except for orders marked ``poison`` (always raise) or ``hang`` (first attempt)."""
    marker = event.data.get(MARKER)
    if marker == "poison":
        raise RuntimeError(f"poison order {event.aggregate_id}: this handler always fails on it")
    if marker == "hang" and ctx.attempt == 1:
        log.warning("chaos.hang", event_id=event.id, order_id=event.aggregate_id)
        await asyncio.sleep(3600)
    return await payments.charge(event, ctx)
