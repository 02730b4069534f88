"""Credit and in-flight arithmetic of one pull consumer: pure, no I/O, unit-tested without a broker.

A worker asks the server for messages with pull requests and counts ``credit``: messages asked for
but not yet received. Its invariant is ``in_flight + credit <= max_in_flight``: nothing is fetched
that could not start at once, so no message waits in a local buffer while its ack wait runs out.
It pulls again whenever the free part of the window reaches half a batch, so messages keep flowing
while earlier ones are handled, in batches large enough to be cheap.

The server ends a pull request with a status: 408 (it expired), 409 (leader change, consumer
deleted, too many waiting requests...), each with ``Nats-Pending-Messages`` saying how many of its
messages will not come; 100 is an idle heartbeat (the request is alive). A request that died with
the connection, or whose heartbeats stopped, is written off entirely.
"""

from __future__ import annotations


class Window:
    """How much to ask for, and when.

    Args:
        max_in_flight: the most deliveries held at once (asked for or being handled).
        batch: the most messages asked for in one pull request.
    """

    __slots__ = ("batch", "credit", "size", "threshold")

    def __init__(self, max_in_flight: int, batch: int) -> None:
        self.size = max_in_flight
        self.batch = min(batch, max_in_flight)
        self.threshold = max(1, self.batch // 2)
        self.credit = 0

    def room(self, in_flight: int) -> bool:
        """True when at least half a batch is free: time to pull."""
        return self.size - in_flight - self.credit >= self.threshold

    def next_pull(self, in_flight: int) -> int:
        """The size of the next pull request (0: none now); counts it as asked for when non-zero."""
        # Deliveries for requests already written off (missed heartbeats) can push credit below zero.
        self.credit = max(self.credit, 0)
        want = self.size - in_flight - self.credit
        size = min(want, self.batch) if want >= self.threshold else 0
        self.credit += size
        return size

    def trial(self) -> int:
        """One message, if none is asked for: a breaker's trial call when nothing else is in flight."""
        if self.credit > 0:
            return 0
        self.credit = 1
        return 1

    def delivered(self) -> None:
        """One asked-for message arrived."""
        self.credit -= 1

    def ended(self, status: str | None, pending: str | None) -> None:
        """A pull request ended with ``status`` (408, 409 or another) and ``pending`` messages undelivered."""
        if status in ("408", "409") and pending is not None and pending.isdigit():
            self.credit = max(0, self.credit - int(pending))
        else:
            self.credit = 0

    def lost(self) -> None:
        """Every open request is gone (a reconnect, heartbeats that stopped): nothing more will come."""
        self.credit = 0
