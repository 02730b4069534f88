"""Failure semantics on a real nats-server: retries, dead letters, bad input, timeouts, breakers.

Every test counts: attempts (from the engine's JSON log and the consumer's delivery counters),
dead-letter entries (read back from the DLQ stream) and outputs (Pongs by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from engine import advisories
from engine.config import load_config
from tests.support import (
    FAILING,
    App,
    Engine,
    consumer_info,
    count,
    dlq,
    expected_pong_ids,
    get,
    pings,
    port_of,
    publish,
    publish_raw,
    read,
    run_cli,
    settled,
    stream_info,
    total,
    wait_for,
    with_dlq,
    with_http,
)

StartEngine = Callable[..., Engine]


def failures_of(run: Engine, event_id: str) -> list[dict[str, Any]]:
    return [r for r in run.records("event.failed") if r.get("event_id") == event_id]


def test_poison_event_gets_max_deliver_attempts_then_one_dlq_entry(make_config: Callable[..., App],
                                                                    engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}, "max_deliver": 4,
                                         "retry": {"delays_s": [0.1]}}}))
    run = engine(app)
    poison = pings(1, poison=True)[0]
    good = pings(50)
    acks = publish(app, [*good[:25], poison, *good[25:]])

    wait_for(lambda: len(dlq(app)) >= 1, 60, "the DLQ entry", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)

    entries = dlq(app)
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.service, entry.route, entry.error_type, entry.attempts) == ("echo", "Ping", "RuntimeError", 4)
    assert entry.error == f"poison event {poison.id}"
    assert entry.subject == app.subject("Ping") and entry.stream == app.stream
    assert entry.stream_seq == acks[25]["seq"]
    assert entry.body == poison.encode()
    assert entry.first_failure < entry.last_failure  # the first attempt's failure, from the bucket
    outcomes = [(r["attempt"], r["outcome"]) for r in failures_of(run, poison.id)]
    assert outcomes == [(1, "retry"), (2, "retry"), (3, "retry"), (4, "dead_letter")]
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(good)


def test_bad_input_is_dead_lettered_on_first_delivery_and_traffic_flows(make_config: Callable[..., App],
                                                                         engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"},
                                         "max_event_bytes": 2048}}))
    run = engine(app)
    pid_before = run.worker_pids()
    subject = app.subject("Ping")
    good = pings(40)
    publish(app, good[:20])
    publish_raw(app, subject, b"\x00\x01 not json")
    publish_raw(app, subject, b'["a", "list"]')
    publish_raw(app, subject, b'{"id": "m1", "type": "Ping"}')
    publish_raw(app, subject, b'{"id": "m2", "type": "Ping", "data": "not an object"}')
    publish_raw(app, subject, b'{"id": "m3", "type": "Nope", "data": {}}')
    publish_raw(app, subject, b'{"id": "m4", "type": "Ping", "data": {"pad": "' + b"x" * 4000 + b'"}}')
    publish(app, [pings(1, reject=True)[0], *good[20:]])

    wait_for(lambda: len(dlq(app)) >= 7, 60, "7 DLQ entries", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    entries = dlq(app)
    assert len(entries) == 7
    assert all(e.attempts == 1 and e.first_failure == e.last_failure for e in entries)
    reasons = [f"{e.error_type}: {e.error}" for e in entries]
    assert reasons[0].startswith("MalformedEvent: body is not JSON")
    assert reasons[1] == "MalformedEvent: body must be a JSON object, got list"
    assert reasons[2] == "MalformedEvent: field 'data' is missing"
    assert reasons[3] == "MalformedEvent: field 'data' must be an object, got str"
    assert reasons[4] == (f"MalformedEvent: event type 'Nope' does not match subject '{subject}', "
                          "which carries 'Ping'")
    assert reasons[5].startswith("MalformedEvent: payload of ") and "exceeds max_event_bytes (2048)" in reasons[5]
    assert reasons[6] == "Reject: card number is not valid"
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(good)
    assert run.worker_pids() == pid_before  # no worker crashed
    # 47 messages went in and 47 deliveries came out: none was delivered twice (num_redelivered, which
    # counts only redelivered messages still pending, would say 0 here whatever happened).
    assert consumer_info(app, "echo").delivered.consumer_seq == 47


def test_retry_naks_with_delay_then_succeeds(make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}}}),
                   http={"port": 0, "host": "127.0.0.1"})
    run = engine(app)
    sent = pings(10, retry_once=True)
    publish(app, sent)
    wait_for(lambda: count(app, "Pong") >= 10, 60, "10 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(sent)
    assert [r["delay_s"] for r in run.records("event.failed")] == [0.2] * 10
    assert dlq(app) == []
    port = port_of(run)
    wait_for(lambda: total(get(port, "/metrics")[1], "jetpool_redeliveries_total", service="echo") == 10, 10,
             "10 redeliveries counted (one per retried Ping)", detail=lambda: get(port, "/metrics")[1])


def test_hanging_handler_is_cancelled_at_its_timeout_and_worker_keeps_consuming(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}, "handler_timeout_s": 1,
                                         "max_deliver": 2, "retry": {"delays_s": [0.1]}}}))
    run = engine(app)
    hung = pings(1, hang=True)[0]
    publish(app, [hung])
    good = pings(30)
    publish(app, good)
    wait_for(lambda: count(app, "Pong") >= 30, 60, "30 Pongs while one handler hangs", detail=run.tail)
    wait_for(lambda: len(dlq(app)) == 1, 60, "the hung event in the DLQ", detail=run.tail)
    entry = dlq(app)[0]
    assert (entry.error_type, entry.attempts) == ("HandlerTimeout", 2)
    assert [r["outcome"] for r in failures_of(run, hung.id)] == ["retry", "dead_letter"]


def test_slow_handler_past_ack_wait_is_not_redelivered(make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}, "ack_wait_s": 1.5,
                                         "handler_timeout_s": 20}}))
    run = engine(app)
    sent = pings(3, sleep_s=5)
    publish(app, sent)
    wait_for(lambda: count(app, "Pong") >= 3, 60, "3 slow Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 30, "the consumer to settle", detail=run.tail)
    info = consumer_info(app, "echo")
    assert info.delivered.consumer_seq == 3 and info.num_redelivered == 0  # in-progress acks held them
    assert len(read(app, "Pong")) == 3


def test_open_breaker_parks_events_instead_of_dead_lettering_them(make_config: Callable[..., App],
                                                                  engine: StartEngine, tmp_path: Path) -> None:
    control = tmp_path / "outage"
    control.touch()  # the dependency starts down
    app = with_dlq(
        make_config({"echo": {"routes": {"Ping": f"{FAILING}:through_breaker"}, "max_deliver": 3,
                              "breakers": ["dependency"], "settings": {"control_file": str(control)},
                              "retry": {"delays_s": [0.2]}, "max_in_flight": 64, "batch": 16}}),
        breakers={"dependency": {"fail_max": 3, "reset_timeout_s": 1.0}}, http={"port": 0, "host": "127.0.0.1"})
    run = engine(app)
    port = port_of(run)
    sent = pings(300)
    publish(app, sent)
    wait_for(lambda: any(r.get("event") == "breaker.open" for r in run.records()) or
             len(run.records("event.failed")) >= 2, 30, "the breaker to trip", detail=run.tail)
    # Down for a while: nothing may be dead-lettered, nothing may be acked.
    wait_for(lambda: consumer_info(app, "echo").num_pending > 0, 10, "events waiting in the stream")
    asyncio.run(asyncio.sleep(4))
    metrics = get(port, "/metrics")[1]
    assert total(metrics, "jetpool_breaker_state", breaker="dependency") in (1, 2)  # open or trying
    assert total(metrics, "jetpool_events_handled_total", outcome="parked") > 0
    assert dlq(app) == []
    assert count(app, "Pong") == 0
    control.unlink()  # the dependency recovers
    wait_for(lambda: count(app, "Pong") >= 300, 90, "all 300 Pongs after recovery", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    assert dlq(app) == []
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(sent)
    # Only the calls that tripped the breaker burned a delivery attempt: deliveries beyond the 300 sent.
    assert consumer_info(app, "echo").delivered.consumer_seq - 300 <= 5


def test_a_drain_releases_parked_events_at_once_instead_of_waiting_for_the_deadline(
        make_config: Callable[..., App], engine: StartEngine, tmp_path: Path) -> None:
    """Parked events wait for a breaker, not a handler: SIGTERM hands them back before the drain's wait."""
    control = tmp_path / "outage"
    control.touch()  # the dependency is down: every event ends up parked
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:through_breaker"}, "breakers": ["dependency"],
                                         "settings": {"control_file": str(control)}, "retry": {"delays_s": [0.2]},
                                         "max_in_flight": 32, "batch": 16, "drain_timeout_s": 4}}),
                   breakers={"dependency": {"fail_max": 2, "reset_timeout_s": 1.0}})
    run = engine(app)
    publish(app, pings(50))
    wait_for(lambda: consumer_info(app, "echo").num_ack_pending >= 30, 30, "a full window parked", detail=run.tail)
    run.send(signal.SIGTERM)
    assert run.wait_exit(30) == 0, run.tail()
    drained = run.records("consumer.drained")
    assert len(drained) == 1, run.tail()
    # Released when the drain began: none was still in flight when its wait ended.
    assert drained[0]["unfinished"] == 0 and drained[0]["released"] >= 30, drained
    assert dlq(app) == [] and count(app, "Pong") == 0


