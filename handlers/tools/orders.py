"""A run's orders: what to send (:class:`Plan`), the orders and their stock (:class:`Orders`), how one ended.

Every run uses fresh skus (a run id prefix) and fresh order ids, so runs never disturb each other's checks.
Orders placed through the order API are named by their ``Idempotency-Key`` (``<run id>-<n>``): the API
derives the order id and the ``OrderPlaced`` event id from it (:func:`handlers.api.orders_input.derived_ids`),
and so does :meth:`Orders.make`, so the same orders go to the API or, with ``--direct``, straight to the
stream. The ids are hashes, so the checks match a run's orders by their ids, never by a prefix.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.errors import JetpoolError
from engine.events import Event, trace_id_of
from handlers.api.orders_input import derived_ids
from handlers.saga import ORDER_PLACED

KINDS = ("confirmed", "declined", "out_of_stock")



@dataclass(frozen=True)
class Plan:
    """What to send.

    Attributes:
        orders: how many orders.
        rate: orders per second offered (0: as fast as the broker takes them).
        skus: how many products; a tenth of them (at least one) get too little stock on purpose.
        failure_rate: gateway failure rate during the run (None: as configured).
        outage: (start_s, duration_s) of a gateway outage, from the first order.
        stall_s: give up waiting when no order ended for this long.
        seed: random seed for the orders.
        concurrency: requests to the order API in flight at most (placing through the API).
    """

    orders: int = 2000
    rate: float = 150.0
    skus: int = 20
    failure_rate: float | None = None
    outage: tuple[float, float] | None = None
    stall_s: float = 60.0
    seed: int | None = None
    concurrency: int = 64


def parse_outage(text: str) -> tuple[float, float]:
    """``START:DURATION`` in seconds, e.g. ``3:5``."""
    start, sep, duration = text.partition(":")
    try:
        window = (float(start), float(duration))
    except ValueError:
        window = (-1.0, -1.0)
    if not sep or window[0] < 0 or window[1] <= 0:
        raise JetpoolError(f"--outage: expected START:DURATION in seconds (e.g. 3:5), got {text!r}")
    return window



@dataclass
class Orders:
    """This run's orders and stock.

    Attributes:
        keys: order id -> the ``Idempotency-Key`` that places it through the API (keyed runs only).
    """

    run_id: str
    events: list[Event]
    stock: dict[str, int]
    keys: dict[str, str] = field(default_factory=dict)
    by_id: dict[str, Event] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {e.aggregate_id: e for e in self.events}

    @classmethod
    def make(cls, plan: Plan, keyed: bool = False) -> Orders:
        """``plan.orders`` orders over fresh skus; ``keyed``: named by idempotency keys as the API names them,
        else ``<run id>-<n>`` (chaos, whose checks read the run's orders by that prefix)."""
        rng = random.Random(plan.seed)
        run_id = uuid.uuid4().hex[:8]
        skus = [f"{run_id}-sku-{k:02d}" for k in range(max(1, plan.skus))]
        events, keys = [], {}
        for n in range(plan.orders):
            key = f"{run_id}-{n:06d}"
            order_id, event_id = derived_ids(key) if keyed else (key, "")
            if keyed:
                keys[order_id] = key
            event = Event(type=ORDER_PLACED, aggregate_id=order_id, data={
                "order_id": order_id, "customer_id": f"c-{rng.randint(1, 500)}", "sku": rng.choice(skus),
                "qty": rng.randint(1, 3), "amount_cents": rng.randint(500, 25_000)})
            if keyed:  # the ids the API gives the order placed under this key
                event.id, event.trace_id = event_id, trace_id_of(event_id)
            events.append(event)
        demand = Counter[str]()
        for e in events:
            demand[e.data["sku"]] += e.data["qty"]
        scarce = max(1, len(skus) // 10)
        stock = {sku: int(demand[sku] * (0.5 if k < scarce else 1.5)) + 1 for k, sku in enumerate(skus)}
        return cls(run_id, events, stock, keys)

    def line(self, order_id: str) -> dict[str, Any]:
        """The order's OrderPlaced data (sku, qty, amount_cents...)."""
        return self.by_id[order_id].data



def kind_of(confirmed: bool, reason: str) -> str:
    """How an order ended: confirmed, declined (its payment) or out_of_stock (charged, then refunded)."""
    if confirmed:
        return "confirmed"
    return "declined" if reason.startswith("payment declined") else "out_of_stock"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]
