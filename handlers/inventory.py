"""Inventory: reserve an order's stock with compare-and-set, never overselling, each order at most once.

State in the ``stock`` bucket:

- ``sku.<sku>``: ``{"available": n, "reserved": r, "pending": {order_id: {"token", "qty"}}}``; every
  change is a compare-and-set on the key's revision, so replicas reserving the same sku concurrently
  serialise on the server and ``available`` never goes below zero;
- ``reservation.<order_id>``: the decision for the order (``reserved`` | ``out_of_stock``), created
  once; its creation is the point where a decision becomes final.

The sku key and the reservation key cannot be written in one transaction, so a reservation takes
three steps, each safe to repeat:

1. *claim* — on the sku, take the quantity and note the order under ``pending`` with a token unique
   to this attempt (a redelivery after a crash finds the note and does not take the stock again);
2. *decide* — create the reservation record carrying the token of the claim it confirms. Only one
   creation wins; a concurrent duplicate that lost (and so may have taken stock too) sees a record
   with another token;
3. *settle* — on the sku, drop the pending note, or give the stock back if the note's token is not
   the winning one.

A redelivered event whose reservation exists skips straight to settle, so a crash at any point
leaves no stock taken twice. Within one process, the changes to one sku are merged
(:mod:`engine.merge`): the claims and settles of every order waiting on it go into one
compare-and-set, so a busy sku costs a write per round, not two per order, and the compare-and-set
retries only compete with other processes.

An order costs, on its first delivery: the claim and the settle (shared with the sku's other orders
of that round; an order out of stock has nothing to settle) and the decision's creation.
"""

from __future__ import annotations

from collections.abc import Callable

from engine import Context, Event
from engine.events import new_id
from engine.merge import merged
from engine.state import Conflict, StateStore, Value
from handlers.saga import OUT_OF_STOCK, STOCK_RESERVED, Order

RESERVED, OUT = "reserved", "out_of_stock"


def sku_key(sku: str) -> str:
    return f"sku.{sku}"


def reservation_key(order_id: str) -> str:
    return f"reservation.{order_id}"


async def reserve(event: Event, ctx: Context) -> Event:
    """PaymentAuthorized → StockReserved | OutOfStock."""
    order = Order.from_event(event)
    stock = ctx.state("stock")
    first = ctx.attempt == 1
    # A first delivery goes straight to the claim: a duplicate of a decided order (a re-publish that
    # JetStream did not deduplicate) loses the decision's creation and gives its claim back, so the
    # read that would have spared it that is only worth it where earlier attempts may have run.
    record = None if first else (await stock.get(reservation_key(order.order_id)))[0]
    token = ""
    if record is None:
        token = await _claim(stock, order)
        record = await _decide(stock, order, token)
    if token or not first:  # only a claim (this one, or an earlier attempt's) leaves a note to settle
        await _settle(stock, order, record)
    if record["status"] == RESERVED:
        return order.event(STOCK_RESERVED)
    return order.event(OUT_OF_STOCK)


async def seed(stock: StateStore, levels: dict[str, int]) -> None:
    """Set the available stock of each sku (a fresh sku, or a top-up of an existing one)."""
    for sku, available in levels.items():
        await stock.mutate(sku_key(sku), _set_available(available))


def _set_available(available: int) -> Callable[[Value | None], Value | None]:
    def set_level(current: Value | None) -> Value:
        current = current or {"available": 0, "reserved": 0, "pending": {}}
        return {**current, "available": available}

    return set_level


async def _claim(stock: StateStore, order: Order) -> str:
    """Take the order's quantity if available; return the claim's token ("" when out of stock)."""
    token = new_id()
    claimed = ""

    def take(current: Value | None) -> Value | None:
        nonlocal claimed
        current = current or {"available": 0, "reserved": 0, "pending": {}}
        held = current["pending"].get(order.order_id)
        if held is not None:  # an earlier attempt claimed and did not get to decide
            claimed = held["token"]
            return None
        if current["available"] < order.qty:
            claimed = ""
            return None
        claimed = token
        pending = {**current["pending"], order.order_id: {"token": token, "qty": order.qty}}
        return {**current, "available": current["available"] - order.qty,
                "reserved": current["reserved"] + order.qty, "pending": pending}

    await merged(stock).mutate(sku_key(order.sku), take)
    return claimed


async def _decide(stock: StateStore, order: Order, token: str) -> Value:
    """Create the reservation record; if a duplicate created it first, return that one."""
    record = {"status": RESERVED if token else OUT, "token": token, "sku": order.sku, "qty": order.qty}
    try:
        await stock.create(reservation_key(order.order_id), record)
        return record
    except Conflict:
        existing, _ = await stock.get(reservation_key(order.order_id))
        if existing is None:  # a replica behind the create: taking ours for the winner would keep two claims
            raise Conflict(f"reservation of {order.order_id!r} exists but reads as absent: retry") from None
        return existing


async def _settle(stock: StateStore, order: Order, record: Value) -> None:
    """Drop the order's pending note; give its stock back unless the note is the reservation itself."""

    def settle(current: Value | None) -> Value | None:
        held = (current or {}).get("pending", {}).get(order.order_id)
        if current is None or held is None:
            return None
        pending = {k: v for k, v in current["pending"].items() if k != order.order_id}
        if record["status"] == RESERVED and held["token"] == record["token"]:
            return {**current, "pending": pending}
        return {**current, "available": current["available"] + held["qty"],
                "reserved": current["reserved"] - held["qty"], "pending": pending}

    await merged(stock).mutate(sku_key(order.sku), settle)
