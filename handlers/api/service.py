"""The order API's broker side: place an order once per idempotency key, read and await its state.

Placing (:meth:`OrderDesk.place`) is two steps, both safe to repeat:

1. *remember the request*: create ``request.<order id>`` in the ``orders`` bucket (an order id has no
   dot, so the key never meets one) holding the line's fingerprint and the ``OrderPlaced`` event as
   encoded. Creation is a compare-and-set: of two requests with one key only one writes; the other
   reads the record and either repeats it (same line) or is refused (another line: 422);
2. *publish the remembered event* and wait for its PubAck. A retry re-publishes the same bytes under
   the same ``Nats-Msg-Id``, which JetStream deduplicates within the stream's duplicate window; after
   it, the saga's services are idempotent per order and event id (and the bytes are the same, so are
   the ids of everything they derive). A crash between the steps is mended by the client's retry.

Reading (:meth:`OrderDesk.state`) joins the order's record (``orders``), its payment (``payments``) and
its reservation (``stock``). Waiting (:meth:`OrderDesk.wait`) subscribes to the record's KV subject
(``$KV.orders.<id>``, a plain subscription: no JetStream consumer per waiter) and re-reads on every
change, and at least every second, so a message lost in a reconnect costs at most that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import orjson
import structlog
from nats.js.errors import BucketNotFoundError

from engine.config import Config
from engine.connection import connect
from engine.errors import JetpoolError, PublishError
from engine.events import Event, now_iso, trace_id_of
from engine.publisher import Publisher
from engine.state import Conflict, KVState, StateStore
from handlers.api.orders_input import ApiError, OrderLine, derived_ids
from handlers.orders import CANCELLED, CONFIRMED, status
from handlers.saga import ORDER_PLACED

log = structlog.get_logger("jetpool.shop.api")

BUCKETS = ("orders", "payments", "stock")
_RECHECK_S = 1.0
_PUBLISH_RETRY_S = 10.0  # a client waits on the answer: give up sooner than a worker would


class Unavailable(ApiError):
    """The broker or a bucket is not reachable now: 503, retry with the same key."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "service_unavailable", message, type_="api_error")


