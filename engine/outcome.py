"""What happens to a delivered message: the only place the ack / nak / term rules live.

The consumer asks :func:`decide` once per message with the exception the processing raised (or
``None``) and the delivery attempt, and applies the answer. Rules:

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
===========================================  ==============================================

JetStream's consumer ``BackOff`` applies only to ack timeouts, not to naks, so the nak delay is
computed here.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from engine.errors import MalformedEvent, NoRoute, PayloadTooLarge, Reject, Retry


class Action(enum.Enum):
    ACK = "ack"
    NAK = "nak"
    TERM = "term"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one delivery."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""
    dead_letter: bool = False

    @property
    def label(self) -> str:
        """A metrics/log label: ack, retry, dead_letter."""
        if self.action is Action.ACK:
            return "ack"
        return "dead_letter" if self.dead_letter else "retry"


ACKED = Outcome(Action.ACK)


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


def decide(exc: BaseException | None, attempt: int, max_deliver: int, policy: RetryPolicy) -> Outcome:
    """Map the result of processing one delivery to ack, nak(delay) or term(+dead letter).

    Args:
        exc: what processing raised, or None when the handler returned and outputs were stored.
        attempt: this delivery's number, starting at 1 (JetStream's ``num_delivered``).
        max_deliver: the service's max_deliver; the last attempt's failure dead-letters.
        policy: the service's backoff for generic failures.
    """
    if exc is None:
        return ACKED
    if isinstance(exc, Retry):
        if attempt >= max_deliver:
            return Outcome(Action.TERM, reason=f"retries exhausted: {exc.reason}", dead_letter=True)
        return Outcome(Action.NAK, delay_s=exc.delay_s, reason=exc.reason)
    if isinstance(exc, Reject | MalformedEvent | NoRoute | PayloadTooLarge):
        return Outcome(Action.TERM, reason=describe(exc), dead_letter=True)
    if attempt >= max_deliver:
        return Outcome(Action.TERM, reason=describe(exc), dead_letter=True)
    return Outcome(Action.NAK, delay_s=policy.delay_s(attempt), reason=describe(exc))


def describe(exc: BaseException) -> str:
    """``ErrorType: message`` — what an operator reads in the dead-letter entry."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
