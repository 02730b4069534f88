"""``jetpool dlq`` as an operator runs it: list, show, replay and purge, readable or ``--json``.

Entries are made by a real engine on the session's nats-server (handlers that reject), then read,
replayed and purged by the real command line in subprocesses; counts are checked on the streams.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.js.errors
import pytest

from engine.deadletter import H
from engine.events import MSG_ID_HEADER, Event
from tests.support import (
    FAILING,
    App,
    Engine,
    count,
    dlq,
    expected_pong_ids,
    pings,
    publish,
    publish_raw,
    read,
    run_cli,
    settled,
    wait_for,
    with_dlq,
    write_config,
)

StartEngine = Callable[..., Engine]
REJECTED = "Reject: card number is not valid"
PAD = 10_000  # characters of padding in one rejected body: more than `dlq show` prints
NOT_UTF8 = b"\xff\xfe" * 150  # 300 bytes: more than `dlq show` prints in hex
ESCAPES = b"not json \x1b[2J\x1b]0;owned\x07"  # a body that would drive a terminal if printed raw


@dataclass(frozen=True)
class Rejects:
    """Dead-letter entries of two services: ``echo`` (Ping) and ``other`` (Pang), made by a running engine."""

    app: App
    run: Engine
    echo: list[Event]  # rejected Pings; the first carries PAD characters of padding
    other: list[Event]  # rejected Pangs
    not_utf8_seq: int  # stream sequence of the Ping body that is not UTF-8
    escapes_seq: int  # stream sequence of the Ping body with terminal escapes

    @property
    def total(self) -> int:
        return len(self.echo) + len(self.other) + 2


def two_services(handler: str) -> dict[str, dict[str, Any]]:
    return {"echo": {"routes": {"Ping": handler}}, "other": {"routes": {"Pang": handler}}}


@pytest.fixture
def rejects(make_config: Callable[..., App], engine: StartEngine) -> Rejects:
    app = with_dlq(make_config(two_services(f"{FAILING}:poison_aware")))
    run = engine(app)
    echo = [Event(type="Ping", data={"reject": True, "pad": "x" * PAD}), *pings(2, reject=True)]
    other = [Event(type="Pang", data={"reject": True, "n": i}) for i in range(2)]
    publish(app, [*echo, *other])
    not_utf8 = publish_raw(app, app.subject("Ping"), NOT_UTF8)
    escapes = publish_raw(app, app.subject("Ping"), ESCAPES)
    made = Rejects(app, run, echo, other, not_utf8["seq"], escapes["seq"])
    wait_for(lambda: len(dlq(app)) == made.total, 60, f"{made.total} DLQ entries", detail=run.tail)
    return made


def jetpool_dlq(app: App, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["dlq", *args, "-c", str(app.path)])


def ok(app: App, *args: str) -> str:
    """stdout of a ``jetpool dlq`` command that must succeed."""
    result = jetpool_dlq(app, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def as_json(app: App, *args: str) -> Any:
    return json.loads(ok(app, *args, "--json"))


def rows(stdout: str) -> list[list[str]]:
    """The readable ``dlq list``: a header line, then one line per entry (split on whitespace)."""
    header, *lines = stdout.splitlines()
    assert header.split()[:2] == ["ID", "LAST"] and header.rstrip().endswith("ERROR")
    return [line.split() for line in lines]


def test_list_is_readable_or_json_oldest_first_by_service_and_limit(rejects: Rejects) -> None:
    app = rejects.app
    entries = as_json(app, "list")
    ids = [e["id"] for e in entries]
    assert len(ids) == rejects.total and ids == sorted(ids)
    assert Counter(e["service"] for e in entries) == {"echo": 5, "other": 2}

    readable = rows(ok(app, "list"))
    assert [int(r[0]) for r in readable] == ids
    by_id = {e["id"]: e for e in entries}
    for row in readable:
        entry = by_id[int(row[0])]
        assert row[1:5] == [entry["last_failure"], entry["service"], entry["route"] or "-", str(entry["attempts"])]
        assert " ".join(row[5:]).startswith(f"{entry['error_type']}: ")
    assert sum(" ".join(r[5:]) == REJECTED for r in readable) == 5

    assert [e["id"] for e in as_json(app, "list", "--limit", "2")] == ids[:2]
    assert [int(r[0]) for r in rows(ok(app, "list", "--limit", "2"))] == ids[:2]
    other_ids = [e["id"] for e in entries if e["service"] == "other"]
    assert [e["id"] for e in as_json(app, "list", "--service", "other")] == other_ids
    assert [int(r[0]) for r in rows(ok(app, "list", "--service", "other", "--limit", "1"))] == other_ids[:1]
    assert as_json(app, "list", "--service", "nobody") == []
    assert ok(app, "list", "--service", "nobody") == "no dead-letter entries\n"


def show_fields(stdout: str) -> dict[str, str]:
    """``name: value`` lines of the readable ``dlq show`` up to its headers."""
    head = stdout.split("\nheaders:", 1)[0]
    return dict(line.split(":", 1) for line in head.splitlines())


def test_show_prints_one_field_per_line_and_json_for_scripts(rejects: Rejects) -> None:
    app = rejects.app
    by_seq = {e.stream_seq: e for e in dlq(app)}
    padded = next(e for e in by_seq.values() if e.body == rejects.echo[0].encode())

    shown = ok(app, "show", str(padded.id))
    fields = {name: value.strip() for name, value in show_fields(shown).items()}
    assert fields == {
        "id": str(padded.id), "dlq subject": f"dlq{app.prefix}.echo", "service": "echo", "route": "Ping",
        "error type": "Reject", "error": "card number is not valid", "attempts": "1", "subject": app.subject("Ping"),
        "stream": app.stream, "stream seq": str(padded.stream_seq), "first failure": padded.first_failure,
        "last failure": padded.last_failure,
    }
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", fields["last failure"])
    headers, body = shown.split("\nheaders:", 1)[1].split("\nbody:", 1)
    assert headers.splitlines() == ["", f"  Nats-Msg-Id: {rejects.echo[0].id}"]  # the original id, not the DLQ's
    body_lines = body.splitlines()
    assert body_lines[0].split() == [str(len(padded.body)), "bytes,", "JSON"]
    assert f'    "id": "{rejects.echo[0].id}",' in body_lines  # indented JSON, text as it was
    assert body_lines[-1].startswith("  ... cut short: ") and body_lines[-1].endswith(" characters shown "
                                                                                      "(--json prints the whole body)")
    assert len(shown) < PAD

    scripted = as_json(app, "show", str(padded.id))
    assert scripted == padded.to_json()
    assert scripted["body"]["data"]["pad"] == "x" * PAD and scripted["headers"] == {"Nats-Msg-Id": rejects.echo[0].id}


def test_show_prints_binary_as_hex_and_escapes_control_characters(rejects: Rejects) -> None:
    app = rejects.app
    by_seq = {e.stream_seq: e for e in dlq(app)}

    binary = ok(app, "show", str(by_seq[rejects.not_utf8_seq].id))
    assert "error type:    MalformedEvent\n" in binary
    body = binary.split("\nbody:", 1)[1].splitlines()
    assert body[0].strip() == "300 bytes, not UTF-8 (hex)"
    assert body[1:-1] == ["  " + " ".join(["ff fe"] * 16)] * 8
    assert body[-1] == "  ... cut short: 256 of 300 bytes shown"

    escaped = ok(app, "show", str(by_seq[rejects.escapes_seq].id))
    assert "\x1b" not in escaped and "\x07" not in escaped
    assert escaped.endswith(f"body:          {len(ESCAPES)} bytes, text\n  not json \\x1b[2J\\x1b]0;owned\\x07\n")


def test_unknown_ids_and_a_replay_without_selector_are_errors(rejects: Rejects) -> None:
    app = rejects.app
    for action in ("show", "replay"):
        missing = jetpool_dlq(app, action, "999999")
        assert missing.returncode == 2, missing.stderr
        assert missing.stdout == ""
        assert missing.stderr.strip() == f"jetpool: error: no dead-letter entry 999999 in stream 'DLQ{app.stream}'"
    nothing = jetpool_dlq(app, "replay")
    assert nothing.returncode == 2
    assert "error: one of the arguments id --service --all is required" in nothing.stderr
    both = jetpool_dlq(app, "replay", "1", "--all")
    assert both.returncode == 2 and "argument --all: not allowed with argument id" in both.stderr
    assert len(dlq(app)) == rejects.total  # none of it touched an entry


def test_a_dead_letter_stream_never_provisioned_is_an_error_not_a_traceback(make_config: Callable[..., App]) -> None:
    app = with_dlq(make_config())
    for args in (["list"], ["show", "1"], ["replay", "--all"], ["purge"]):
        result = jetpool_dlq(app, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"jetpool: error: {app.path}: no dead-letter stream 'DLQ{app.stream}' on {app.url} "
            f"(run 'jetpool provision -c {app.path}' or start the engine once)")


def test_replay_by_service_then_all_twice_stores_each_event_once(rejects: Rejects, engine: StartEngine) -> None:
    app, valid = rejects.app, [*rejects.echo, *rejects.other]
    rejects.run.kill_tree()  # nothing consumes while we count what the replays store
    pings_before, pangs_before = count(app, "Ping"), count(app, "Pang")

    assert as_json(app, "replay", "--service", "other") == {"replayed": 2, "refused": 0, "refusals": []}
    assert (count(app, "Ping"), count(app, "Pang")) == (pings_before, pangs_before + 2)
    assert {e.service for e in dlq(app)} == {"echo"}
    assert ok(app, "replay", "--all") == "replayed 5, refused 0\n"
    assert ok(app, "replay", "--all") == "replayed 0, refused 0\n"
    assert as_json(app, "replay", "--all") == {"replayed": 0, "refused": 0, "refusals": []}
    assert (count(app, "Ping"), count(app, "Pang")) == (pings_before + 5, pangs_before + 2)
    assert dlq(app) == []

    # The fix deployed: the same services answer every event; the replayed ones complete once each.
    fixed = with_dlq(write_config(app.path.parent, app.url, two_services("handlers.examples:echo"),
                                  name="fixed.yaml", same_names_as=app))
    run = engine(fixed)
    wait_for(lambda: count(app, "Pong") >= len(valid), 60, "a Pong per replayed event", detail=run.tail)
    wait_for(lambda: settled(app, "echo") and settled(app, "other"), 60, "both consumers to settle", detail=run.tail)
    produced = Counter(p.id for p in read(app, "Pong"))
    assert set(produced) == expected_pong_ids(valid) and set(produced.values()) == {1}
    # The two bodies that are not events are dead-lettered again, and nothing else is.
    assert sorted((e.error_type, e.body) for e in dlq(app)) == [("MalformedEvent", ESCAPES),
                                                                 ("MalformedEvent", NOT_UTF8)]


def test_purge_by_service_removes_only_that_services_entries(rejects: Rejects) -> None:
    app = rejects.app
    echo_ids = [e.id for e in dlq(app, "echo")]
    assert len(echo_ids) == 5
    assert as_json(app, "purge", "--service", "other") == {"purged": 2}
    assert [e.id for e in dlq(app)] == echo_ids
    assert ok(app, "purge", "--service", "other") == "purged 0 entries\n"
    assert ok(app, "purge") == "purged 5 entries\n"
    assert dlq(app) == []


# ---- replay trusts no entry -------------------------------------------------------------------------

T = TypeVar("T")


def on_broker(app: App, work: Callable[[Any], Awaitable[T]]) -> T:
    """``work(js)`` on a short-lived connection to the app's server."""

    async def run() -> T:
        nc = await nats.connect(app.url, connect_timeout=5, allow_reconnect=False)
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def plant(app: App, service: str, body: bytes, headers: dict[str, str]) -> int:
    """Store an entry on ``service``'s dead-letter subject, as anyone allowed to publish there could; its id."""

    async def work(js: Any) -> int:
        return int((await js.publish(f"dlq{app.prefix}.{service}", body, headers=headers)).seq)

    return on_broker(app, work)


