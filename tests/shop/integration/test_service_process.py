"""The shop's helper processes (gateway, order API) start on a free port, and again on a new one when the
child exits before it is ready (its port taken in between); stopped by PID."""

from __future__ import annotations

import os
import sys
import urllib.request

import pytest

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


class Flaky(ServiceProcess):
    """Exits at once the first ``failures`` times, then serves ``/ready``."""

    def __init__(self, failures: int) -> None:
        super().__init__("a flaky service", None, os.environ, tied=False)
        self.failures = failures
        self.ports: list[int] = []

    def command(self, port: int) -> list[str]:
        self.ports.append(port)
        if len(self.ports) <= self.failures:
            return [sys.executable, "-c", "raise SystemExit(3)"]
        return [sys.executable, "-c", READY_SERVER, str(port)]


def test_a_child_that_exits_before_it_is_ready_is_started_again_on_a_new_port() -> None:
    service = Flaky(failures=2)
    try:
        service.start(ready_timeout_s=15)
        assert len(service.ports) == 3 and service.url.endswith(f":{service.ports[-1]}")
        with urllib.request.urlopen(f"{service.url}/ready", timeout=5) as response:
            assert response.status == 200
    finally:
        service.stop()
    assert service.proc is not None and service.proc.poll() is not None


def test_a_child_that_never_starts_fails_after_three_attempts() -> None:
    service = Flaky(failures=10)
    with pytest.raises(ServiceStartError, match="a flaky service exited with code 3"):
        service.start(ready_timeout_s=15)
    assert len(service.ports) == 3
