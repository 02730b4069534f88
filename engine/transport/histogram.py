"""Pre-bucketed observations added to a prometheus-client Histogram in one go.

A worker tallies handler durations per bucket in a plain list and adds them to the shared histogram
once per housekeeping tick (:class:`engine.metrics.RouteMetrics`). prometheus-client has no public
"observe many"; its Histogram keeps one value per bucket (non-cumulative, ``amount <= bound``, the same
rule as ``bisect_left`` over the bounds) in ``_buckets`` and a sum in ``_sum``, so :func:`add` increments
those: one locked write per non-empty bucket, where ``observe`` takes two per value.

The fence (:mod:`engine.transport.fence`) decides on the first :func:`add` of the process, with the
real histogram in hand (a probe histogram would be exported by the multiprocess files): with a
supported prometheus-client that has those names, the fast write; otherwise
``jetpool_fast_path{path="histogram"}`` reads 0 and each tallied value is replayed through
``observe`` (:func:`observe_many`), with the same bucket counts, count and sum.
tests/engine/unit/test_metrics.py checks the fast write equals ``observe`` per value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from engine.transport.fence import enable

_fast: bool | None = None  # decided on the first add()


def missing(child: Any, bounds: Sequence[float]) -> list[str]:
    """The prometheus-client names :func:`add` writes through that a labelled ``child`` lacks."""
    buckets, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
    absent = []
    if not (isinstance(buckets, list) and len(buckets) == len(bounds) and all(hasattr(b, "inc") for b in buckets)):
        absent.append(f"Histogram._buckets (one value per bound, {len(bounds)})")
    if not hasattr(total, "inc"):
        absent.append("Histogram._sum")
    return absent


def add(child: Any, bounds: Sequence[float], counts: Sequence[int], total: float) -> None:
    """Add ``counts[i]`` observations to bucket ``i`` (upper bound ``bounds[i]``) and ``total`` to the sum.

    Args:
        child: a labelled ``prometheus_client.Histogram`` whose bucket bounds are ``bounds``.
        bounds: the histogram's upper bounds, ``+Inf`` last.
        counts: observations per bucket (not cumulative).
        total: the sum of those observations.
    """
    global _fast
    if _fast is None:
        _fast = enable("histogram", missing(child, bounds))
    if not _fast:
        observe_many(child, bounds, counts, total)
        return
    for i, n in enumerate(counts):
        if n:
            child._buckets[i].inc(n)
    child._sum.inc(total)


def observe_many(child: Any, bounds: Sequence[float], counts: Sequence[int], total: float) -> None:
    """The public-API fallback of :func:`add`: ``observe`` per observation, values that land in the same
    buckets and add up to ``total`` (the individual durations were not kept, only their buckets and sum)."""
    for value, n in zip(representatives(bounds, counts, total), counts, strict=True):
        for _ in range(n):
            child.observe(value)


def representatives(bounds: Sequence[float], counts: Sequence[int], total: float) -> list[float]:
    """One value per bucket, inside it, such that ``sum(value * count)`` is ``total`` (as far as floats allow).

    Every value starts at its bucket's lowest member; what ``total`` has beyond that goes to the
    highest non-empty bucket first (the +Inf bucket takes any amount), each bucket up to its bound.
    """
    values = [0.0 if i == 0 else math.nextafter(bounds[i - 1], math.inf) for i in range(len(bounds))]
    excess = total - sum(v * n for v, n in zip(values, counts, strict=True))
    for i in reversed(range(len(bounds))):
        if excess <= 0:
            break
        if counts[i]:
            step = min(excess / counts[i], bounds[i] - values[i])
            values[i] += step
            excess -= step * counts[i]
    return values
