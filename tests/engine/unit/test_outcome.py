"""The ack / nak / term rules of engine.outcome.decide."""

from __future__ import annotations

import asyncio

import pytest

from engine.breaker import BreakerOpen
from engine.errors import HandlerTimeout, MalformedEvent, NoRoute, PayloadTooLarge, PublishTimeout, Reject, Retry
from engine.outcome import (
    CANCEL,
    IN_PROGRESS,
    PARKED,
    RELEASED,
    Action,
    RetryPolicy,
    arrived,
    decide,
    describe,
    redelivery_horizon_s,
    sweep,
    unstored,
)

POLICY = RetryPolicy(base_s=0.5, max_s=30.0, jitter=False)


def test_success_is_acked() -> None:
    outcome = decide(None, attempt=1, max_deliver=5, policy=POLICY)
    assert outcome.action is Action.ACK
    assert outcome.label == "ack"
    assert not outcome.dead_letter


def test_retry_naks_with_the_requested_delay() -> None:
    outcome = decide(Retry(2.5, "bank busy"), attempt=4, max_deliver=5, policy=POLICY)
    assert (outcome.action, outcome.delay_s, outcome.reason) == (Action.NAK, 2.5, "bank busy")
    assert outcome.label == "retry"


def test_retry_on_the_last_attempt_dead_letters() -> None:
    # The server would not redeliver after max_deliver: a nak here would strand the event.
    outcome = decide(Retry(2.5, "bank busy"), attempt=5, max_deliver=5, policy=POLICY)
    assert (outcome.action, outcome.dead_letter, outcome.reason) == (Action.TERM, True, "retries exhausted: bank busy")


def test_explicit_delay_list_repeats_its_last_entry() -> None:
    policy = RetryPolicy(delays_s=(0.1, 1.0, 5.0))
    assert [policy.delay_s(a) for a in (1, 2, 3, 4, 9)] == [0.1, 1.0, 5.0, 5.0, 5.0]


@pytest.mark.parametrize("exc", [Reject("card stolen"), MalformedEvent("body is not JSON"), NoRoute("no route")])
def test_permanent_failures_are_termed_and_dead_lettered_at_once(exc: Exception) -> None:
    outcome = decide(exc, attempt=1, max_deliver=5, policy=POLICY)
    assert outcome.action is Action.TERM
    assert outcome.dead_letter
    assert outcome.label == "dead_letter"
    assert outcome.reason == f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), HandlerTimeout("slow"), PublishTimeout("no PubAck")])
def test_other_failures_are_nakked_with_backoff_until_the_last_attempt(exc: Exception) -> None:
    delays = [decide(exc, attempt=a, max_deliver=5, policy=POLICY) for a in range(1, 5)]
    assert all(o.action is Action.NAK and not o.dead_letter for o in delays)
    assert [o.delay_s for o in delays] == [0.5, 1.0, 2.0, 4.0]
    last = decide(exc, attempt=5, max_deliver=5, policy=POLICY)
    assert last.action is Action.TERM and last.dead_letter
    assert decide(exc, attempt=6, max_deliver=5, policy=POLICY).action is Action.TERM


def test_backoff_is_capped_and_jitter_stays_within_half_to_full_ceiling() -> None:
    assert RetryPolicy(base_s=1, max_s=5, jitter=False).delay_s(10) == 5
    jittered = RetryPolicy(base_s=1, max_s=30, jitter=True)
    for attempt in range(1, 8):
        ceiling = min(30, 2 ** (attempt - 1))
        for _ in range(50):
            assert ceiling / 2 <= jittered.delay_s(attempt) <= ceiling


def test_describe() -> None:
    assert describe(ValueError("bad amount")) == "ValueError: bad amount"
    assert describe(KeyError()) == "KeyError"


def test_the_redelivery_horizon_takes_the_longer_end_of_each_attempt() -> None:
    # The defaults: every attempt's worst end is its ack wait (30 s > 10 s + backoff up to 4 s).
    assert redelivery_horizon_s(5, 30.0, 10.0, POLICY) == 4 * 30.0
    # Backoff outgrows the ack wait: 10 + (0.5, 1, 2, 4, 8, 16, 30, 30) against 20.
    assert redelivery_horizon_s(9, 20.0, 10.0, POLICY) == 20 * 5 + 26 + 40 + 40
    # Jitter only ever shortens a delay, so the horizon uses the nominal one.
    assert redelivery_horizon_s(3, 1.0, 1.0, RetryPolicy(delays_s=(5.0,))) == 12.0
    assert redelivery_horizon_s(1, 30.0, 10.0, POLICY) == 0.0  # one delivery: nothing is redelivered


# ---- everything else the consumer settles -----------------------------------------------------------


def test_a_drain_cancelling_a_handler_releases_its_message_but_a_timeout_is_a_failure() -> None:
    cancelled = asyncio.CancelledError()
    assert decide(cancelled, 1, 5, POLICY) is RELEASED
    assert RELEASED.action is Action.RELEASE and RELEASED.label == "released"
    timed_out = decide(cancelled, 1, 5, POLICY, timed_out_after_s=10.0)
    assert (timed_out.action, timed_out.delay_s, timed_out.reason) == (
        Action.NAK, 0.5, "HandlerTimeout: handler ran longer than 10.0s")
    assert decide(cancelled, 5, 5, POLICY, timed_out_after_s=10.0).dead_letter


def test_an_open_breaker_parks_the_delivery_except_while_draining() -> None:
    refused = BreakerOpen("gateway", 3.0)
    assert decide(refused, 1, 5, POLICY) is PARKED and PARKED.label == "parked"
    assert decide(refused, 5, 5, POLICY) is PARKED  # parking burns no attempt, even the last
    assert decide(refused, 1, 5, POLICY, stopping=True) is RELEASED


def test_a_delivery_arriving_during_a_drain_is_released_unstarted() -> None:
    assert arrived(stopping=True) is RELEASED
    assert arrived(stopping=False) is None


def test_a_dead_letter_that_could_not_be_stored_keeps_the_message_with_backoff() -> None:
    wanted = decide(Reject("card stolen"), 3, 5, POLICY)
    kept = unstored(wanted, 3, POLICY)
    assert (kept.action, kept.delay_s, kept.dead_letter, kept.reason) == (Action.NAK, 2.0, False, wanted.reason)


def test_an_output_too_large_to_send_dead_letters_its_input_at_once() -> None:
    outcome = decide(PayloadTooLarge("1048700 bytes"), 1, 5, POLICY)
    assert outcome.action is Action.TERM and outcome.dead_letter and outcome.label == "dead_letter"


@pytest.mark.parametrize(("running_s", "since_progress_s", "cancellable", "due"), [
    (11.0, 11.0, True, CANCEL),  # past its timeout: cancelled (a failure, see decide)
    (11.0, 11.0, False, IN_PROGRESS),  # outputs waiting for PubAcks, or parked: never cancelled, kept alive
    (5.0, 10.5, True, IN_PROGRESS),  # slow but within its timeout: the server hears it is in progress
    (5.0, 9.5, True, None),
])
def test_the_sweep_cancels_overdue_handlers_and_keeps_slow_deliveries_alive(
        running_s: float, since_progress_s: float, cancellable: bool, due: object) -> None:
    assert sweep(running_s, since_progress_s, handler_timeout_s=10.0, ack_wait_s=30.0, cancellable=cancellable) == due
