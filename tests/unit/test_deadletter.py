"""DeadLetters.write: the entry it publishes, and when it asks the first-failure bucket."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from engine import deadletter
from engine.deadletter import DeadLetters, H
from engine.errors import MalformedEvent
from engine.events import MSG_ID_HEADER
from engine.outcome import Action, Outcome, RetryPolicy, decide

REPLY = "$JS.ACK.SHOP.payments.{attempt}.1834.1834.1700000000000000000.0"
FIRST = "2026-11-24T08:30:49.222Z"


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.sent.append((subject, payload, headers))


class Failures:
    """The first-failure bucket, holding one earlier failure of every message."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get(self, key: str) -> tuple[Any, int]:
        self.asked.append(key)
        return {"first": FIRST}, 1


CONFIG: Any = SimpleNamespace(dead_letter=SimpleNamespace(subject_prefix="dlq"),
                              services={"payments": SimpleNamespace(routes={"OrderPlaced": "x"})})


def write(attempt: int, outcome: Outcome) -> tuple[Publisher, Failures]:
    publisher, failures = Publisher(), Failures()
    msg = SimpleNamespace(reply=REPLY.format(attempt=attempt), subject="shop.OrderPlaced", data=b"\x00 not json",
                          headers={MSG_ID_HEADER: "m-1"})
    letters = DeadLetters(CONFIG, publisher, failures)  # type: ignore[arg-type]
    asyncio.run(letters.write(msg, None, outcome, attempt, "payments"))
    return publisher, failures


def test_bad_input_on_its_first_delivery_is_written_without_asking_the_bucket() -> None:
    outcome = decide(MalformedEvent("body is not JSON"), 1, 10, RetryPolicy())
    publisher, failures = write(1, outcome)
    assert failures.asked == []  # this failure is the first one: nothing earlier can be stored
    [(subject, body, headers)] = publisher.sent
    assert (subject, body) == ("dlq.payments", b"\x00 not json")
    assert headers[MSG_ID_HEADER] == "dlq.payments.SHOP.1834"
    assert (headers[H + "Error-Type"], headers[H + "Error"]) == ("MalformedEvent", "body is not JSON")
    assert (headers[H + "Attempts"], headers[H + "Stream-Seq"]) == ("1", "1834")
    assert headers[H + "First-Failure"] == headers[H + "Last-Failure"]
    assert headers[H + "Original-Msg-Id"] == "m-1"


def test_a_later_attempt_takes_the_first_failure_time_from_the_bucket() -> None:
    outcome = Outcome(Action.TERM, reason="RuntimeError: gateway exploded", dead_letter=True)
    publisher, failures = write(10, outcome)
    assert failures.asked == ["payments.SHOP.1834"]
    [(_, _, headers)] = publisher.sent
    assert headers[H + "First-Failure"] == FIRST
    assert headers[H + "Attempts"] == "10"


def test_a_bucket_that_could_not_be_opened_is_tried_again_later_not_never(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that started while the bucket's leader was being elected gets it back once it is there."""
    failures = Failures()
    tries: list[int] = []

    async def reopen() -> Failures | None:
        tries.append(len(tries))
        return failures if len(tries) > 1 else None  # unavailable once more, then back

    later = Outcome(Action.TERM, reason="RuntimeError: gateway exploded", dead_letter=True)
    msg = SimpleNamespace(reply=REPLY.format(attempt=3), subject="shop.OrderPlaced", data=b"{}", headers={})

    async def failing_three_times(letters: DeadLetters) -> None:
        for _ in range(3):
            await letters.write(msg, None, later, 3, "payments")

    letters = DeadLetters(CONFIG, Publisher(), None, reopen)  # type: ignore[arg-type]
    asyncio.run(failing_three_times(letters))
    assert tries == [] and failures.asked == []  # within _REOPEN_S of start-up: not asked again yet

    monkeypatch.setattr(deadletter, "_REOPEN_S", 0.0)
    letters = DeadLetters(CONFIG, Publisher(), None, reopen)  # type: ignore[arg-type]
    asyncio.run(failing_three_times(letters))
    assert tries == [0, 1]  # still unavailable, then opened, then kept
    assert failures.asked == ["payments.SHOP.1834"] * 2
