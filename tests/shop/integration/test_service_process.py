"""The shop's helper processes (gateway, order API) start on a free port, and again on a new one when the
child exits because that port was taken in between; any other early exit fails at once. Stopped by PID."""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from engine import ports
from handlers import service_process
from handlers.service_process import ServiceProcess, ServiceStartError

READY_SERVER = """
import http.server, sys
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ready).serve_forever()
"""


class Service(ServiceProcess):
    """A child that serves ``/ready`` on its port, or (``broken``) exits at once."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__("a test service", None, os.environ, tied=False)
        self.broken = broken
        self.ports: list[int] = []

    def command(self, port: int) -> list[str]:
        self.ports.append(port)
        if self.broken:
            return [sys.executable, "-c", "raise SystemExit(3)"]
        return [sys.executable, "-c", READY_SERVER, str(port)]


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port somebody else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_child_whose_port_was_taken_is_started_again_on_a_new_port(taken: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    picks = iter([taken, taken])
    monkeypatch.setattr(service_process, "free_port", lambda: next(picks, None) or ports.free_port())
    service = Service()
    try:
        service.start(ready_timeout_s=15)
        assert service.ports[:2] == [taken, taken] and len(service.ports) == 3
        assert service.url.endswith(f":{service.ports[-1]}")
        with urllib.request.urlopen(f"{service.url}/ready", timeout=5) as response:
            assert response.status == 200
    finally:
        service.stop()
    assert service.proc is not None and service.proc.poll() is not None


def test_a_child_that_exits_for_another_reason_fails_at_once() -> None:
    service = Service(broken=True)
    with pytest.raises(ServiceStartError, match="a test service exited with code 3"):
        service.start(ready_timeout_s=15)
    assert len(service.ports) == 1


def test_a_taken_port_three_times_fails(taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_process, "free_port", lambda: taken)
    service = Service()
    with pytest.raises(ServiceStartError, match="exited with code 1"):
        service.start(ready_timeout_s=15)
    assert service.ports == [taken] * 3
