"""`jetpool provision` on a real nats-server: creates what the config says, and is safe to repeat."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import api

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

