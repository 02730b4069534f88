"""End to end on a real nats-server: Ping in, exactly one Pong out per Ping, bound to its input."""

from __future__ import annotations

from collections.abc import Callable

from engine.events import derived_id
from tests.support import (
    HANDLERS,
    App,
    Engine,
    consumer_info,
    count,
    expected_pong_ids,
    pings,
    publish,
    publish_raw,
    read,
    settled,
    wait_for,
)

StartEngine = Callable[..., Engine]


def test_handlers_of_one_worker_run_concurrently_up_to_the_window(make_config: Callable[..., App],
                                                                 engine: StartEngine) -> None:
    """Each handler returns only once 20 of them are inside at the same time, in one worker."""
    app = make_config({"echo": {"workers": 1, "max_in_flight": 32, "batch": 32,
                                "routes": {"Ping": f"{HANDLERS}:together"}}})
    run = engine(app)
    sent = pings(20, together=20)
    publish(app, sent)
    wait_for(lambda: count(app, "Pong") >= len(sent), 45, "20 Pongs from 20 handlers running at once",
             detail=run.tail)
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(sent)


def test_every_ping_yields_exactly_one_pong_bound_to_it(make_config: Callable[..., App],
                                                          engine: StartEngine) -> None:
    app = make_config({"echo": {"workers": 2}})
    run = engine(app)
    sent = pings(600, pad="x" * 50)
    publish(app, sent)

    wait_for(lambda: count(app, "Pong") >= len(sent), 90, "600 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)

    pongs = read(app, "Pong")
    assert len(pongs) == len(sent)
    by_id = {p.id: p for p in pongs}
    assert set(by_id) == expected_pong_ids(sent)
    for ping in sent:
        pong = by_id[derived_id(ping.encode(), 0)]
        assert pong.causation_id == ping.id
        assert pong.correlation_id == ping.id
        assert pong.trace_id == ping.trace_id
        assert pong.aggregate_id == ping.aggregate_id
        assert pong.data == ping.data
    info = consumer_info(app, "echo")
    assert info.delivered.consumer_seq == len(sent)  # nothing was delivered twice


def test_a_failing_handler_is_retried_then_acked(make_config: Callable[..., App], engine: StartEngine) -> None:
    app = make_config({"echo": {"routes": {"Ping": f"{HANDLERS}:flaky"}}})
    run = engine(app)
    sent = pings(20)
    publish(app, sent)

    wait_for(lambda: count(app, "Pong") >= len(sent), 60, "20 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)

    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(sent)
    assert consumer_info(app, "echo").delivered.consumer_seq == 2 * len(sent)  # failed once, then acked
    failures = run.records("event.failed")
    assert len(failures) == len(sent)
    assert {f["event_id"] for f in failures} == {e.id for e in sent}
    assert {(f["outcome"], f["attempt"]) for f in failures} == {("retry", 1)}
    assert all(f["reason"].startswith("RuntimeError: first attempt of ") for f in failures)


def test_malformed_input_is_terminated_not_redelivered(make_config: Callable[..., App], engine: StartEngine) -> None:
    app = make_config()
    run = engine(app)
    publish_raw(app, app.subject("Ping"), b"definitely not json")
    publish_raw(app, app.subject("Ping"), b'{"id": "x1", "type": "Ping"}')
    good = pings(3)
    publish(app, good)

    wait_for(lambda: count(app, "Pong") >= 3, 60, "3 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    assert {p.id for p in read(app, "Pong")} == expected_pong_ids(good)
    failures = wait_for(lambda: run.records("event.failed") if len(run.records("event.failed")) >= 2 else None,
                        30, "two event.failed log lines", detail=run.tail)
    assert [f["outcome"] for f in failures] == ["dead_letter", "dead_letter"]
    assert failures[0]["reason"].startswith("MalformedEvent: body is not JSON")
    assert failures[1]["reason"] == "MalformedEvent: field 'data' is missing"
    assert consumer_info(app, "echo").delivered.consumer_seq == 5  # each delivered once


def test_same_event_published_twice_yields_one_pong(make_config: Callable[..., App], engine: StartEngine) -> None:
    """A producer retry with a new Msg-Id stores the input twice; the engine handles both deliveries, but
    both publish the Pong under the same derived Nats-Msg-Id, so the stream keeps exactly one Pong."""
    app = make_config()
    run = engine(app)
    sent = pings(10)
    acks = publish(app, sent + sent, msg_ids=[f"first-{e.id}" for e in sent] + [f"again-{e.id}" for e in sent])
    assert not any(a.get("duplicate") for a in acks)  # both copies of every Ping are stored
    assert count(app, "Ping") == 20

    wait_for(lambda: consumer_info(app, "echo").delivered.consumer_seq >= 20, 60, "20 deliveries", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    pongs = read(app, "Pong")
    assert len(pongs) == 10
    assert {p.id for p in pongs} == expected_pong_ids(sent)


def test_redelivered_input_republishes_outputs_that_are_deduplicated(make_config: Callable[..., App],
                                                                     engine: StartEngine) -> None:
    """First delivery: the Pong is stored, then publishing a second output fails (no stream captures it),
    so the input is nakked. The redelivery publishes the same Pong again (same derived id): JetStream
    drops it as a duplicate, the second output is stored and the input is acked."""
    names = make_config()
    # The stream captures Ping, Pong and Pang only, so the first attempt's 'Lost' event has no stream.
    subjects = [names.subject(t) for t in ("Ping", "Pong", "Pang")]
    app = make_config({"echo": {"routes": {"Ping": f"{HANDLERS}:unstored_then_pong"}}},
                      stream={"subjects": subjects}, same_names_as=names)
    run = engine(app)
    sent = pings(15)
    publish(app, sent)

    wait_for(lambda: count(app, "Pang") >= len(sent), 90, "15 Pangs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)

    pongs, pangs = read(app, "Pong"), read(app, "Pang")
    assert len(pongs) == len(sent)
    assert {p.id for p in pongs} == expected_pong_ids(sent)
    assert {p.id for p in pangs} == {derived_id(e.encode(), 1) for e in sent}
    assert all(p.data["attempt"] >= 2 for p in pangs)
    assert consumer_info(app, "echo").delivered.consumer_seq >= 2 * len(sent)
    failures = run.records("event.failed")
    assert len(failures) >= len(sent)
    assert {f["event_id"] for f in failures} == {e.id for e in sent}
    assert all(f["outcome"] == "retry" and f["reason"].startswith("PublishError") for f in failures), failures[0]


def test_deduplication_only_holds_within_the_duplicate_window(make_config: Callable[..., App],
                                                              engine: StartEngine) -> None:
    """What the engine guarantees is one stored Pong per Ping id *within the stream's duplicate
    window*: the same input handled again after the window stores a second Pong with the same id, so
    downstream consumers that need exactly-once must still dedupe by event id."""
    app = make_config(stream={"duplicate_window_s": 1})
    run = engine(app)
    ping = pings(1)
    publish(app, ping, msg_ids=["copy-1"])
    wait_for(lambda: count(app, "Pong") == 1, 60, "the first Pong", detail=run.tail)

    # Wait until the server has forgotten the ids of everything stored before this probe.
    probe = pings(1)
    publish(app, probe, msg_ids=["probe"])
    wait_for(lambda: not publish(app, probe, msg_ids=["probe"])[0].get("duplicate"), 30,
             "the duplicate window to pass", interval_s=0.25)

    publish(app, ping, msg_ids=["copy-2"])
    wait_for(lambda: count(app, "Pong") >= 3, 60, "the Pongs of the late copy and the probes", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    pong_ids = [p.id for p in read(app, "Pong")]
    assert pong_ids.count(derived_id(ping[0].encode(), 0)) == 2
