"""MAX_DELIVERIES advisories, kept in a stream so none is missed while no worker runs.

When a message has been delivered ``max_deliver`` times without an ack or a term (the worker was
killed, crashed or timed out on every attempt) the server stops redelivering it and publishes an
advisory on ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``. That is a core NATS
message: whoever is not subscribed at that instant never sees it, and a message that kills its
workers makes "nobody subscribed" likely (every worker is being restarted). The message would then
sit in the stream with no dead-letter entry, lost to everyone but a stream dump.

So the advisories of every configured service's consumer are captured by a small work-queue stream,
``<dead_letter.stream>_ADVISORIES``, and each service reads its own through a durable pull consumer:
an advisory is acked only after :meth:`engine.deadletter.DeadLetters.from_advisory` stored the
dead-letter entry, and one that fired while the engine was down is handled when a worker starts.

An entry that cannot be stored is tried again every ``_NAK_DELAY_S``; from the ``_LAST_RESORT_AFTER``-th
try on, the entry is written without the original's body and headers (what happened, and where the
original is stored), which nothing a producer sent can stop from being stored. An advisory that is
not one (not JSON, fields missing, another stream's) is termed, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
import orjson
import structlog
from nats.js import api
from nats.js.errors import NotFoundError

from engine.config import Config
from engine.deadletter import DeadLetters

log = structlog.get_logger("jetpool.dlq")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
_FETCH = 16
_FETCH_TIMEOUT_S = 5.0
_RETRY_S = 1.0  # after a failed fetch (reconnecting, consumer being re-created)
_NAK_DELAY_S = 5.0  # an advisory whose entry could not be stored is tried again after this
_LAST_RESORT_AFTER = 3  # from this delivery of an advisory on, its entry is written without the body
_KEEP_S = 7 * 24 * 3600.0  # advisories nobody handled (a service removed from the config) age out


def stream_name(config: Config) -> str:
    return f"{config.dead_letter.stream}_ADVISORIES"


def subject(config: Config, service: str) -> str:
    return f"{ADVISORY}.{config.services[service].stream}.{config.durable(service)}"


def durable(config: Config, service: str) -> str:
    """Named after the stream and durable it watches: unique among deployments sharing the stream."""
    return f"{config.services[service].stream}_{config.durable(service)}"


def stream_config(config: Config) -> api.StreamConfig:
    """Work-queue retention: an advisory is removed once its service acked it (its entry is stored)."""
    dlq = config.dead_letter
    return api.StreamConfig(
        name=stream_name(config), subjects=sorted({subject(config, s) for s in config.services}),
        storage=api.StorageType.FILE if dlq.storage == "file" else api.StorageType.MEMORY,
        num_replicas=dlq.replicas, retention=api.RetentionPolicy.WORK_QUEUE, max_age=_KEEP_S,
    )


def consumer_config(config: Config, service: str) -> api.ConsumerConfig:
    """Never given up on: a dead-letter entry that cannot be stored now is tried again later."""
    return api.ConsumerConfig(
        durable_name=durable(config, service), filter_subject=subject(config, service),
        ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL, ack_wait=30.0, max_deliver=-1,
    )


async def provision(js: Any, config: Config, services: list[str]) -> None:
    """Create or update the advisory stream and the consumers of ``services``.

    An update adds subjects and never drops one: two deployments sharing a dead-letter stream (two
    configs on one broker) must not take each other's advisories away.
    """
    wanted = stream_config(config)
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("stream.created", stream=wanted.name, subjects=wanted.subjects)
    else:
        wanted.subjects = sorted({*(info.config.subjects or []), *(wanted.subjects or [])})
        await js.update_stream(wanted)
    for service in services:
        await js.add_consumer(wanted.name, consumer_config(config, service))


class AdvisoryWatcher:
    """One worker's reader of its service's advisories (the workers of a service share the consumer)."""

    def __init__(self, nc: Any, config: Config, service: str, dead_letters: DeadLetters) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._config = config
        self._service = service
        self._dead_letters = dead_letters
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind to the service's advisory consumer; without one (never provisioned), listen live only.

        Any other failure to look it up (a cluster electing the consumer's leader answers with a
        timeout or a 503) must not stop the worker from starting: the fetch loop keeps trying.
        """
        name, consumer = stream_name(self._config), durable(self._config, self._service)
        try:
            await self._js.consumer_info(name, consumer)
        except NotFoundError:
            log.error("dlq.advisories_not_provisioned", stream=name, consumer=consumer, hint="run 'jetpool provision'")
            self._sub = await self._nc.subscribe(subject(self._config, self._service),
                                                 queue=f"jetpool-dlq-{self._service}", cb=self._on_live)
            return
        except Exception as exc:
            log.warning("dlq.advisories_unavailable", stream=name, consumer=consumer, error=repr(exc))
        self._sub = await self._js.pull_subscribe_bind(durable=consumer, stream=name)
        self._task = asyncio.create_task(self._run(), name=f"advisories-{self._service}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _run(self) -> None:
        while True:
            try:
                msgs = await self._sub.fetch(_FETCH, timeout=_FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                continue
            except Exception as exc:  # reconnecting, or the consumer is gone for a while: keep trying
                log.warning("dlq.advisories_fetch_failed", service=self._service, error=repr(exc))
                await asyncio.sleep(_RETRY_S)
                continue
            for msg in msgs:
                await self._settle(msg)

    async def _dead_letter(self, data: bytes, keep_body: bool = True) -> str:
        """Store the entry an advisory asks for: "stored", "unreadable" or "failed" (logged, never raised)."""
        advisory = self._advisory(data)
        if advisory is None:
            log.error("dlq.advisory_unreadable", service=self._service, data=data[:200])
            return "unreadable"
        try:
            await self._dead_letters.from_advisory(self._js, advisory, self._service, keep_body=keep_body)
        except Exception as exc:
            log.error("dlq.advisory_failed", service=self._service, error=repr(exc), body_kept=keep_body)
            return "failed"
        return "stored"

    def _advisory(self, data: bytes) -> dict[str, Any] | None:
        """The advisory's fields, if it is one about this service's stream."""
        try:
            advisory = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(advisory, dict):
            return None
        stream, seq = advisory.get("stream"), advisory.get("stream_seq")
        if stream != self._config.services[self._service].stream or type(seq) is not int or seq <= 0:
            return None
        return advisory

    async def _settle(self, msg: Any) -> None:
        """Ack once the entry is stored; an unreadable advisory is termed, a failed write nakked."""
        last_resort = _delivered(msg) >= _LAST_RESORT_AFTER
        result = await self._dead_letter(msg.data, keep_body=not last_resort)
        if result == "stored":
            await msg.ack()
        elif result == "unreadable":
            await msg.term()
        else:
            await msg.nak(delay=_NAK_DELAY_S)

    async def _on_live(self, msg: Any) -> None:
        """The fallback subscription: nothing to settle, and a failure must not end the subscription."""
        await self._dead_letter(msg.data)


def _delivered(msg: Any) -> int:
    """How often this advisory has been delivered (1 on the first try)."""
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message (the live fallback has no metadata)
        return 1
