"""The order API's boundary: what a request may carry, checked before anything touches the broker.

Every check raises :class:`ApiError`, Stripe's error shape. The API's ids derive from the client's
``Idempotency-Key``, so a retried POST names the same order and the same event: the order id, the
``OrderPlaced`` event id (its ``Nats-Msg-Id``) and its trace id are hashes of the key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

MAX_BODY_BYTES = 64 * 1024
MAX_QTY = 1000
MAX_AMOUNT_CENTS = 100_000_000  # 1,000,000.00: an order line above that is a mistake, not a purchase
MAX_WAIT_S = 30.0
FIELDS = ("customer_id", "sku", "qty", "amount_cents")  # the names of handlers.saga.Order

# The saga's ids become KV keys and subject-safe tokens (handlers/saga.py): no '.', '*', '>', spaces or controls.
TOKEN = re.compile(r"^[-_=A-Za-z0-9]{1,128}$")
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_WAIT = re.compile(r"^(\d{1,6}(?:\.\d{1,3})?)(ms|s)?$")
_TOKEN_RULE = "1 to 128 letters, digits, '-', '_' or '='"


class ApiError(Exception):
    """An answer other than 2xx: ``{"error": {"type", "code", "message", "param"?}}``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.type = status, code, param, type_

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "code": self.code, "message": str(self)}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


@dataclass(frozen=True, slots=True)
class OrderLine:
    """A valid order as the client sent it (the saga's :class:`~handlers.saga.Order` without its id)."""

    customer_id: str
    sku: str
    qty: int
    amount_cents: int

    def fingerprint(self) -> str:
        """What a retry must repeat: the same key with another line is another request."""
        return hashlib.blake2b(orjson.dumps([self.customer_id, self.sku, self.qty, self.amount_cents]),
                               digest_size=16).hexdigest()


def idempotency_key(headers: Mapping[str, str]) -> str:
    """The required ``Idempotency-Key``: 1 to 255 printable ASCII characters."""
    key = headers.get("Idempotency-Key")
    if key is None:
        raise ApiError(400, "parameter_missing", "the Idempotency-Key header is required (a retry-safe POST "
                       "needs it: use a fresh UUID per order and repeat it on retries)", "Idempotency-Key")
    if not _KEY.match(key):
        raise ApiError(400, "parameter_invalid", "Idempotency-Key: expected 1 to 255 printable ASCII characters "
                       "without spaces", "Idempotency-Key")
    return key


def content_type(mime: str) -> None:
    """Only JSON bodies (``application/json``, any charset parameter) are read."""
    if mime != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"expected Content-Type application/json, got {_short(mime) if mime else 'none'}")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (orjson refuses NaN, Infinity and invalid UTF-8)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise ApiError(400, "invalid_json", f"expected a JSON object, got {_json_kind(body)}")
    return body


def order_line(body: Mapping[str, Any]) -> OrderLine:
    """Check every parameter; unknown ones are refused (a typo must not place a different order)."""
    unknown = [name for name in body if name not in FIELDS]
    if unknown:
        raise ApiError(422, "parameter_unknown", f"unknown parameter {_short(unknown[0])} (expected: "
                       f"{', '.join(FIELDS)})", _short(unknown[0], quote=False))
    for name in FIELDS:
        if name not in body or body[name] is None:
            raise ApiError(422, "parameter_missing", f"{name} is required", name)
    return OrderLine(_token(body, "customer_id"), _token(body, "sku"), _integer(body, "qty", MAX_QTY),
                     _integer(body, "amount_cents", MAX_AMOUNT_CENTS))


def order_id_param(text: str) -> str:
    """An order id in a path: a saga id, else 400."""
    if not TOKEN.match(text):
        raise ApiError(400, "parameter_invalid", f"order_id: expected {_TOKEN_RULE}", "order_id")
    return text


def wait_param(text: str | None) -> float:
    """``?wait=5s`` / ``500ms`` / ``5`` (seconds) as seconds, at most :data:`MAX_WAIT_S`; 0 without it."""
    if text is None:
        return 0.0
    match = _WAIT.match(text)
    if match is None:
        raise ApiError(400, "parameter_invalid", "wait: expected a duration such as 5s, 500ms or 5", "wait")
    seconds = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    if seconds > MAX_WAIT_S:
        raise ApiError(400, "parameter_invalid", f"wait: at most {MAX_WAIT_S:g}s", "wait")
    return seconds


def derived_ids(key: str) -> tuple[str, str]:
    """(order id, OrderPlaced event id) of an idempotency key: the same key, the same order and event."""
    raw = key.encode()
    order_id = "o-" + hashlib.blake2b(raw, digest_size=12, person=b"jetpool-order").hexdigest()
    event_id = hashlib.blake2b(raw, digest_size=16, person=b"jetpool-placed").hexdigest()
    return order_id, event_id


def _token(body: Mapping[str, Any], name: str) -> str:
    value = body[name]
    if type(value) is not str:
        raise ApiError(422, "parameter_invalid_string", f"{name}: expected a string, got {_json_kind(value)}", name)
    if not TOKEN.match(value):
        raise ApiError(422, "parameter_invalid", f"{name}: expected {_TOKEN_RULE}, got {_short(value)}", name)
    return value


def _integer(body: Mapping[str, Any], name: str, maximum: int) -> int:
    value = body[name]
    if type(value) is not int:  # bool is not int here; 2.0, 1e23 and "2" are not integers either
        raise ApiError(422, "parameter_invalid_integer", f"{name}: expected an integer, got {_json_kind(value)}",
                       name)
    if not 1 <= value <= maximum:
        raise ApiError(422, "parameter_out_of_range", f"{name}: expected 1 to {maximum}, got {_short(str(value))}",
                       name)
    return value


def _json_kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _short(text: str, quote: bool = True, limit: int = 64) -> str:
    """User input echoed in a message: bounded (JSON escapes the rest)."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(cut) if quote else cut
