"""Create or update the configured streams and durable consumers; safe to run again and again.

Run by ``jetpool provision`` and, unless told otherwise, by the supervisor before it starts workers,
so a fresh broker needs no manual setup. Existing streams are updated in place (subjects, limits);
existing consumers are updated through the create-or-update consumer API.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
from nats.js import api
from nats.js.errors import NotFoundError

from engine import advisories
from engine.config import Config, StreamConfig
from engine.deadletter import FAILURES_BUCKET, dlq_stream_config, failures_bucket, failures_stream_config
from engine.errors import BrokerError
from engine.outcome import RetryPolicy, redelivery_horizon_s
from engine.state import direct_gets_for, open_buckets

log = structlog.get_logger("jetpool.provision")


def stream_config(cfg: StreamConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=cfg.name,
        subjects=list(cfg.subjects),
        storage=api.StorageType.FILE if cfg.storage == "file" else api.StorageType.MEMORY,
        num_replicas=cfg.replicas,
        duplicate_window=cfg.duplicate_window_s,
        max_msg_size=cfg.max_msg_size,
        max_age=cfg.max_age_s,
        max_bytes=cfg.max_bytes or -1,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.NEW if cfg.discard == "new" else api.DiscardPolicy.OLD,
    )


def consumer_config(config: Config, service: str) -> api.ConsumerConfig:
    svc = config.services[service]
    subjects = config.filter_subjects(service)
    return api.ConsumerConfig(
        durable_name=config.durable(service),
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=svc.ack_wait_s,
        max_deliver=svc.max_deliver,
        max_ack_pending=svc.effective_max_ack_pending,
        max_waiting=max(512, svc.workers * svc.replicas * (svc.max_in_flight // max(1, svc.batch) + 2)),
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
    )


def short_duplicate_windows(config: Config) -> list[dict[str, Any]]:
    """Streams whose ``duplicate_window_s`` ends before a service's last redelivery could.

    Outputs go to whichever configured stream captures their type, so every stream is held to every
    service's horizon. A warning, not an error: only a redelivery that late (every attempt used,
    each to its limit) would store an output twice.
    """
    short = []
    for name, svc in config.services.items():
        policy = RetryPolicy(svc.retry.base_s, svc.retry.max_s, tuple(svc.retry.delays_s or ()))
        horizon = redelivery_horizon_s(svc.max_deliver, svc.ack_wait_s, svc.handler_timeout_s, policy)
        short += [{"stream": stream.name, "duplicate_window_s": stream.duplicate_window_s, "service": name,
                   "redelivery_horizon_s": round(horizon, 1)}
                  for stream in config.streams if stream.duplicate_window_s < horizon]
    return short


async def provision(js: Any, config: Config, services: Iterable[str] | None = None) -> None:
    """Ensure every stream and the consumers of ``services`` (default: all) exist as configured."""
    for short in short_duplicate_windows(config):
        log.warning("stream.duplicate_window_short", **short,
                    hint="a redelivery after the window stores its outputs again; raise duplicate_window_s")
    for stream in config.streams:
        await ensure_stream(js, stream)
    await _ensure(js, dlq_stream_config(config))
    await _ensure(js, failures_stream_config(failures_bucket(config)), keep_storage=True)
    await open_buckets(js, config.state, create=True)
    for name, bucket in config.state.items():
        await _tune_bucket(js, name, bucket.max_bytes)
    for warning in store_warnings(config):
        log.warning("store.may_fill", **warning)
    wanted = list(services if services is not None else config.services)
    try:
        await advisories.provision(js, config, wanted)
    except Exception as exc:
        raise BrokerError(f"cannot provision the advisory stream {advisories.stream_name(config)!r}: {exc}") from exc
    for service in wanted:
        svc = config.services[service]
        try:
            await js.add_consumer(svc.stream, consumer_config(config, service))
        except Exception as exc:
            raise BrokerError(f"cannot create consumer {config.durable(service)!r} on {svc.stream!r}: {exc}") from exc
        log.info("consumer.ready", service=service, stream=svc.stream, durable=config.durable(service))


async def ensure_stream(js: Any, cfg: StreamConfig) -> None:
    await _ensure(js, stream_config(cfg))


async def _ensure(js: Any, wanted: api.StreamConfig, keep_storage: bool = False) -> None:
    """Create the stream, or update it in place (``keep_storage``: on whatever storage it has, which an
    update cannot change — the first-failure bucket moved from memory to file)."""
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("stream.created", stream=wanted.name, subjects=wanted.subjects)
        return
    if keep_storage:
        wanted.storage = info.config.storage
    try:
        await js.update_stream(wanted)
    except Exception as exc:
        raise BrokerError(f"cannot update stream {wanted.name!r}: {exc}") from exc


async def _tune_bucket(js: Any, name: str, max_bytes: int | None) -> None:
    """Give a state bucket's stream the configured size limit (a KV bucket is created without one), and
    direct gets when it has one replica (workers read by them, engine/kv.py; never on a replicated
    bucket, where a replica behind the leader would answer: engine.state.direct_gets_for)."""
    info = await js.stream_info(f"KV_{name}")
    wanted = max_bytes or -1
    direct = direct_gets_for(info.config.num_replicas or 1)
    if (info.config.max_bytes or -1) != wanted or bool(info.config.allow_direct) != direct:
        info.config.max_bytes = wanted
        info.config.allow_direct = direct
        await js.update_stream(info.config)


def store_warnings(config: Config) -> list[dict[str, Any]]:
    """What the config may store against the broker's JetStream limits (``nats.max_*_store_bytes``).

    Per storage kind with a known limit: every stream and bucket without ``max_bytes`` (it can fill
    the store on its own), and the sum of the limits when it exceeds the store. Replicas live on
    different servers, so each server's store holds one copy of each.
    """
    dlq = config.dead_letter
    holders: list[tuple[str, str, int | None]] = [(s.name, s.storage, s.max_bytes) for s in config.streams]
    holders.append((dlq.stream, dlq.storage, dlq.max_bytes))
    holders += [(f"KV_{name}", b.storage, b.max_bytes) for name, b in config.state.items()]
    bucket = failures_bucket(config)
    holders.append((f"KV_{FAILURES_BUCKET}", bucket.storage, bucket.max_bytes))
    warnings: list[dict[str, Any]] = []
    for storage, limit in (("file", config.nats.max_file_store_bytes), ("memory", config.nats.max_memory_store_bytes)):
        mine = [(name, size) for name, kind, size in holders if kind == storage]
        if limit is None or not mine:
            continue
        unbounded = sorted(name for name, size in mine if size is None)
        if unbounded:
            warnings.append({"storage": storage, "store_bytes": limit, "unbounded": unbounded,
                             "hint": "set max_bytes so that they fit the store together"})
        total = sum(size or 0 for _, size in mine)
        if total > limit:
            warnings.append({"storage": storage, "store_bytes": limit, "max_bytes_total": total,
                             "hint": "the streams' and buckets' max_bytes add up to more than the store holds"})
    return warnings
