"""`jetpool provision` on a real nats-server: creates what the config says, and is safe to repeat."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats
from nats.js import api

from engine.logs import json_records
from tests.support import App, consumer_info, count, pings, publish, run_cli, stream_info


def provision(app: App, *extra: str) -> None:
    result = run_cli(["provision", "-c", str(app.path), *extra])
    assert result.returncode == 0, result.stderr


def test_provision_is_idempotent_and_applies_the_configured_limits(make_config: Callable[..., App]) -> None:
    app = make_config({"echo": {"workers": 2, "batch": 16, "max_in_flight": 64, "max_ack_pending": 256,
                                "ack_wait_s": 7, "max_deliver": 4}},
                      stream={"duplicate_window_s": 90})
    provision(app)
    publish(app, pings(5))
    provision(app)  # again, with messages waiting: nothing is recreated or reset

    stream = stream_info(app)
    assert stream.config.subjects == [f"{app.prefix}.>"]
    assert stream.config.duplicate_window == 90
    assert stream.config.storage == api.StorageType.FILE
    assert stream.state.messages == 5

    info = consumer_info(app, "echo")
    assert info.config.durable_name == "echo"
    assert info.config.ack_policy == api.AckPolicy.EXPLICIT
    assert info.config.ack_wait == 7
    assert info.config.max_deliver == 4
    assert info.config.max_ack_pending == 256
    assert info.config.filter_subject == app.subject("Ping")
    assert info.num_pending == 5  # the second provision kept the consumer's position
    assert info.num_ack_pending == 0


def test_provision_updates_an_existing_consumer_in_place(make_config: Callable[..., App]) -> None:
    app = make_config()
    provision(app)
    publish(app, pings(3))
    routes = {"Ping": "handlers.examples:echo", "Pang": "handlers.examples:sink"}
    changed = make_config({"echo": {"ack_wait_s": 20, "max_deliver": 9, "routes": routes}}, same_names_as=app)
    provision(changed)
    info = consumer_info(app, "echo")
    assert (info.config.ack_wait, info.config.max_deliver) == (20, 9)
    assert sorted(info.config.filter_subjects or []) == sorted([app.subject("Ping"), app.subject("Pang")])
    assert info.num_pending == 3
    assert count(app, "Ping") == 3


def test_provision_takes_the_url_from_the_command_line(make_config: Callable[..., App]) -> None:
    app = make_config(url="nats://127.0.0.1:1")  # nothing listens there
    real_url = make_config().url
    result = run_cli(["provision", "-c", str(app.path), "--nats-url", real_url])
    assert result.returncode == 0, result.stderr
    assert consumer_info(App(app.path, real_url, app.stream, app.prefix, app.raw), "echo").config.durable_name == "echo"



def test_two_deployments_sharing_a_dead_letter_stream_keep_each_others_advisories(
        make_config: Callable[..., App]) -> None:
    first, second = make_config(), make_config()  # own streams, the default dead-letter stream DLQ
    provision(first)
    provision(second)
    provision(second)  # re-provisioning one deployment must not drop the other's subject either
    advisory = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
    subjects = set(stream_info(first, "DLQ_ADVISORIES").config.subjects)
    assert {f"{advisory}.{first.stream}.echo", f"{advisory}.{second.stream}.echo"} <= subjects
    for app in (first, second):  # both services are named echo: their advisory consumers must differ
        info = asyncio.run(_advisory_consumer(app))
        assert info.config.filter_subject == f"{advisory}.{app.stream}.echo"


async def _advisory_consumer(app: App) -> Any:
    nc = await nats.connect(app.url)
    try:
        return await nc.jetstream().consumer_info("DLQ_ADVISORIES", f"{app.stream}_echo")
    finally:
        await nc.close()


def test_provision_warns_of_a_duplicate_window_shorter_than_the_redelivery_horizon(
        make_config: Callable[..., App]) -> None:
    app = make_config({"echo": {"max_deliver": 3, "ack_wait_s": 20}}, stream={"duplicate_window_s": 30})
    result = run_cli(["provision", "-c", str(app.path)])
    assert result.returncode == 0, result.stderr  # a warning: the stream is still provisioned as configured
    (warning,) = [r for r in json_records(result.stdout + result.stderr)
                  if r.get("event") == "stream.duplicate_window_short"]
    # Two redeliveries, each after max(ack_wait_s 20, handler_timeout_s 10 + backoff <= 1 s).
    assert (warning["stream"], warning["service"], warning["duplicate_window_s"], warning["redelivery_horizon_s"]) == (
        app.stream, "echo", 30.0, 40.0)
    assert stream_info(app).config.duplicate_window == 30


def test_the_first_failure_bucket_gets_a_ttl_and_a_size_limit_also_when_it_existed_without(
        make_config: Callable[..., App], private_server: Any) -> None:
    """Every message nakked once leaves a key there: an old bucket without limits (as nats-py creates a
    KV bucket) is given its TTL, size limit and discard-old by provision, and keeps working as a bucket."""
    app = make_config(url=private_server.url)

    async def old_bucket() -> None:
        nc = await nats.connect(app.url)
        try:
            await nc.jetstream().create_key_value(api.KeyValueConfig(bucket="jetpool_failures", history=1,
                                                                     storage=api.StorageType.MEMORY))
        finally:
            await nc.close()

    asyncio.run(old_bucket())
    assert stream_info(app, "KV_jetpool_failures").config.max_age in (None, 0, 0.0)
    provision(app)
    config = stream_info(app, "KV_jetpool_failures").config
    assert config.max_age == 24 * 3600.0 and config.max_bytes == 64 * 1024 * 1024
    assert config.discard == api.DiscardPolicy.OLD and config.storage == api.StorageType.MEMORY

    async def use() -> Any:
        nc = await nats.connect(app.url)
        try:
            kv = await nc.jetstream().key_value("jetpool_failures")
            await kv.create("echo.T.1", b'{"first": "x"}')
            return (await kv.get("echo.T.1")).value
        finally:
            await nc.close()

    assert asyncio.run(use()) == b'{"first": "x"}'