def stored(app: App, event_type: str) -> list[Any]:
    """Every message on the subject of ``event_type``, raw (body and headers as stored), in stream order."""

    async def work(js: Any) -> list[Any]:
        out: list[Any] = []
        seq = 1
        while True:
            try:
                msg = await js.get_msg(app.stream, seq=seq, next=True, subject=app.subject(event_type))
            except nats.js.errors.NotFoundError:
                return out
            out.append(msg)
            seq = int(msg.seq) + 1

    return on_broker(app, work)


def delete_original(app: App, seq: int) -> None:
    async def work(js: Any) -> None:
        await js.delete_msg(app.stream, seq)

    on_broker(app, work)


def refused_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """A replay that refused something: exit 1, no traceback; its refusal lines (stderr, logs aside)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("jetpool: dlq replay: ")]


def test_replay_publishes_the_original_from_its_stream_not_the_entrys_body(rejects: Rejects) -> None:
    app = rejects.app
    rejects.run.kill_tree()
    genuine = next(e for e in dlq(app, "other"))
    # Same claims, another body: replay must go by the stream, not by what an entry carries.
    tampered = plant(app, "other", b'{"forged": true}', {**genuine.headers, MSG_ID_HEADER: "tampered"})
    before = [m.data for m in stored(app, "Pang")]

    assert ok(app, "replay", str(genuine.id)) == "replayed 1, refused 0\n"
    assert ok(app, "replay", str(tampered)) == "replayed 1, refused 0\n"
    after = stored(app, "Pang")
    assert [m.data for m in after] == [*before, genuine.body, genuine.body]
    assert [m.headers[MSG_ID_HEADER] for m in after[-2:]] == [f"replay.DLQ{app.stream}.{genuine.id}",
                                                              f"replay.DLQ{app.stream}.{tampered}"]
    assert {e.id for e in dlq(app)}.isdisjoint({genuine.id, tampered})


def test_an_entry_whose_original_is_gone_needs_from_entry_and_a_truncated_one_is_never_replayed(
        rejects: Rejects) -> None:
    app = rejects.app
    rejects.run.kill_tree()
    entry = next(e for e in dlq(app, "echo") if e.body == rejects.echo[1].encode())
    assert entry.stream_seq is not None
    delete_original(app, entry.stream_seq)  # as max_age or a purge would
    cut = plant(app, "echo", entry.body[:20], {**entry.headers, MSG_ID_HEADER: "cut",
                                               H + "Body-Truncated": str(len(entry.body))})
    pings_before = count(app, "Ping")

    refused = jetpool_dlq(app, "replay", str(entry.id))
    assert refused_lines(refused) == [
        f"jetpool: dlq replay: entry {entry.id} refused: its original ({app.stream} #{entry.stream_seq}) is gone "
        "from the stream; --from-entry replays the body the entry stored instead"]
    assert refused.stdout == "replayed 0, refused 1\n"

    never = jetpool_dlq(app, "replay", str(cut), "--from-entry", "--json")
    assert never.returncode == 1, never.stderr
    assert json.loads(never.stdout) == {"replayed": 0, "refused": 1, "refusals": [{"id": cut, "reason": (
        f"its original ({app.stream} #{entry.stream_seq}) is gone and the entry keeps only part of the body "
        f"('{len(entry.body)}' bytes originally): it cannot be replayed")}]}
    assert count(app, "Ping") == pings_before
    assert {entry.id, cut} <= {e.id for e in dlq(app)}  # refused entries stay

    assert ok(app, "replay", str(entry.id), "--from-entry") == "replayed 1, refused 0\n"
    assert stored(app, "Ping")[-1].data == entry.body
    assert entry.id not in {e.id for e in dlq(app)} and cut in {e.id for e in dlq(app)}


def test_control_headers_of_the_original_are_not_resent(make_config: Callable[..., App], engine: StartEngine) -> None:
    app = with_dlq(make_config({"echo": {"routes": {"Ping": f"{FAILING}:poison_aware"}}}))
    run = engine(app)
    rejected = pings(1, reject=True)[0]
    control = {"Nats-Expected-Stream": app.stream, "Nats-Expected-Last-Subject-Sequence": "0"}

    async def produce(js: Any) -> None:
        await js.publish(app.subject("Ping"), rejected.encode(),
                         headers={MSG_ID_HEADER: rejected.id, "X-Tenant": "t-1", **control})

    on_broker(app, produce)
    wait_for(lambda: len(dlq(app)) == 1, 60, "the rejected Ping's DLQ entry", detail=run.tail)
    run.kill_tree()
    [entry] = dlq(app)

    # Resent as they were, both headers would have the replay refused by the stream (the subject is not empty).
    assert ok(app, "replay", str(entry.id)) == "replayed 1, refused 0\n"
    replayed = stored(app, "Ping")[-1]
    assert replayed.data == rejected.encode()
    assert replayed.headers == {"X-Tenant": "t-1", MSG_ID_HEADER: f"replay.DLQ{app.stream}.{entry.id}"}


DEEP = b"[" * 600 + b"]" * 600  # orjson reads it (up to 1024 levels) but writes at most 255


def test_show_list_and_replay_of_entries_no_writer_made_never_crash(make_config: Callable[..., App]) -> None:
    app = with_dlq(make_config())
    provisioned = run_cli(["provision", "-c", str(app.path)])
    assert provisioned.returncode == 0, provisioned.stderr
    deep = plant(app, "echo", DEEP, {H + "Service": "echo", H + "Subject": app.subject("Ping")})
    odd = plant(app, "echo", NOT_UTF8, {H + "Service": "echo", H + "Subject": app.subject("Ping"),
                                        H + "Stream": app.stream, H + "Stream-Seq": "NaN", H + "Attempts": "x"})
    bare = plant(app, "echo", b"", {"X-Nothing": "1"})

    shown = ok(app, "show", str(deep))
    assert shown.endswith(f"body:          {len(DEEP)} bytes, text\n  {DEEP.decode()}\n")
    assert as_json(app, "show", str(deep))["body"] == DEEP.decode()
    assert [e["body"] for e in as_json(app, "list")] == [DEEP.decode(), NOT_UTF8.decode("utf-8", "replace"), ""]
    assert "stream seq:    -\n" in ok(app, "show", str(odd))
    assert len(rows(ok(app, "list"))) == 3

    replayed = jetpool_dlq(app, "replay", "--all", "--from-entry")
    prefix = "jetpool: dlq replay: entry"
    assert refused_lines(replayed) == [
        f"{prefix} {deep} refused: names stream '', but echo consumes stream '{app.stream}'",
        f"{prefix} {odd} refused: names no valid original sequence ({H}Stream-Seq: 'NaN')",
        f"{prefix} {bare} refused: names no service (no {H}Service header)"]
    assert replayed.stdout == "replayed 0, refused 3\n"
    assert [e.id for e in dlq(app)] == [deep, odd, bare] and count(app, "Ping") == 0