class OrderDesk:
    """The API's one NATS connection, its publisher and the shop's buckets (opened when they exist)."""

    def __init__(self, cfg: Config, nc: Any, publisher: Publisher) -> None:
        self.cfg = cfg
        self.nc = nc
        self.js = nc.jetstream()
        self.publisher = publisher
        self._stores: dict[str, StateStore] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Config) -> AsyncIterator[OrderDesk]:
        """Connect (waiting for the broker like a worker does) and start the publisher."""
        nc = await connect(cfg.nats, name=f"{cfg.app}.api", first_attempts=-1)
        captured = [subject for stream in cfg.streams for subject in stream.subjects]
        publisher = Publisher(nc, cfg.subject_prefix, cfg.nats.publish_timeout_s,
                              min(cfg.nats.publish_retry_s, _PUBLISH_RETRY_S), captured)
        try:
            await publisher.start()
            yield cls(cfg, nc, publisher)
        finally:
            await publisher.stop()
            await nc.close()

    async def store(self, bucket: str) -> StateStore:
        """The bucket as a state store; the first call after provisioning opens it (``jetpool run`` starts
        its sidecars before it provisions)."""
        found = self._stores.get(bucket)
        if found is not None:
            return found
        try:
            kv = await self.js.key_value(bucket)
        except BucketNotFoundError:
            raise Unavailable(f"the {bucket!r} bucket does not exist yet (not provisioned)") from None
        self._stores[bucket] = store = KVState(kv)
        return store

    async def ready(self) -> str:
        """'' when connected with the orders bucket reachable, else why not."""
        if not self.nc.is_connected:
            return "not connected to NATS"
        try:
            await self.js.stream_info("KV_orders")
        except Exception as exc:
            return f"the orders bucket is not reachable: {type(exc).__name__}"
        return ""

    async def place(self, key: str, line: OrderLine) -> tuple[str, bool]:
        """Publish the key's OrderPlaced once stored; return (order id, whether the key was seen before)."""
        order_id, event_id = derived_ids(key)
        orders = await self.store("orders")
        event = Event(type=ORDER_PLACED, aggregate_id=order_id, id=event_id, trace_id=trace_id_of(event_id),
                      data={"order_id": order_id, "customer_id": line.customer_id, "sku": line.sku,
                            "qty": line.qty, "amount_cents": line.amount_cents})
        record: dict[str, Any] = {"fingerprint": line.fingerprint(), "event": event.to_dict(), "received": now_iso()}
        try:
            await orders.create(request_key(order_id), record)
            seen = False
        except Conflict:
            existing, _ = await orders.get(request_key(order_id))
            if existing is None:  # deleted in between (by an operator): nobody else holds the key now
                await orders.put(request_key(order_id), record)
                existing = record
            if existing["fingerprint"] != record["fingerprint"]:
                raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used with another order "
                               "line; use a new key for a new order", "Idempotency-Key",
                               type_="idempotency_error") from None
            record, seen = existing, True
        await self._publish(order_id, record["event"])
        return order_id, seen

    async def _publish(self, order_id: str, event: dict[str, Any]) -> None:
        try:
            await self.publisher.publish(self.publisher.subject_for(ORDER_PLACED), orjson.dumps(event),
                                         {"Nats-Msg-Id": str(event["id"])})
        except PublishError as exc:
            log.warning("api.publish_failed", order_id=order_id, error=str(exc))
            raise Unavailable("the order was not stored on the stream; retry with the same Idempotency-Key") from None

    async def state(self, order_id: str) -> dict[str, Any] | None:
        """The order as the API shows it, or None for an order nobody placed."""
        orders = await self.store("orders")
        record, _ = await orders.get(order_id)
        payment, _ = await (await self.store("payments")).get(order_id)
        if record is None:
            request, _ = await orders.get(request_key(order_id))
            if request is None:
                return None
            record = {"status": status(None, payment, placed=True), "order": request["event"]["data"],
                      "terminal": None}
        elif record.get("terminal") is None:  # not ended, written by a release that recorded the stages
            record = {**record, "status": status(None, payment, placed=True)}
        reservation, _ = await (await self.store("stock")).get(f"reservation.{order_id}")
        return view(order_id, record, payment, reservation)

    async def wait(self, order_id: str, wait_s: float) -> dict[str, Any] | None:
        """The order's state once it ended, or as it is after ``wait_s``."""
        if wait_s <= 0:
            return await self.state(order_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        sub = await self.nc.subscribe(f"$KV.orders.{order_id}")
        try:
            while True:
                current = await self.state(order_id)
                left = deadline - loop.time()
                if current is None or current["status"] in (CONFIRMED, CANCELLED) or left <= 0:
                    return current
                with contextlib.suppress(nats.errors.TimeoutError):
                    await sub.next_msg(timeout=min(left, _RECHECK_S))
                while sub.pending_msgs:  # a burst of changes: one read covers them all
                    with contextlib.suppress(nats.errors.TimeoutError):
                        await sub.next_msg(timeout=0.001)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def request_key(order_id: str) -> str:
    """Where the API remembers the request that placed an order (in the ``orders`` bucket)."""
    return f"request.{order_id}"


def view(order_id: str, record: dict[str, Any], payment: dict[str, Any] | None,
         reservation: dict[str, Any] | None) -> dict[str, Any]:
    """The order's records, shaped for clients (internal bookkeeping such as applied event ids left out)."""
    line = record["order"]
    terminal = record.get("terminal")
    return {
        "order_id": order_id,
        "status": record["status"],
        "order": {name: line[name] for name in ("customer_id", "sku", "qty", "amount_cents")},
        "payment": None if payment is None else {
            k: payment[k] for k in ("status", "charge_id", "refund_id", "reason") if payment.get(k)},
        "reservation": None if reservation is None else {"status": reservation["status"]},
        "ended_by": None if not terminal else {
            "event": terminal["type"], "cause_event_id": terminal["by"], "reason": terminal["reason"]},
    }


def broker_down(exc: BaseException) -> bool:
    """Errors that mean "the broker is not answering now" (503), not a bug."""
    return isinstance(exc, nats.errors.Error | JetpoolError | asyncio.TimeoutError | ConnectionError)
