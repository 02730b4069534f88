"""Which exporter the standard OTEL_* variables turn on: none by default, OTLP/HTTP for an endpoint.

The OTLP endpoint is a small HTTP server of this test on 127.0.0.1 (a thread, shut down in teardown);
nothing else is contacted.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from engine import tracing
from engine.events import Event


class Collector(ThreadingHTTPServer):
    """Records every request an OTLP exporter sends, answers 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, str, bytes]] = []  # path, content type, body

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # the name http.server calls
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No OTEL_* variable from the machine; tracing switched off again after the test."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    try:
        yield monkeypatch
    finally:
        tracing.shutdown_tracing()


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_no_exporter_and_no_tracing_by_default(clean_env: pytest.MonkeyPatch) -> None:
    assert tracing.exporter_from_env() is None
    assert tracing.setup_tracing("shop.payments") is False
    assert not tracing.enabled()


@pytest.mark.parametrize(("variable", "path"), [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "/v1/traces"),  # a base URL: the exporter adds the traces path
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/collector/traces"),  # the traces URL, used as given
])
def test_an_otlp_endpoint_turns_on_otlp_export_there(variable: str, path: str, clean_env: pytest.MonkeyPatch,
                                                      collector: Collector) -> None:
    endpoint = collector.url if variable == "OTEL_EXPORTER_OTLP_ENDPOINT" else collector.url + path
    clean_env.setenv(variable, endpoint)
    assert isinstance(tracing.exporter_from_env(), OTLPSpanExporter)

    assert tracing.setup_tracing("shop.payments", batch=False) is True
    event = Event(type="OrderPlaced", data={}, aggregate_id="o-1", id=uuid.uuid4().hex, trace_id=uuid.uuid4().hex)
    tracing.end_span(tracing.start_span(event, None, "payments", 1))
    tracing.shutdown_tracing()

    assert len(collector.received) == 1
    received_path, content_type, body = collector.received[0]
    assert received_path == path
    assert content_type == "application/x-protobuf"
    assert bytes.fromhex(event.trace_id) in body  # the span of this event, in the envelope's trace
    assert b"shop.payments" in body  # the service name resource


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, OTLPSpanExporter),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, OTLPSpanExporter),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, OTLPSpanExporter),
    ({"OTEL_TRACES_EXPORTER": "console"}, ConsoleSpanExporter),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, None),
    ({"OTEL_SERVICE_NAME": "shop", "OTEL_RESOURCE_ATTRIBUTES": "team=pay"}, None),  # not exporter settings
], ids=["nothing", "endpoint", "traces-endpoint", "otlp", "console", "none-wins", "other-otel-variables"])
def test_exporter_choice(env: dict[str, str], expected: type | None) -> None:
    exporter = tracing.exporter_from_env(env)
    if expected is None:
        assert exporter is None
    else:
        assert isinstance(exporter, expected)


@pytest.mark.parametrize("env", [
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"},
    {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"},
], ids=["base", "traces"])
def test_the_otlp_endpoint_comes_from_the_mapping_not_the_process_environment(
        env: dict[str, str], clean_env: pytest.MonkeyPatch) -> None:
    exporter = tracing.exporter_from_env(env)
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
