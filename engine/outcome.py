"""What happens to a delivered message: the only place the settlement rules live.

The consumer asks :func:`decide` once per delivery with what processing raised (``None`` when the
handler returned and its outputs are stored), and applies the answer through its one settle path;
:func:`sweep` tells its housekeeping what a running delivery is due for. Rules:

===========================================  ==============================================
handler (and publishing its outputs) ...     message is ...
===========================================  ==============================================
returned                                     acked (after every output's PubAck)
raised ``Retry(delay_s)``                    nakked with that delay
raised ``Reject(reason)``                    termed and dead-lettered at once
body not an event / no route                 termed and dead-lettered at once
an output over the server's max_payload      termed and dead-lettered at once
raised anything else, or timed out           nakked with exponential backoff + jitter;
                                             dead-lettered and termed on the last attempt
was refused by an open circuit breaker       parked (kept in progress) until it closes;
                                             released while draining
was cancelled by a drain, or arrived         released: nakked without delay, so another
during one                                   worker takes it at once
dead letter could not be stored              nakked with backoff (kept, not lost)
still running, slow but within its limits    told in progress every ack_wait_s / 3
===========================================  ==============================================

JetStream's consumer ``BackOff`` applies only to ack timeouts, not to naks, so the nak delay is
computed here.
"""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass
from typing import Literal

from engine.breaker import BreakerOpen
from engine.errors import HandlerTimeout, MalformedEvent, NoRoute, PayloadTooLarge, Reject, Retry


class Action(enum.Enum):
    """What the consumer tells the server about a delivery."""

    ACK = "ack"
    NAK = "nak"  # with the outcome's delay
    TERM = "term"
    RELEASE = "release"  # a nak without delay: hand it back now
    PARK = "park"  # keep it (in progress) until a breaker lets it run again; nothing is sent yet
    PROGRESS = "progress"  # still working on it: reset the ack wait, settle later


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one delivery."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""
    dead_letter: bool = False

    @property
    def label(self) -> str:
        """A metrics/log label: ack, retry, dead_letter, released, parked, in_progress."""
        return _LABELS[self.action] if not self.dead_letter else "dead_letter"



_LABELS = {Action.ACK: "ack", Action.NAK: "retry", Action.TERM: "dead_letter", Action.RELEASE: "released",
           Action.PARK: "parked", Action.PROGRESS: "in_progress"}
ACKED = Outcome(Action.ACK)
RELEASED = Outcome(Action.RELEASE, reason="released by a drain")
PARKED = Outcome(Action.PARK)
IN_PROGRESS = Outcome(Action.PROGRESS)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Nak delays: an explicit list (the last entry repeats), or exponential backoff with jitter.

    The jitter is "equal jitter" (a uniform draw in the upper half of the window): it spreads the
    retries of many failing events so they do not hit a recovering dependency at once, yet never
    retries sooner than half the nominal delay.
    """

    base_s: float = 0.5
    max_s: float = 30.0
    delays_s: tuple[float, ...] = ()
    jitter: bool = True

    def delay_s(self, attempt: int) -> float:
        if self.delays_s:
            return self.delays_s[min(attempt, len(self.delays_s)) - 1]
        ceiling = min(self.max_s, self.base_s * 2 ** max(0, attempt - 1))
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling


def redelivery_horizon_s(max_deliver: int, ack_wait_s: float, handler_timeout_s: float, policy: RetryPolicy) -> float:
    """The longest time from an event's first delivery to its last, with no handler raising ``Retry``.

    Each attempt ends either unanswered (the worker died: redelivered after ``ack_wait_s``) or nakked
    (at most ``handler_timeout_s``, then the nominal backoff delay). Outputs re-published on the last
    attempt are dropped as duplicates only if the stream's duplicate window still covers the first.
    """
    nominal = RetryPolicy(policy.base_s, policy.max_s, policy.delays_s, jitter=False)
    return sum(max(ack_wait_s, handler_timeout_s + nominal.delay_s(attempt)) for attempt in range(1, max_deliver))


def decide(exc: BaseException | None, attempt: int, max_deliver: int, policy: RetryPolicy,
           stopping: bool = False, timed_out_after_s: float | None = None) -> Outcome:
    """Map the result of processing one delivery to what the consumer sends the server.

    Args:
        exc: what processing raised, or None when the handler returned and outputs were stored.
        attempt: this delivery's number, starting at 1 (JetStream's ``num_delivered``).
        max_deliver: the service's max_deliver; the last attempt's failure dead-letters.
        policy: the service's backoff for generic failures.
        stopping: the worker is draining.
        timed_out_after_s: set when the handler was cancelled for running past this many seconds
            (its ``handler_timeout_s``): the cancellation is then a failure, not a release.
    """
    if exc is None:
        return ACKED
    if isinstance(exc, asyncio.CancelledError):
        if timed_out_after_s is None:
            return RELEASED
        exc = HandlerTimeout(f"handler ran longer than {timed_out_after_s}s")
    if isinstance(exc, BreakerOpen):
        # A trial refused while draining has nothing here to resume it: hand it back.
        return RELEASED if stopping else PARKED
    if isinstance(exc, Retry):
        if attempt >= max_deliver:
            return Outcome(Action.TERM, reason=f"retries exhausted: {exc.reason}", dead_letter=True)
        return Outcome(Action.NAK, delay_s=exc.delay_s, reason=exc.reason)
    if isinstance(exc, Reject | MalformedEvent | NoRoute | PayloadTooLarge):
        return Outcome(Action.TERM, reason=describe(exc), dead_letter=True)
    if attempt >= max_deliver:
        return Outcome(Action.TERM, reason=describe(exc), dead_letter=True)
    return Outcome(Action.NAK, delay_s=policy.delay_s(attempt), reason=describe(exc))


def arrived(stopping: bool) -> Outcome | None:
    """A delivery that arrives while draining is released unstarted; otherwise it is handled (None)."""
    return RELEASED if stopping else None


def unstored(outcome: Outcome, attempt: int, policy: RetryPolicy) -> Outcome:
    """The dead letter ``outcome`` asked for could not be stored: keep the message (nak with backoff)."""
    return Outcome(Action.NAK, delay_s=policy.delay_s(attempt), reason=outcome.reason)


CANCEL: Literal["cancel"] = "cancel"


def sweep(running_s: float, since_progress_s: float, handler_timeout_s: float, ack_wait_s: float,
          cancellable: bool) -> Outcome | Literal["cancel"] | None:
    """What a delivery still in flight is due for at a housekeeping tick.

    Returns ``CANCEL`` when its handler (``cancellable``: still running) is past its timeout (the
    cancellation is then a failure: see ``timed_out_after_s`` of :func:`decide`), ``IN_PROGRESS``
    when the server should hear it is still being worked on (every ``ack_wait_s / 3``, so a slow but
    healthy handler, or outputs waiting for their PubAcks, is not redelivered elsewhere), else None.
    """
    if cancellable and running_s > handler_timeout_s:
        return CANCEL
    if since_progress_s > ack_wait_s / 3:
        return IN_PROGRESS
    return None


def describe(exc: BaseException) -> str:
    """``ErrorType: message`` — what an operator reads in the dead-letter entry."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
