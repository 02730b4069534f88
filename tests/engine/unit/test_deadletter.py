"""DeadLetters.write: the entry it publishes, and when it asks the first-failure bucket."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js import api

from engine import deadletter
from engine.deadletter import DeadLetters, H
from engine.errors import MalformedEvent
from engine.events import MSG_ID_HEADER
from engine.outcome import Action, Outcome, RetryPolicy, decide
from engine.transport.outbox import header_bytes

REPLY = "$JS.ACK.SHOP.payments.{attempt}.1834.1834.1700000000000000000.0"
FIRST = "2026-11-24T08:30:49.222Z"


class Publisher:
    max_payload = 1024 * 1024  # nats-server's default

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


CONFIG: Any = SimpleNamespace(dead_letter=SimpleNamespace(subject_prefix="dlq", max_msg_size=8 * 1024 * 1024),
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


# ---- entries built from hostile input --------------------------------------------------------------

FAILURE = deadletter.Failure("payments", "OrderPlaced", "MalformedEvent", "body is not JSON", 1, "shop.OrderPlaced",
                             "SHOP", 1834)
LIMIT = 1024 * 1024


def wire_size(body: bytes, headers: dict[str, str]) -> int:
    """What nats-server counts against max_payload: the header block nats-py sends, plus the body."""
    block = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return len(block.encode()) + len(body)


def test_an_entry_for_a_body_near_the_limit_is_cut_down_to_fit_and_says_so() -> None:
    body = b"x" * 1_048_320
    original = {MSG_ID_HEADER: "m-1", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "X-Pad": "p" * 200}
    cut, headers = deadletter.build_entry(FAILURE, body, original, FIRST, FIRST, LIMIT)
    assert wire_size(cut, headers) <= LIMIT
    assert wire_size(cut, headers) == header_bytes(headers) + len(cut)  # the size is computed exactly
    assert headers[H + "Body-Truncated"] == str(len(body)) and body.startswith(cut) and len(cut) > 1_040_000
    assert (headers[H + "Stream"], headers[H + "Stream-Seq"]) == ("SHOP", "1834")  # where to re-read the original
    small, small_headers = deadletter.build_entry(FAILURE, b"{}", original, FIRST, FIRST, LIMIT)
    assert small == b"{}" and H + "Body-Truncated" not in small_headers


def test_only_headers_safe_to_send_again_are_kept() -> None:
    original = {MSG_ID_HEADER: "m-1", "Nats-Expected-Stream": "SHOP", "nats-rollup": "all", "X/Trace": "1",
                H + "Service": "forged", "jetpool-dlq-route": "forged", "X-Ok": "fine", "traceparent": "t",
                "X-Padded": " spaces ", "X-Break": "a\rb"}
    assert deadletter.resendable_headers(original) == {"X-Ok": "fine", "traceparent": "t"}
    _, headers = deadletter.build_entry(FAILURE, b"{}", original, FIRST, FIRST, LIMIT)
    assert headers[H + "Service"] == "payments" and headers[H + "Original-Msg-Id"] == "m-1"
    assert not [k for k in headers if k.lower().startswith("nats-") and k != MSG_ID_HEADER]
    many = {f"X-H{i}": "v" * 100 for i in range(200)}  # 20 KB of headers: only the first 4 KiB are kept
    kept = deadletter.resendable_headers(many)
    assert 0 < len(kept) < len(many) and header_bytes(kept) <= deadletter.ORIGINAL_HEADERS_MAX_BYTES + 12


def test_values_from_the_sender_cannot_add_header_lines_and_are_bounded() -> None:
    hostile = deadletter.Failure("payments", "Order\r\nNats-Rollup: all", "Err", "x" * 100_000 + "\r\nX: y", 1,
                                 "shop.OrderPlaced", "SHOP", 1)
    _, headers = deadletter.build_entry(hostile, b"{}", {MSG_ID_HEADER: "a\r\nb"}, FIRST, FIRST, LIMIT)
    assert all("\r" not in v and "\n" not in v for v in headers.values())
    assert len(headers[H + "Error"]) == 1000 and len(headers[H + "Route"]) <= 200


def test_the_last_resort_entry_has_no_body_and_no_original_headers() -> None:
    body, headers = deadletter.build_entry(FAILURE, b"x" * 5000, {"X-Ok": "1", MSG_ID_HEADER: "m-1"}, FIRST, FIRST,
                                           LIMIT, keep_body=False)
    assert body == b"" and "X-Ok" not in headers
    assert headers[H + "Body-Truncated"] == "5000" and headers[H + "Original-Msg-Id"] == "m-1"


def test_the_route_is_what_the_subject_carries_never_what_the_body_claims() -> None:
    publisher = Publisher()
    msg = SimpleNamespace(reply=REPLY.format(attempt=1), subject="shop.OrderPlaced",
                          data=b'{"type": "StockReserved"}', headers={})
    forged = Outcome(Action.TERM, reason="MalformedEvent: event type 'StockReserved' does not match", dead_letter=True)
    letters = DeadLetters(CONFIG, publisher, Failures())  # type: ignore[arg-type]
    asyncio.run(letters.write(msg, None, forged, 1, "payments"))
    assert publisher.sent[0][2][H + "Route"] == "OrderPlaced"


def test_the_first_failure_bucket_expires_its_keys_and_is_bounded() -> None:
    stream = deadletter.failures_stream_config(deadletter.FailuresBucket())
    assert stream.max_age == 24 * 3600.0 and stream.max_bytes == 64 * 1024 * 1024
    assert stream.discard == api.DiscardPolicy.OLD  # the oldest keys go first, puts never fail
