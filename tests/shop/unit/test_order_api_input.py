"""The order API's boundary without a broker: parameters, ids, waits, and the OpenAPI document's routes."""

from __future__ import annotations

from typing import Any, cast

import pytest
import yaml

from handlers.api.orders_input import (
    MAX_AMOUNT_CENTS,
    MAX_QTY,
    ApiError,
    derived_ids,
    idempotency_key,
    order_line,
    parse_body,
    wait_param,
)
from handlers.api.server import OPENAPI_PATH, make_app
from handlers.api.service import OrderDesk, view
from handlers.saga import _ID

GOOD = {"customer_id": "c-1", "sku": "sku-1", "qty": 1, "amount_cents": 1}


def _refused(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        order_line(body)
    return caught.value


def test_a_valid_line_at_the_bounds() -> None:
    line = order_line({**GOOD, "qty": MAX_QTY, "amount_cents": MAX_AMOUNT_CENTS, "sku": "A" * 128})
    assert (line.qty, line.amount_cents, line.sku) == (MAX_QTY, MAX_AMOUNT_CENTS, "A" * 128)


@pytest.mark.parametrize(("change", "param", "code"), [
    ({"qty": 0}, "qty", "parameter_out_of_range"),
    ({"qty": -1}, "qty", "parameter_out_of_range"),
    ({"qty": MAX_QTY + 1}, "qty", "parameter_out_of_range"),
    ({"qty": True}, "qty", "parameter_invalid_integer"),
    ({"qty": 2.0}, "qty", "parameter_invalid_integer"),
    ({"qty": "2"}, "qty", "parameter_invalid_integer"),
    ({"amount_cents": 0}, "amount_cents", "parameter_out_of_range"),
    ({"amount_cents": 2**64 - 1}, "amount_cents", "parameter_out_of_range"),
    ({"amount_cents": 1e23}, "amount_cents", "parameter_invalid_integer"),
    ({"amount_cents": float("nan")}, "amount_cents", "parameter_invalid_integer"),
    ({"sku": "a.b"}, "sku", "parameter_invalid"),
    ({"sku": "a*"}, "sku", "parameter_invalid"),
    ({"sku": ">"}, "sku", "parameter_invalid"),
    ({"sku": "a b"}, "sku", "parameter_invalid"),
    ({"sku": "a\x00"}, "sku", "parameter_invalid"),
    ({"sku": ""}, "sku", "parameter_invalid"),
    ({"sku": "A" * 129}, "sku", "parameter_invalid"),
    ({"sku": 7}, "sku", "parameter_invalid_string"),
    ({"customer_id": "ü"}, "customer_id", "parameter_invalid"),
    ({"customer_id": None}, "customer_id", "parameter_missing"),
    ({"coupon": "X"}, "coupon", "parameter_unknown"),
])
def test_each_bad_parameter_is_named(change: dict[str, Any], param: str, code: str) -> None:
    error = _refused({**GOOD, **change})
    assert (error.status, error.param, error.code) == (422, param, code)
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_a_missing_parameter_is_named() -> None:
    error = _refused({k: v for k, v in GOOD.items() if k != "amount_cents"})
    assert (error.status, error.param, error.code) == (422, "amount_cents", "parameter_missing")


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'"x"', b"null", b'{"qty": NaN}', b'{"a": Infinity}',
                                 b'{"a": 1e400}', b"\xff\xfe", b"{'a': 1}"])
def test_a_body_that_is_not_a_json_object_is_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


@pytest.mark.parametrize("headers", [{}, {"Idempotency-Key": ""}, {"Idempotency-Key": "a b"},
                                     {"Idempotency-Key": "k" * 256}, {"Idempotency-Key": "é"}])
def test_the_idempotency_key_is_required_and_bounded(headers: dict[str, str]) -> None:
    with pytest.raises(ApiError) as caught:
        idempotency_key(headers)
    assert (caught.value.status, caught.value.param) == (400, "Idempotency-Key")


def test_ids_derive_from_the_key_alone() -> None:
    order_id, event_id = derived_ids("key-1")
    assert derived_ids("key-1") == (order_id, event_id)
    assert derived_ids("key-2")[0] != order_id
    assert _ID.match(order_id) and len(event_id) == 32


@pytest.mark.parametrize(("text", "seconds"), [(None, 0.0), ("5s", 5.0), ("500ms", 0.5), ("2.5", 2.5), ("30s", 30.0)])
def test_wait(text: str | None, seconds: float) -> None:
    assert wait_param(text) == seconds


@pytest.mark.parametrize("text", ["31s", "-1s", "5m", "", "1e3", "soon"])
def test_a_bad_wait_is_400(text: str) -> None:
    with pytest.raises(ApiError) as caught:
        wait_param(text)
    assert (caught.value.status, caught.value.param) == (400, "wait")


def test_the_view_leaves_bookkeeping_out() -> None:
    record = {"status": "cancelled", "order": {**GOOD, "order_id": "o-1"}, "applied": ["e1", "e2"],
              "terminal": {"by": "e2", "type": "OrderCancelled", "reason": "payment declined: card declined"}}
    payment = {"status": "declined", "charge_id": None, "reason": "card declined", "amount_cents": 1}
    assert view("o-1", record, payment, None) == {
        "order_id": "o-1", "status": "cancelled", "order": GOOD, "reservation": None,
        "payment": {"status": "declined", "reason": "card declined"},
        "ended_by": {"event": "OrderCancelled", "cause_event_id": "e2", "reason": "payment declined: card declined"}}


def test_every_route_of_the_app_is_in_the_openapi_document() -> None:
    document = yaml.safe_load(OPENAPI_PATH.read_text())
    app = make_app(cast(OrderDesk, object()))
    routes = {(route.resource.canonical, route.method.lower()) for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented
