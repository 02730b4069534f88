"""`jetpool run` with no NATS URL starts its own nats-server, serves with it, and stops it by PID."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import orjson
import psutil
import pytest

from engine import embedded
from tests.support import App, Engine, count, expected_pong_ids, pings, publish, read, settled, still_running, wait_for


def test_run_without_url_uses_an_embedded_broker(make_config: Callable[..., App], engine: Callable[..., Engine],
                                                 tmp_path: Path) -> None:
    store = tmp_path / "embedded-store"
    app = make_config(nats_options={"url": None, "store_dir": str(store), "embedded_go_max_procs": 3})
    run = engine(app)
    started = run.records("embedded.started")
    assert len(started) == 1
    url, broker_pid = started[0]["url"], started[0]["pid"]
    assert url.startswith("nats://127.0.0.1:")
    assert started[0]["store_dir"] == str(store)
    assert psutil.Process(broker_pid).ppid() == run.pid  # the supervisor's own child
    assert psutil.Process(broker_pid).environ()["GOMAXPROCS"] == "3"  # nats.embedded_go_max_procs

    live = replace(app, url=url)
    sent = pings(50)
    publish(live, sent)
    wait_for(lambda: count(live, "Pong") >= 50, 60, "50 Pongs", detail=run.tail)
    wait_for(lambda: settled(live, "echo"), 60, "the consumer to settle", detail=run.tail)
    assert {p.id for p in read(live, "Pong")} == expected_pong_ids(sent)
    assert (store / "jetstream").is_dir()  # the store is where the config says

    run.send(signal.SIGTERM)
    assert run.wait_exit(60) == 0, run.tail()
    assert run.records("embedded.stopped")[0]["pid"] == broker_pid
    wait_for(lambda: not psutil.pid_exists(broker_pid), 10, "the embedded nats-server to be gone")


def test_a_killed_supervisor_leaves_no_embedded_broker_behind(make_config: Callable[..., App],
                                                              engine: Callable[..., Engine], tmp_path: Path) -> None:
    """kill -9 runs no code in the supervisor: the kernel tells the broker (SIGTERM on its parent's death)
    and the workers see their parent gone; nothing may keep running or hold the store."""
    app = make_config(nats_options={"url": None, "store_dir": str(tmp_path / "embedded-store")})
    run = engine(app)
    broker_pid = run.records("embedded.started")[0]["pid"]
    tree = run.descendants()
    assert broker_pid in {p.pid for p in tree}

    run.send(signal.SIGKILL)
    run.wait_exit(10)
    wait_for(lambda: not still_running(tree), 30, "the broker and the workers to exit",
             detail=lambda: f"still running: {still_running(tree)}")


@pytest.mark.parametrize("how", ["start", "start_here"])
def test_a_port_taken_before_the_server_binds_it_is_picked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  how: str) -> None:
    """free_port's port is free when picked, not when the server binds it: the server retries on new ports
    (``start``, and ``start_here``, which ``jetpool run``'s embedded broker uses). A port the caller chose
    is never changed: taken, the start fails and says so."""

    def start(server: embedded.EmbeddedServer) -> None:
        if how == "start":
            server.start()
        else:
            asyncio.run(server.start_here())

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port, port])  # the client port, then the monitoring port: both taken the first time
        monkeypatch.setattr(embedded, "free_port", lambda: next(picks, None) or socket_port())
        server = embedded.EmbeddedServer(store_dir=tmp_path / "a", monitor_port=0)
        try:
            start(server)
            assert server.port != port and server.monitor_port not in (None, 0, port)
            with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as varz:
                assert orjson.loads(varz.read())["port"] == server.port
        finally:
            server.stop()

        given = embedded.EmbeddedServer(store_dir=tmp_path / "b", port=port)
        try:
            with pytest.raises(embedded.PortTaken, match="address already in use"):
                start(given)
            assert given.port == port
        finally:
            given.stop()


def socket_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
