"""engine.testing as a user meets it: handler tests on a real nats-server, one per session.

Written the way the README shows a handler test; the handlers live in tests/engine/harness_handlers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from nats.js.errors import NotFoundError

from engine import Event
from engine.config import parse_config
from engine.errors import ConfigError
from engine.testing import TestApp

pytest_plugins = ["engine.testing"]
pytestmark = pytest.mark.usefixtures("jetpool_server")  # start the server in setup, not in the first test

H = "tests.engine.harness_handlers"
ECHO = {"echo": {"routes": {"Ping": f"{H}:pong"}}}


async def test_a_ping_is_answered_with_a_pong() -> None:
    async with TestApp(ECHO) as app:
        ping = Event("Ping", {"n": 1})
        [pong] = await app.publish(ping, wait_for="Pong")
        assert pong.data == {"n": 1}
        assert pong.causation_id == ping.id
        await app.settle()  # the Ping is acked: nothing pending, nothing unacked
        assert [e.type for e in app.events()] == ["Ping", "Pong"]
        assert await app.dead_letters() == []


async def test_a_second_test_is_as_short() -> None:
    """Same as the first: with the server already running, ``--durations`` shows its cost alone."""
    async with TestApp(ECHO) as app:
        [pong] = await app.publish(Event("Ping", {"n": 2}), wait_for="Pong")
        assert pong.data == {"n": 2}


async def test_a_rejected_event_ends_in_a_dead_letter() -> None:
    async with TestApp({"echo": {"routes": {"Ping": f"{H}:refuse"}}}) as app:
        ping = Event("Ping", {"n": 7})
        await app.publish(ping)
        [entry] = await app.expect_dead_letters(1)
        assert (entry.service, entry.route, entry.error_type) == ("echo", "Ping", "Reject")
        assert entry.error == "ping 7 is not welcome"
        assert entry.attempts == 1
        assert Event.decode(entry.body).id == ping.id
        await app.settle()
        assert app.events("Pong") == []


async def test_malformed_bytes_are_dead_lettered_at_once() -> None:
    async with TestApp(ECHO) as app:
        await app.publish_raw(b"not json", event_type="Ping")
        [entry] = await app.expect_dead_letters(1, service="echo")
        assert entry.error_type == "MalformedEvent"
        assert entry.error.startswith("body is not JSON")
        assert entry.body == b"not json"
        await app.settle()
        assert app.events() == []  # the bad message is stored, but it is no event
        assert [m.data for m in app.stored] == [b"not json"]


async def test_a_failure_is_retried_with_the_services_backoff() -> None:
    routes = {"echo": {"routes": {"Ping": f"{H}:flaky"}, "retry": {"delays_s": [0.05]}}}
    async with TestApp(routes) as app:
        [pong] = await app.publish(Event("Ping", {"n": 3}), wait_for="Pong")
        assert pong.data == {"n": 3, "attempt": 2}
        assert await app.dead_letters() == []


async def test_two_apps_in_one_session_do_not_see_each_other() -> None:
    routes = {"counter": {"routes": {"Ping": f"{H}:count"}, "state": ["counts"]}}
    config = parse_config({
        "app": "demo", "subject_prefix": "events", "streams": [{"name": "EVENTS", "subjects": ["events.>"]}],
        "state": {"counts": {}}, "services": {"counter": {"stream": "EVENTS", **routes["counter"]}}})
    async with TestApp(routes) as one, TestApp(config) as two:
        await one.publish(Event("Ping"), wait_for="Counted")
        [counted] = await one.publish(Event("Ping"), wait_for="Counted")
        assert counted.data == {"n": 2}
        [counted] = await two.publish(Event("Ping"), wait_for="Counted")
        assert counted.data == {"n": 1}  # its own bucket, though both call ctx.state("counts")
        await one.settle()
        await two.settle()
        assert [e.type for e in two.events()] == ["Ping", "Counted"]
        assert len(one.events("Ping")) == 2
        value, _ = await one.state("counts").get("pings")
        assert value == {"n": 2}


async def test_a_yaml_file_runs_with_its_own_routes(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump({
        "app": "shouter", "subject_prefix": "talk",
        "streams": [{"name": "TALK", "subjects": ["talk.>"], "storage": "memory"}],
        "services": {"shouter": {"stream": "TALK", "routes": {"Ping": f"{H}:shout"}}},
    }))
    async with TestApp(path) as app:
        assert app.subject("Ping").endswith(".talk.Ping")
        [pong] = await app.publish(Event("Ping", {"text": "hi"}), wait_for="Pong")
        assert pong.data == {"text": "HI"}


async def test_a_missing_event_fails_with_what_did_arrive() -> None:
    async with TestApp({"echo": {"routes": {"Ping": f"{H}:refuse"}}}) as app:
        with pytest.raises(AssertionError) as failure:
            await app.publish(Event("Ping", {"n": 9}), wait_for="Pong", timeout_s=0.5)
        message = str(failure.value)
        assert "expected 1 'Pong' caused by Ping" in message
        assert "Ping" in message.split("stored in the app's streams")[1]
        assert "echo: Ping Reject: ping 9 is not welcome" in message


async def test_a_bad_route_names_its_key_and_leaves_nothing_behind() -> None:
    app = TestApp({"echo": {"routes": {"Ping": f"{H}:nope"}}})
    with pytest.raises(ConfigError, match=r"services\.echo\.routes\.Ping: module .* has no function 'nope'"):
        await app.start()
    async with TestApp(ECHO) as other:
        js = other.js
        stream = app.config.streams[0].name
        with pytest.raises(NotFoundError):
            await js.stream_info(stream)
