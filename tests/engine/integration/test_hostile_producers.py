"""Hostile producers on a real nats-server: what a producer sends can end as a dead letter, never as a
dead worker, a wedged consumer, or another event's outputs dropped.

Each case publishes what an attacker holding a producer's credentials could, and checks the engine's
answer: one dead-letter entry (read back from the test's own DLQ stream), outputs by id, and the
worker that handled it still the same process (no exit, no restart).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Callable
from typing import Any

import nats
import orjson
import yaml

from engine.config import load_config
from engine.deadletter import DeadLetters, H
from engine.events import MSG_ID_HEADER, Event, derived_id
from engine.provision import provision
from engine.publisher import Publisher
from tests.support import App, Engine, count, pings, publish, publish_raw, read, settled, wait_for

StartEngine = Callable[..., Engine]
MAX_PAYLOAD = 1024 * 1024  # nats-server's default, which the session's server runs with
NEAR_LIMIT = 1_048_320  # a body that fits with its Nats-Msg-Id, but not with a dead-letter entry's headers


def with_dlq(app: App) -> App:
    raw = dict(app.raw)
    raw["dead_letter"] = {"stream": f"DLQ{app.stream}", "subject_prefix": f"dlq{app.prefix}"}
    app.path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dataclasses.replace(app, raw=raw)


def entries(app: App) -> list[Any]:
    """Every message of the test's DLQ stream (raw: body and headers)."""

    async def work() -> list[Any]:
        nc = await nats.connect(app.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(f"DLQ{app.stream}")
            return [await js.get_msg(f"DLQ{app.stream}", seq) for seq in
                    range(info.state.first_seq, info.state.last_seq + 1)] if info.state.messages else []
        finally:
            await nc.close()

    return asyncio.run(work())


def same_workers(run: Engine, before: dict[tuple[str, int], int]) -> None:
    assert run.worker_pids() == before, "a worker exited and was replaced"
    assert not run.records("worker.exited"), run.tail()


def test_a_body_near_the_size_limit_ends_as_one_cut_down_entry_and_no_worker_exits(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    """Not JSON, and a valid Ping whose Pong would not fit: each one entry, cut to fit, with the
    original's stream and sequence; the worker that handled both is still the same process."""
    app = with_dlq(make_config({"echo": {"max_event_bytes": MAX_PAYLOAD}}))
    run = engine(app)
    before = run.worker_pids()
    garbage = publish_raw(app, app.subject("Ping"), b"x" * NEAR_LIMIT)
    ping = Event("Ping", {"pad": ""})
    # With its Nats-Msg-Id the Ping just fits; its Pong adds a causation and a correlation id: it does not.
    ping.data["pad"] = "p" * (MAX_PAYLOAD - 80 - len(ping.encode()))
    [big] = publish(app, [ping])
    after = pings(5)
    publish(app, after)

    wait_for(lambda: len(entries(app)) >= 2 and count(app, "Pong") >= 5, 60, "2 entries and 5 Pongs",
             detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    stored = {int(e.headers[H + "Stream-Seq"]): e for e in entries(app)}
    assert sorted(stored) == [garbage["seq"], big["seq"]]
    for seq, size in ((garbage["seq"], NEAR_LIMIT), (big["seq"], len(ping.encode()))):
        entry = stored[seq]
        assert entry.headers[H + "Body-Truncated"] == str(size)
        assert entry.headers[H + "Stream"] == app.stream and entry.headers[H + "Attempts"] == "1"
        assert len(entry.data) < size
    assert stored[garbage["seq"]].headers[H + "Error-Type"] == "MalformedEvent"
    assert stored[big["seq"]].headers[H + "Error-Type"] == "PayloadTooLarge"
    assert "exceeds the server's max_payload" in stored[big["seq"]].headers[H + "Error"]
    assert {p.id for p in read(app, "Pong")} == {derived_id(e.encode(), 0) for e in after}
    same_workers(run, before)


def raw_hpub(url: str, subject: str, headers: list[tuple[str, str]], body: bytes) -> None:
    """Publish with header names no client library would send (``X/Trace``), over a plain socket."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    block = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
                     + f"HPUB {subject} {len(block)} {len(block) + len(body)}\r\n".encode() + block + body
                     + b"\r\nPING\r\n")
        reply = b""
        deadline = time.monotonic() + 5
        while b"PONG" not in reply and time.monotonic() < deadline:
            reply += sock.recv(4096)
        assert b"PONG" in reply and b"-ERR" not in reply, reply


def test_producer_control_headers_and_refused_names_do_not_stop_dead_lettering(
        make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config())
    run = engine(app)
    before = run.worker_pids()
    forged = [("Nats-Msg-Id", "h-1"), ("Nats-Expected-Stream", app.stream), (H + "Service", "forged")]
    raw_hpub(app.url, app.subject("Ping"), forged, b"not json 1")
    raw_hpub(app.url, app.subject("Ping"), [("Nats-Msg-Id", "h-2"), ("X/Trace", "1"), ("X-Kept", "yes")],
             b"not json 2")
    good = pings(3)
    publish(app, good)

    wait_for(lambda: len(entries(app)) >= 2 and count(app, "Pong") >= 3, 60, "2 entries and 3 Pongs",
             detail=run.tail)
    stored = entries(app)
    assert [e.data for e in stored] == [b"not json 1", b"not json 2"]
    assert [e.headers[H + "Original-Msg-Id"] for e in stored] == ["h-1", "h-2"]
    assert all(e.headers[H + "Service"] == "echo" for e in stored)
    assert "Nats-Expected-Stream" not in stored[0].headers and "X/Trace" not in stored[1].headers
    assert stored[1].headers["X-Kept"] == "yes"
    assert not run.records("dlq.write_failed"), run.tail()
    same_workers(run, before)


def test_two_events_claiming_one_id_each_get_their_outputs(make_config: Callable[..., App],
                                                           engine: StartEngine) -> None:
    app = make_config()
    run = engine(app)
    first = Event("Ping", {"order": "A"}, aggregate_id="A")
    second = dataclasses.replace(first, data={"order": "B"}, aggregate_id="B")  # same id, another event
    assert first.id == second.id and first.encode() != second.encode()
    publish(app, [first, second], msg_ids=["msg-A", "msg-B"])
    publish(app, [first], msg_ids=["msg-A-retried"])  # the same event again: its Pong is a duplicate

    wait_for(lambda: count(app, "Pong") >= 2, 60, "2 Pongs", detail=run.tail)
    wait_for(lambda: settled(app, "echo"), 60, "the consumer to settle", detail=run.tail)
    pongs = read(app, "Pong")
    assert sorted(p.data["order"] for p in pongs) == ["A", "B"]
    assert all(p.causation_id == first.id for p in pongs)


def test_an_entry_from_the_advisory_path_fits_too(make_config: Callable[..., App]) -> None:
    """The MAX_DELIVERIES path re-reads the original from its stream: a near-limit original, with a
    producer's control header, still gives one stored entry (cut down) on the first try."""
    app = with_dlq(make_config())
    body = orjson.dumps({"id": "big", "type": "Ping", "data": {"pad": "q" * (NEAR_LIMIT - 60)}})

    async def work() -> list[Any]:
        nc = await nats.connect(app.url)
        try:
            js = nc.jetstream()
            cfg = load_config(app.path)
            await provision(js, cfg)
            ack = await js.publish(app.subject("Ping"), body,
                                   headers={MSG_ID_HEADER: "big", "Nats-Expected-Stream": app.stream})
            publisher = Publisher(nc, cfg.subject_prefix)
            await publisher.start()
            try:
                letters = await DeadLetters.open(cfg, publisher, js)
                await letters.from_advisory(js, {"stream": app.stream, "stream_seq": ack.seq, "deliveries": 5},
                                            "echo")
            finally:
                await publisher.stop()
            return [ack.seq]
        finally:
            await nc.close()

    [seq] = asyncio.run(work())
    [entry] = entries(app)
    assert entry.headers[H + "Error-Type"] == "MaxDeliveriesExceeded"
    assert entry.headers[H + "Stream-Seq"] == str(seq) and entry.headers[H + "Route"] == "Ping"
    assert entry.headers[H + "Body-Truncated"] == str(len(body)) and body.startswith(entry.data)
    assert "Nats-Expected-Stream" not in entry.headers