def test_a_breaker_left_open_with_nothing_parked_still_gets_its_trial(make_config: Callable[..., App],
                                                                     engine: StartEngine, tmp_path: Path) -> None:
    """Parked events whose retries fail before reaching the breaker settle elsewhere; pulling must go on.

    pybreaker leaves "open" only when called, so a consumer that waited for it to close with nothing
    parked would never pull again (and its liveness would not notice: it has no pull outstanding).
    """
    control = tmp_path / "outage"
    early = control.with_suffix(".early")
    control.touch()
    app = with_dlq(
        make_config({"echo": {"routes": {"Ping": f"{FAILING}:fails_early_or_through_breaker"}, "max_deliver": 100,
                              "breakers": ["dependency"], "settings": {"control_file": str(control)},
                              "retry": {"delays_s": [0.05]}, "max_in_flight": 8, "batch": 8}}),
        breakers={"dependency": {"fail_max": 2, "reset_timeout_s": 0.5}})
    run = engine(app)
    sent = pings(40)
    publish(app, sent)
    wait_for(lambda: any(r.get("event") == "breaker.open" for r in run.records()), 30, "the breaker to trip",
             detail=run.tail)
    early.touch()  # the parked events' trials now fail before they reach the breaker, and settle as naks

    def early_failures() -> int:
        return sum("before calling" in str(r.get("reason")) for r in run.records("event.failed"))

    # More early failures than the window holds: the consumer kept pulling after its parked events were gone.
    wait_for(lambda: early_failures() > 8, 30, "pulls to go on after the parked events settled", detail=run.tail)
    early.unlink()
    control.unlink()
    wait_for(lambda: count(app, "Pong") >= 40, 60, "all 40 Pongs after recovery", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 30, "the consumer to settle", detail=run.tail)
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(sent)
    assert dlq(app) == []


def test_a_deleted_consumer_is_reported_once_not_on_every_repull(make_config: Callable[..., App],
                                                                  engine: StartEngine) -> None:
    """The ticker re-pulls every tick; the server's same answer each time is one log line, not one a tick.

    Meanwhile the pod is unready (alive, but consuming nothing), and ready again once the consumer is back.
    """
    app = with_http(make_config({"echo": {"idle_heartbeat_s": 0.5}}))  # a tick every 0.25 s
    run = engine(app)
    port = port_of(run)
    publish(app, pings(3))
    wait_for(lambda: count(app, "Pong") >= 3, 30, "3 Pongs", detail=run.tail)

    async def delete() -> None:
        nc = await nats.connect(app.url)
        try:
            await nc.jetstream().delete_consumer(app.stream, app.durable("echo"))
        finally:
            await nc.close()

    asyncio.run(delete())

    def statuses() -> list[str]:
        return [str(r.get("status")) for r in run.records("pull.status")]

    wait_for(lambda: "503" in statuses(), 10, "the re-pulls to find no consumer", detail=run.tail)
    asyncio.run(asyncio.sleep(2))  # about eight more re-pulls, all answered 503
    assert statuses().count("503") == 1, statuses()
    assert statuses().count("409") <= 1  # "Consumer Deleted", for the pull that was open
    wait_for(lambda: get(port, "/ready")[0] == 503, 10, "/ready 503 without a consumer", detail=run.tail)
    assert get(port, "/health")[0] == 200

    provisioned = run_cli(["provision", "-c", str(app.path)], env={"JETPOOL_NATS_URL": app.url})
    assert provisioned.returncode == 0, provisioned.stderr
    wait_for(lambda: get(port, "/ready")[0] == 200, 15, "/ready 200 once the consumer is back", detail=run.tail)
    publish(app, pings(3, batch=2))
    wait_for(lambda: count(app, "Pong") >= 6, 30, "3 more Pongs", detail=run.tail)


