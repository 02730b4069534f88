"""Circuit breakers (pybreaker) that handlers call their external dependencies through.

pybreaker keeps the state machine (closed → open after ``fail_max`` consecutive failures → half-open
after ``reset_timeout_s`` → closed after a successful trial); its ``call_async`` needs Tornado, so
:meth:`Breaker.call` drives an ``async`` call through pybreaker's ``calling()`` context instead.

When a call is refused because the breaker is open, the handler sees :class:`BreakerOpen`. The
consumer treats that as *not the event's fault*: it parks the delivery (keeps it in flight, telling
the server it is in progress) and stops pulling for the service until the breaker lets a trial
through, so queued events wait in the stream instead of burning delivery attempts into the DLQ.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pybreaker
import structlog

from engine.errors import JetpoolError

T = TypeVar("T")
log = structlog.get_logger("jetpool.breaker")


class BreakerOpen(JetpoolError):
    """A call was refused because its circuit breaker is open; retry after ``retry_in_s``."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; next trial in {retry_in_s:.1f}s")
        self.name = name
        self.retry_in_s = retry_in_s


class Breaker:
    """One named breaker, shared by the handlers of a worker process.

    Args:
        name: the breaker's name from the YAML (e.g. ``payment_gateway``).
        fail_max: consecutive failures that open it.
        reset_timeout_s: how long it stays open before a half-open trial.
    """

    def __init__(self, name: str, fail_max: int = 5, reset_timeout_s: float = 30.0) -> None:
        self.name = name
        self.reset_timeout_s = reset_timeout_s
        self._cb = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_timeout_s, name=name)
        self._opened_at = 0.0
        self._cb.add_listener(_OpenedAt(self))

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return str(self._cb.current_state)

    @property
    def is_open(self) -> bool:
        """Open and not yet due for a trial: callers would be refused."""
        return self.state == pybreaker.STATE_OPEN and self.retry_in_s > 0

    @property
    def retry_in_s(self) -> float:
        """Seconds until the open breaker allows a trial call (0 when closed or due)."""
        if self.state != pybreaker.STATE_OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout_s - time.monotonic())

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` under the breaker; raise BreakerOpen when refused."""
        try:
            with self._cb.calling():
                return await fn(*args, **kwargs)
        except pybreaker.CircuitBreakerError:
            # Refused while open, or the failure that tripped it: either way the breaker is open now,
            # so the event waits (is parked) instead of spending a delivery attempt.
            raise BreakerOpen(self.name, self.retry_in_s or self.reset_timeout_s) from None


class _OpenedAt(pybreaker.CircuitBreakerListener):
    """Remembers when the breaker opened, on the monotonic clock, for ``retry_in_s``."""

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        name = new_state.name if new_state is not None else None
        previous = getattr(old_state, "name", None)
        if name == pybreaker.STATE_OPEN:
            self._breaker._opened_at = time.monotonic()
        if name != previous:
            log.warning(f"breaker.{str(name).replace('-', '_')}", breaker=self._breaker.name, previous=previous)


def build_breakers(configs: dict[str, Any], names: list[str]) -> dict[str, Breaker]:
    """The breakers a service declares, built from the top-level ``breakers`` config."""
    return {name: Breaker(name, configs[name].fail_max, configs[name].reset_timeout_s) for name in names}
