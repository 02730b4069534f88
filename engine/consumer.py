"""The pull loop of one durable consumer in one worker: credit-based pulls, a bounded window, settlement.

Why not ``PullSubscription.fetch``: it is a request/response per batch (pull, wait for the whole batch,
process, pull again), so the pipe empties between batches. Here pull requests are plain publishes to
``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` with one inbox subscription as reply, and
:class:`engine.window.Window` says how much to ask for and when, so messages keep flowing while
earlier ones are handled.

The consumer decides nothing about a delivery's fate: :mod:`engine.outcome` does (``decide`` once
per delivery, ``sweep`` at each housekeeping tick). It applies the answer through one path,
:meth:`Consumer._settle`, the only code that writes settlement bytes (``+ACK``, ``-NAK``, ``+TERM``,
``+WPI``) — so every delivered message is settled exactly once.

A pull that went silent is noticed: the server sends idle heartbeats while a request waits; when
neither a message nor a heartbeat arrived for two heartbeat intervals, the credit is dropped and the
worker pulls again (also right after a reconnect, since requests die with the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace

from engine import eager, tracing
from engine.breaker import Breaker
from engine.config import Config
from engine.deadletter import DeadLetters
from engine.dispatch import Context, Router, ack_metadata, bind_outputs
from engine.errors import MalformedEvent
from engine.events import TRACEPARENT_HEADER, Event, check_subject
from engine.metrics import RouteMetrics
from engine.outcome import ACKED, CANCEL, Action, Outcome, RetryPolicy, arrived, decide, sweep, unstored
from engine.publisher import Publisher
from engine.transport import inbox
from engine.transport.outbox import Outbox
from engine.window import Window

log = structlog.get_logger("jetpool.consumer")

_NS = 1_000_000_000
_DRAIN_POLL_S = 0.02
_MISSES_UNHEALTHY = 3
_ACK = b"+ACK"
_WIRE = {Action.ACK: _ACK, Action.NAK: b"-NAK", Action.TERM: b"+TERM", Action.RELEASE: b"-NAK",
         Action.PROGRESS: b"+WPI"}


def wire(outcome: Outcome) -> bytes:
    """The bytes that tell the server ``outcome`` (a nak with a delay carries it)."""
    if outcome.action is Action.NAK and outcome.delay_s > 0:
        return b"-NAK " + orjson.dumps({"delay": int(outcome.delay_s * _NS)})
    return _WIRE[outcome.action]


class Stage(enum.Enum):
    """Where a delivery is in its life; it moves forward only, except a parked one that runs again."""

    HANDLING = "handling"  # the handler runs
    TIMED_OUT = "timed_out"  # the handler was cancelled for running too long; its failure is being settled
    PUBLISHING = "publishing"  # the handler returned; its outputs wait for their PubAcks
    PARKED = "parked"  # a breaker refused the call; kept in progress until it may run again
    SETTLED = "settled"  # acked, nakked, termed or released: nothing more is sent for it


_SETTLED, _TIMED_OUT = Stage.SETTLED, Stage.TIMED_OUT  # read on the hot path


class _Delivery:
    """One delivered message from receipt to settlement; also the waiter of its outputs' PubAcks."""

    __slots__ = ("consumer", "error", "event", "msg", "progress_at", "reply", "stage", "started", "task", "waiting")

    def __init__(self, consumer: Consumer, msg: Any, now: float) -> None:
        self.consumer = consumer
        self.msg = msg
        self.reply: str = msg.reply
        self.event: Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.stage = Stage.HANDLING
        self.started = now
        self.progress_at = now
        self.waiting = 0
        self.error: Exception | None = None

    @property
    def attempt(self) -> int:
        """This delivery's number, from 1 (read from its ack subject only when a failure needs it)."""
        return ack_metadata(self.reply)[0]

    async def on_puback(self, error: Exception | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.waiting -= 1
        if self.waiting == 0:
            await self.consumer.outputs_done(self)


class Consumer:
    """Consumes one service's durable pull consumer inside one worker process.

    Args:
        nc: the worker's connected NATS client.
        config: the loaded configuration.
        service: the service name (a key of ``config.services``).
        router: the service's routes.
        publisher: the worker's publisher, for handler outputs.
        worker: the worker's index, for logs and handler context.
        resources: per-worker objects handlers reach through ``ctx.resource(name)``; the
            :class:`~engine.breaker.Breaker` among them gate pulling while one is open.
        dead_letters: the dead-letter writer; without one, dead-lettered messages are only termed.
    """

    def __init__(self, nc: Any, config: Config, service: str, router: Router, publisher: Publisher,
                 worker: int = 0, resources: Mapping[str, Any] | None = None,
                 dead_letters: DeadLetters | None = None) -> None:
        svc = config.services[service]
        self.service = service
        self._nc = nc
        self._out = Outbox(nc)
        self._router = router
        self._publisher = publisher
        self._worker = worker
        self._resources = resources or {}
        self._dead_letters = dead_letters
        self._svc = svc
        self._max_event_bytes = svc.max_event_bytes
        self._settings = svc.settings
        self._max_deliver = svc.max_deliver
        self._timeout_s = svc.handler_timeout_s
        self._policy = RetryPolicy(svc.retry.base_s, svc.retry.max_s, tuple(svc.retry.delays_s or ()))
        self._breakers: list[Breaker] = [r for r in self._resources.values() if isinstance(r, Breaker)]
        self._parked: list[_Delivery] = []
        self._trial: _Delivery | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self._routes = frozenset(router.event_types)
        # The type each routed subject carries, looked up per event (any other subject: computed then).
        self._carried = {config.subject_for(t): t for t in self._routes}
        self._metrics = RouteMetrics(service, self._routes, [b.name for b in self._breakers])
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{svc.stream}.{config.durable(service)}"
        # "$JS.ACK.[<domain>.<account>.]<stream>.<durable>.<num_delivered>....": what precedes the count.
        self._ack_key = f".{svc.stream}.{config.durable(service)}."
        self._inbox: str = nc.new_inbox()
        self._window = Window(svc.max_in_flight, svc.batch)
        self._pull_body = {"expires": int(svc.pull_expires_s * _NS), "idle_heartbeat": int(svc.idle_heartbeat_s * _NS)}
        self._tick_s = min(1.0, svc.idle_heartbeat_s / 2, svc.ack_wait_s / 6, svc.handler_timeout_s / 4)
        self._missed_in_row = 0
        self._last_status: tuple[str | None, str | None] | None = None
        self._in_flight: dict[str, _Delivery] = {}
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._last_seen = self._loop.time()
        self._sub: Any = None
        self._ticker: asyncio.Task[None] | None = None
        self._counts: Counter[str] = Counter()  # outcomes other than ack, and housekeeping events
        self._acked = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe the reply inbox, issue the first pulls and start the housekeeping ticker."""
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        inbox.inline(self._nc, self._sub, self._on_message, f"pull:{self.service}")
        self._ticker = self._loop.create_task(self._tick_loop())
        await self._pull()

    async def stop(self, drain_timeout_s: float) -> None:
        """Drain: stop pulling, give in-flight work until the deadline, release the rest."""
        self._stopping = True
        # Dropping the inbox's interest makes the server cancel our open pull requests, so released
        # messages go to other workers instead of bouncing back here (burning delivery attempts).
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        # Parked deliveries wait for a breaker, not for a handler: hand them back now, not at the deadline.
        parked, self._parked = self._parked, []
        for delivery in parked:
            await self._conclude(delivery, asyncio.CancelledError())
        deadline = self._loop.time() + drain_timeout_s
        while self._in_flight and self._loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        leftover = list(self._in_flight.values())
        tasks = [d.task for d in leftover if d.task is not None and not d.task.done()]
        for task in tasks:
            task.cancel()  # handler still running: its cancellation is concluded (released) by _handle
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for delivery in list(self._in_flight.values()):
            # Outputs not yet confirmed: released, and the redelivery re-publishes them.
            await self._conclude(delivery, asyncio.CancelledError())
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self._metrics.flush(0, {b.name: b.state for b in self._breakers})
        log.info("consumer.drained", service=self.service, worker=self._worker,
                 unfinished=len(leftover), **self.counts)

    def on_reconnect(self) -> None:
        """Pull requests die with the old connection: forget their credit and pull again."""
        self._window.lost()
        self._last_seen = self._loop.time()
        self._loop.create_task(self._pull())

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def bound(self) -> bool:
        """Readiness: false while the server answers pulls with an error (no consumer, leader change, 400...)."""
        return self._last_status is None

    @property
    def healthy(self) -> bool:
        """Liveness: false once pulls went unanswered (no message, no heartbeat) several times in a row."""
        return self._missed_in_row < _MISSES_UNHEALTHY

    # ---- receiving -------------------------------------------------------------------------------

    async def _on_message(self, msg: Any) -> None:
        self._last_seen = self._loop.time()
        self._missed_in_row = 0
        reply = msg.reply
        if not reply:
            await self._on_status(msg)
            return
        self._window.delivered()
        self._last_status = None  # a delivery: the pull was answered
        if self._stopping and (unstarted := arrived(self._stopping)) is not None:
            await self._send(reply, unstarted)  # hand it straight back so another worker can take it
            self._counts[unstarted.label] += 1
            self._metrics.outcome("-", unstarted.label)
            return
        at = reply.find(self._ack_key)
        if at > 0 and not reply.startswith("1.", at + len(self._ack_key)):
            self._metrics.redelivered += 1
        delivery = _Delivery(self, msg, self._last_seen)
        self._in_flight[reply] = delivery
        finished, _, task = eager.start(self._handle(delivery))
        if not finished:
            delivery.task = task
        if self._window.room(len(self._in_flight)):
            await self._pull()

    async def _on_status(self, msg: Any) -> None:
        headers = msg.headers or {}
        code = headers.get("Status")
        if code == "100":
            self._last_status = None
            return  # idle heartbeat: the pull is alive
        self._window.ended(code, headers.get("Nats-Pending-Messages"))
        if code == "408":
            self._last_status = None  # a pull that ran its course: the consumer is there
            await self._pull()
        else:
            # 409 (leader change, max waiting, consumer deleted...) or unknown: the ticker re-pulls, and
            # the same answer to every re-pull is logged once, not once a tick.
            status = (code, headers.get("Description"))
            if status != self._last_status:
                self._last_status = status
                log.warning("pull.status", service=self.service, status=code, description=status[1])

    async def _pull(self) -> None:
        """Ask for as many messages as fit the free part of the window, a batch per request.

        While a breaker is not closed, parked deliveries are its trials and nothing is pulled. Once
        they are all settled some other way (their retry failed before reaching the breaker, or
        their handler no longer needed it), pybreaker still says "open": it moves to half-open only
        when called. So when the breaker is due and nothing is in flight, one message is let in, and
        its handler's call is the trial; without that, the consumer would never pull again.
        """
        if self._stopping or self._parked or not self._nc.is_connected:
            return
        window = self._window
        if not self.breakers_closed:
            due = not any(b.is_open for b in self._breakers)
            if due and not self._in_flight:
                await self._request(window.trial())
            return
        while size := window.next_pull(len(self._in_flight)):
            await self._request(size)

    async def _request(self, size: int) -> None:
        if size:
            await self._out.publish(self._next_subject, orjson.dumps({"batch": size, **self._pull_body}),
                                    reply=self._inbox)

    # ---- processing ------------------------------------------------------------------------------

    async def _handle(self, d: _Delivery) -> None:
        """Decode, run the handler, publish its outputs; the last PubAck (or none) concludes it."""
        msg = d.msg
        try:
            if len(msg.data) > self._max_event_bytes:
                raise MalformedEvent(f"payload of {len(msg.data)} bytes exceeds max_event_bytes "
                                     f"({self._max_event_bytes})")
            event = Event.decode(msg.data)
            if self._carried.get(msg.subject) != event.type:
                check_subject(event, msg.subject)  # raises if the body claims another type than its subject
            d.event = event
            ctx = Context(self.service, self._worker, d.reply, msg.subject, self._resources, self._settings)
            if tracing.enabled():
                outputs = await self._traced_dispatch(d, event, ctx)
            else:
                outputs = bind_outputs(event, await self._router.handler_for(event, self.service)(event, ctx))
                if outputs and (traceparent := inbox.header(msg, TRACEPARENT_HEADER)):
                    for output in outputs:
                        output.traceparent = traceparent
            self._metrics.duration(event.type, self._loop.time() - d.started)
            if outputs:
                d.stage = Stage.PUBLISHING
                d.waiting = len(outputs)
                await self._publisher.send_events(outputs, d)
            else:
                await self._conclude(d, None)
        except asyncio.CancelledError as exc:
            await self._conclude(d, exc)
        except Exception as exc:
            await self._conclude(d, exc)

    async def _traced_dispatch(self, d: _Delivery, event: Event, ctx: Context) -> list[Event]:
        span = tracing.start_span(event, d.msg.headers, self.service, ack_metadata(d.reply)[1])
        try:
            with trace.use_span(span, end_on_exit=False):
                outputs = await self._router.dispatch(event, ctx)
        except BaseException as exc:
            tracing.end_span(span, exc)
            raise
        traceparent = tracing.traceparent_of(span)
        for output in outputs:
            output.traceparent = traceparent
        tracing.end_span(span)
        return outputs

    async def outputs_done(self, d: _Delivery) -> None:
        """The last output's PubAck (or failure) arrived: conclude the delivery."""
        if d.error is None:
            await self._conclude(d, None)
        else:
            # Concluding a failure may publish (a dead letter) and wait for *its* PubAck, which only
            # the PubAck subscription calling us can deliver: conclude from a task, never inline.
            task = self._loop.create_task(self._conclude(d, d.error))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _conclude(self, d: _Delivery, exc: BaseException | None) -> None:
        """Ask :func:`engine.outcome.decide` what ``exc`` means for ``d``, and apply it."""
        if d.stage is _SETTLED:
            return
        # The attempt matters only to a failure: read from the ack subject then, not for every ack.
        outcome = decide(exc, 1 if exc is None else d.attempt, self._max_deliver, self._policy, self._stopping,
                         self._timeout_s if d.stage is _TIMED_OUT else None)
        if outcome is ACKED:
            await self._settle(d, outcome)
            return
        if outcome.action is Action.PARK:
            self._park(d)
            return
        if outcome.dead_letter and not await self._write_dead_letter(d, outcome):
            outcome = unstored(outcome, d.attempt, self._policy)
        elif outcome.action is Action.NAK and self._dead_letters is not None:
            await self._dead_letters.note_failure(d.reply, self.service)
        await self._settle(d, outcome)

    async def _settle(self, d: _Delivery, outcome: Outcome) -> None:
        """The one path that ends a delivery: send the outcome, count it, free its slot."""
        d.stage = _SETTLED
        payload = _ACK if outcome is ACKED else wire(outcome)
        if not self._out.write(d.reply, payload):
            await self._out.publish(d.reply, payload)
        if outcome is ACKED:
            self._acked += 1  # what _tally does, without its two Counters: acks are nearly every outcome
            self._metrics.acked(d.event.type if d.event is not None else "-")
        else:
            self._tally(d, outcome.label)
            if outcome.action is not Action.RELEASE:
                log.warning("event.failed", service=self.service, worker=self._worker, outcome=outcome.label,
                            attempt=d.attempt, delay_s=round(outcome.delay_s, 3), reason=outcome.reason,
                            stream_seq=ack_metadata(d.reply)[1], **_event_fields(d.event))
        if self._forget(d):
            await self._pull()

    async def _send(self, reply: str, outcome: Outcome) -> None:
        """Write an outcome that settles no delivery (in progress; released before it started)."""
        payload = wire(outcome)
        if not self._out.write(reply, payload):
            await self._out.publish(reply, payload)

    async def _write_dead_letter(self, d: _Delivery, outcome: Outcome) -> bool:
        """Store the entry before terming; False if the DLQ cannot be written (the message is kept)."""
        if self._dead_letters is None:
            return True
        try:
            await self._dead_letters.write(d.msg, d.event, outcome, d.attempt, self.service)
        except Exception as exc:
            log.error("dlq.write_failed", service=self.service, error=repr(exc))
            return False
        return True

    # ---- circuit breakers ------------------------------------------------------------------------

    def _park(self, d: _Delivery) -> None:
        """A breaker refused the call: keep the delivery (in progress) until the breaker recovers."""
        d.stage = Stage.PARKED
        d.task = None
        if d is self._trial:
            self._trial = None
        self._parked.append(d)
        self._tally(d, "parked")

    @property
    def breakers_closed(self) -> bool:
        return all(b.state == "closed" for b in self._breakers)

    def _resume_parked(self) -> None:
        """Re-run parked deliveries: one trial while a breaker is half-open or due, all once closed."""
        if not self._parked or self._trial is not None or any(b.is_open for b in self._breakers):
            return
        if self.breakers_closed:
            batch, self._parked = self._parked, []
        else:
            self._trial = self._parked.pop(0)
            batch = [self._trial]
        now = self._loop.time()
        for d in batch:
            d.stage = Stage.HANDLING
            d.started = now
            finished, _, task = eager.start(self._handle(d))
            if not finished:
                d.task = task

    @property
    def counts(self) -> Counter[str]:
        """How many deliveries ended how (ack, retry, dead_letter, released, parked...), since start."""
        counts = Counter(self._counts)
        if self._acked:
            counts["ack"] += self._acked
        return counts

    def _tally(self, d: _Delivery, outcome: str) -> None:
        self._counts[outcome] += 1
        event = d.event
        # Only routed types become label values: a bad producer must not explode the label set.
        self._metrics.outcome(event.type if event is not None and event.type in self._routes else "-", outcome)

    def _forget(self, d: _Delivery) -> bool:
        """Drop a settled delivery; True when its slot makes room for another pull (then pull)."""
        self._in_flight.pop(d.reply, None)
        if d is self._trial:
            self._trial = None
            self._resume_parked()
        return not self._stopping and self._window.room(len(self._in_flight))

    # ---- housekeeping ----------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                await self._tick()
            except Exception as exc:  # a failed tick must not end housekeeping
                log.warning("consumer.tick_failed", service=self.service, error=repr(exc))

    async def _tick(self) -> None:
        now = self._loop.time()
        self._metrics.flush(len(self._in_flight), {b.name: b.state for b in self._breakers})
        await self._sweep(now)
        silent_s = now - self._last_seen
        if self._window.credit > 0 and silent_s > 2 * self._svc.idle_heartbeat_s:
            log.warning("pull.heartbeat_missed", service=self.service, silent_s=round(silent_s, 1))
            self._counts["heartbeats_missed"] += 1
            self._missed_in_row += 1
            self._window.lost()
            self._last_seen = now
        if not self._stopping:
            self._resume_parked()
            await self._pull()

    async def _sweep(self, now: float) -> None:
        """Cancel overdue handlers; tell the server slow-but-healthy deliveries are still in progress."""
        svc = self._svc
        for d in list(self._in_flight.values()):
            if d.stage in (Stage.SETTLED, Stage.TIMED_OUT):
                continue
            running = d.stage is Stage.HANDLING and d.task is not None
            due = sweep(now - d.started, now - d.progress_at, svc.handler_timeout_s, svc.ack_wait_s, running)
            if due == CANCEL and d.task is not None:
                d.stage = Stage.TIMED_OUT
                d.task.cancel()  # the handler sees CancelledError; decide() makes it this timeout's failure
            elif isinstance(due, Outcome):
                d.progress_at = now
                await self._send(d.reply, due)


def _event_fields(event: Event | None) -> dict[str, str | None]:
    """What a log line says about an event: ids, never the payload."""
    if event is None:
        return {"event_id": None, "event_type": None}
    return {"event_id": event.id, "event_type": event.type, "aggregate_id": event.aggregate_id,
            "trace_id": event.trace_id}