def test_worker_killed_on_every_attempt_is_caught_by_the_max_deliveries_advisory(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}, "max_deliver": 2,
                                         "ack_wait_s": 1.5}}),
                   supervisor={"restart_backoff_s": 0.1, "restart_backoff_max_s": 0.5, "max_restarts": 20})
    run = engine(app)
    killer = pings(1, kill=True)[0]
    publish(app, [killer])
    wait_for(lambda: len(dlq(app)) == 1, 60, "the advisory's DLQ entry", detail=run.tail)
    entry = dlq(app)[0]
    assert entry.error_type == "MaxDeliveriesExceeded"
    assert entry.attempts == 2 and entry.route == "Ping" and entry.body == killer.encode()
    good = pings(5)
    publish(app, good)
    wait_for(lambda: count(app, "Pong") >= 5, 60, "traffic after the crashes", detail=run.tail)


def advisory_stream(app: App) -> str:
    return advisories.stream_name(load_config(app.path, env={}))


async def _deliver_without_ack(app: App, times: int, ack_wait_s: float) -> int:
    """Be the service's workers dying on every attempt: take each delivery and never answer it.

    One more pull after the last attempt expired makes the server give up on the message and publish
    its MAX_DELIVERIES advisory while no jetpool worker is running. Returns the advisories stored.
    """
    nc = await nats.connect(app.url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(durable=app.durable("echo"), stream=app.stream)
        for _ in range(times):
            assert len(await sub.fetch(1, timeout=10)) == 1
            await asyncio.sleep(ack_wait_s + 0.5)
        with contextlib.suppress(nats.errors.TimeoutError):
            assert await sub.fetch(1, timeout=2) == [], "redelivered beyond max_deliver"
        for _ in range(50):
            stored = (await js.stream_info(advisory_stream(app))).state.messages
            if stored:
                return int(stored)
            await asyncio.sleep(0.1)
        return 0
    finally:
        await nc.close()


def test_an_advisory_fired_while_no_worker_runs_is_dead_lettered_when_one_starts(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}, "max_deliver": 2,
                                         "ack_wait_s": 1}}))
    provisioned = run_cli(["provision", "-c", str(app.path)], env={"JETPOOL_NATS_URL": app.url})
    assert provisioned.returncode == 0, provisioned.stderr
    lost = pings(1)[0]
    publish(app, [lost])
    assert asyncio.run(_deliver_without_ack(app, times=2, ack_wait_s=1)) == 1

    run = engine(app, args=["--no-provision"])
    wait_for(lambda: len(dlq(app)) == 1, 30, "the stored advisory's DLQ entry", detail=run.tail)
    entry = dlq(app)[0]
    assert entry.error_type == "MaxDeliveriesExceeded"
    assert entry.attempts == 2 and entry.body == lost.encode()
    wait_for(lambda: stream_info(app, advisory_stream(app)).state.messages == 0, 30,
             "the handled advisory to leave its work queue", detail=run.tail)


