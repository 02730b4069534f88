"""The envelope: round trip, malformed bodies with readable reasons, deterministic derived ids."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from engine.errors import MalformedEvent
from engine.events import (
    MAX_DEPTH,
    MSG_ID_HEADER,
    SCHEMA_VERSION,
    Event,
    carried_type,
    check_subject,
    derived_id,
    json_depth,
    new_id,
    new_trace_id,
    trace_id_of,
)


def test_round_trip_keeps_every_field() -> None:
    event = Event(type="OrderPlaced", data={"order": "o-1", "items": [1, 2], "total": 9.5}, aggregate_id="o-1",
                  causation_id="c", correlation_id="r")
    back = Event.decode(event.encode())
    assert back == event
    assert back.to_dict() == event.to_dict()
    assert event.headers() == {MSG_ID_HEADER: event.id}


def test_defaults_are_filled_in() -> None:
    event = Event(type="Ping")
    assert re.fullmatch(r"[0-9a-f]{32}", event.id)
    assert re.fullmatch(r"[0-9a-f]{32}", event.trace_id)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event.timestamp)
    assert event.v == SCHEMA_VERSION
    assert new_id() != new_id()
    assert new_trace_id() != new_trace_id()


def test_minimal_producer_body_decodes() -> None:
    event = Event.decode(b'{"id": "e1", "type": "Ping", "data": {}}')
    assert (event.id, event.type, event.data, event.aggregate_id) == ("e1", "Ping", {}, "")
    assert event.causation_id is None and event.correlation_id is None
    assert event.trace_id and event.timestamp


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"id": "e1", "type": "Ping", "data": {}}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json", "body is not JSON: "),
    (b"", "body is not JSON: "),
    (b"[1, 2]", "body must be a JSON object, got list"),
    (b'"Ping"', "body must be a JSON object, got str"),
    (body(id=...), "field 'id' is missing"),
    (body(type=...), "field 'type' is missing"),
    (body(data=...), "field 'data' is missing"),
    (body(id=5), "field 'id' must be a string, got int"),
    (body(type=None), "field 'type' must be a string, got NoneType"),
    (body(data=[1]), "field 'data' must be an object, got list"),
    (body(aggregate_id=3), "field 'aggregate_id' must be a string, got int"),
    (body(causation_id=7), "field 'causation_id' must be a string or null, got int"),
    (body(v="1"), "field 'v' must be an integer, got str"),
    (body(id=""), "fields 'id' and 'type' must not be empty"),
])
def test_malformed_bodies_have_readable_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent) as info:
        Event.decode(raw)
    assert str(info.value).startswith(reason)


def test_derived_ids_are_deterministic_and_distinct() -> None:
    assert derived_id("abc", 0) == derived_id("abc", 0)
    assert re.fullmatch(r"[0-9a-f]{32}", derived_id("abc", 0))
    ids = {derived_id(parent, pos) for parent in ("abc", "abd", "ab") for pos in range(3)}
    assert len(ids) == 9


def test_caused_by_binds_output_to_its_input() -> None:
    parent = Event(type="OrderPlaced", data={}, correlation_id=None)
    child = Event(type="PaymentRequested").caused_by(parent, 1)
    assert child.id == derived_id(parent.id, 1)
    assert child.causation_id == parent.id
    assert child.correlation_id == parent.id  # the first event of a flow is its correlation id
    assert child.trace_id == parent.trace_id
    grandchild = Event(type="PaymentCaptured").caused_by(child, 0)
    assert grandchild.correlation_id == parent.id
    assert grandchild.causation_id == child.id


# ---- the boundary: what a producer cannot do -------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"id": "e-1", "type": "Ping", "data": {"x": ' + b"[" * (depth - 2) + b"]" * (depth - 2) + b"}}"


def test_json_nested_deeper_than_the_limit_is_rejected_at_the_boundary() -> None:
    assert json_depth(orjson.loads(nested(MAX_DEPTH))) == MAX_DEPTH
    assert Event.decode(nested(MAX_DEPTH)).data["x"]  # at the limit: an event
    with pytest.raises(MalformedEvent, match=f"nested deeper than {MAX_DEPTH} levels"):
        Event.decode(nested(MAX_DEPTH + 1))
    with pytest.raises(MalformedEvent, match="nested deeper"):
        Event.decode(nested(600))  # orjson parses it, but could not encode it again
    # Many brackets, little depth: measured, and accepted.
    wide = b'{"id": "e-1", "type": "Ping", "data": {"rows": [' + b",".join([b"[1]"] * 500) + b"]}}"
    assert len(Event.decode(wide).data["rows"]) == 500


def test_an_event_must_be_of_the_type_its_subject_carries() -> None:
    forged = Event.decode(b'{"id": "e-1", "type": "StockReserved", "data": {}}')
    with pytest.raises(MalformedEvent, match=re.escape("'StockReserved' does not match subject 'shop.OrderPlaced', "
                                                       "which carries 'OrderPlaced'")):
        check_subject(forged, "shop.OrderPlaced")
    check_subject(forged, "shop.StockReserved")
    check_subject(forged, "billing.eu.StockReserved")  # another prefix: the last token is the type
    assert carried_type("shop.OrderPlaced") == "OrderPlaced"


def test_two_different_events_claiming_one_id_get_different_output_ids() -> None:
    """The same bytes again (a redelivery, a producer's retry) keep their output ids; another body does not."""
    first = Event.decode(b'{"id": "same", "type": "Ping", "data": {"order": 1}}')
    again = Event.decode(b'{"id": "same", "type": "Ping", "data": {"order": 1}}')
    other = Event.decode(b'{"id": "same", "type": "Ping", "data": {"order": 2}}')
    ids = [Event("Pong").caused_by(parent, 0).id for parent in (first, again, other)]
    assert ids[0] == ids[1] != ids[2]
    assert Event("Pong").caused_by(Event("Ping", id="built"), 0).id == derived_id("built", 0)


def test_an_event_without_a_trace_id_gets_the_same_one_on_every_delivery() -> None:
    body = b'{"id": "no-trace-1", "type": "Ping", "data": {}}'
    attempts = [Event.decode(body).trace_id for _ in range(3)]
    assert attempts[0] == attempts[1] == attempts[2] == trace_id_of("no-trace-1")
    assert re.fullmatch(r"[0-9a-f]{32}", attempts[0]) and attempts[0] != trace_id_of("no-trace-2")
    given = Event.decode(b'{"id": "t", "type": "Ping", "data": {}, "trace_id": "' + b"a" * 32 + b'"}')
    assert given.trace_id == "a" * 32
