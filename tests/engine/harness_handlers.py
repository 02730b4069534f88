"""A user's handler module, as the harness tests route to it (``tests.engine.harness_handlers:<function>``)."""

from __future__ import annotations

from engine import Context, Event, Reject


async def pong(event: Event, ctx: Context) -> Event:
    """Answer a Ping with a Pong carrying the same data."""
    return Event("Pong", event.data, aggregate_id=event.aggregate_id)


async def shout(event: Event, ctx: Context) -> Event:
    """Answer a Ping with a Pong whose text is upper-cased (a second app's different behaviour)."""
    return Event("Pong", {"text": str(event.data.get("text", "")).upper()}, aggregate_id=event.aggregate_id)


async def refuse(event: Event, ctx: Context) -> None:
    """Refuse every Ping: never retried, dead-lettered with the reason."""
    raise Reject(f"ping {event.data.get('n')} is not welcome")


async def flaky(event: Event, ctx: Context) -> Event:
    """Fail the first delivery (retried with the service's backoff); answer on the next one."""
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return Event("Pong", {**event.data, "attempt": ctx.attempt})


async def count(event: Event, ctx: Context) -> Event:
    """Count Pings in the ``counts`` bucket and say how many there were."""
    value = await ctx.state("counts").mutate("pings", lambda v: {"n": (v or {"n": 0})["n"] + 1})
    assert value is not None
    return Event("Counted", {"n": value["n"]})