def test_without_its_advisory_consumer_a_worker_says_so_and_still_catches_advisories_live(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}, "max_deliver": 2,
                                         "ack_wait_s": 1.5}}),
                   supervisor={"restart_backoff_s": 0.1, "restart_backoff_max_s": 0.5, "max_restarts": 20})
    provisioned = run_cli(["provision", "-c", str(app.path)], env={"JETPOOL_NATS_URL": app.url})
    assert provisioned.returncode == 0, provisioned.stderr
    asyncio.run(_delete_consumer(app, advisory_stream(app), f"{app.stream}_echo"))

    run = engine(app, args=["--no-provision"])
    assert [r["consumer"] for r in run.records("dlq.advisories_not_provisioned")] == [f"{app.stream}_echo"]
    killer = pings(1, kill=True)[0]
    publish(app, [killer])
    wait_for(lambda: len(dlq(app)) == 1, 60, "the live advisory's DLQ entry", detail=run.tail)
    assert dlq(app)[0].error_type == "MaxDeliveriesExceeded"


async def _delete_consumer(app: App, stream: str, consumer: str) -> None:
    nc = await nats.connect(app.url)
    try:
        await nc.jetstream().delete_consumer(stream, consumer)
    finally:
        await nc.close()


def test_dlq_cli_lists_shows_replays_and_purges(make_config: Callable[..., App], engine: StartEngine,
                                                tmp_path: Path) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}}}))
    run = engine(app)
    rejected = pings(3, reject=True)
    publish(app, rejected)
    wait_for(lambda: len(dlq(app)) == 3, 60, "3 DLQ entries", detail=run.tail)
    cfg = ["-c", str(app.path)]

    listed = run_cli(["dlq", "list", *cfg])
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("Reject: card number is not valid") == 3
    as_json = run_cli(["dlq", "list", "--json", "--service", "echo", *cfg])
    ids = [e["id"] for e in json.loads(as_json.stdout)]
    assert len(ids) == 3
    shown = json.loads(run_cli(["dlq", "show", "--json", str(ids[0]), *cfg]).stdout)
    assert shown["body"]["id"] in {e.id for e in rejected} and shown["error_type"] == "Reject"
    missing = run_cli(["dlq", "show", "999999", *cfg])
    assert missing.returncode == 2 and "no dead-letter entry 999999" in missing.stderr

    # Replay one entry twice: the second run finds nothing to replay and stores nothing twice.
    stored_before = count(app, "Ping")
    assert run_cli(["dlq", "replay", str(ids[0]), *cfg]).returncode == 0
    assert count(app, "Ping") == stored_before + 1
    again = run_cli(["dlq", "replay", str(ids[0]), *cfg])
    assert again.returncode == 2 and count(app, "Ping") == stored_before + 1
    wait_for(lambda: len(dlq(app)) == 3, 60, "the replayed reject to be dead-lettered again")

    purged = run_cli(["dlq", "purge", "--json", *cfg])
    assert json.loads(purged.stdout) == {"purged": 3}
    assert dlq(app) == []
    assert os.path.exists(app.path)
