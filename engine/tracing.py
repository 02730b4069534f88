"""OpenTelemetry traces: one span per handled event; the W3C ``traceparent`` rides on every output.

Tracing is off unless an exporter is configured through the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER=otlp|console``) — a span costs tens of microseconds in Python, more than a
whole no-op event, so nobody pays for traces they do not collect. With tracing off, outputs still
carry the input's ``traceparent`` header, so traces stay whole across services that do collect.

The span's trace id is always the envelope's ``trace_id``: an incoming ``traceparent`` becomes the
parent only when it belongs to that trace; otherwise the parent is synthesised from ``trace_id``.
So one order's envelope trace id is the id you search for in Jaeger.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from engine.events import TRACEPARENT_HEADER, Event

_state: dict[str, Any] = {"tracer": None, "provider": None}


def exporter_from_env(env: Mapping[str, str] | None = None) -> SpanExporter | None:
    """The exporter the standard OTEL_* variables ask for, or None (tracing off)."""
    env = os.environ if env is None else env
    wanted = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if wanted == "none":
        return None
    if wanted == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    traces, base = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if wanted == "otlp" or traces or base:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Resolved from ``env`` here: the exporter itself would read os.environ, not the mapping given.
        return OTLPSpanExporter(endpoint=traces or (f"{base.rstrip('/')}/v1/traces" if base else None))
    return None


def setup_tracing(service_name: str, exporter: SpanExporter | None = None, batch: bool = True) -> bool:
    """Turn tracing on for this process if an exporter is given or configured; return whether it is on."""
    exporter = exporter or exporter_from_env()
    if exporter is None:
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _state["provider"], _state["tracer"] = provider, provider.get_tracer("jetpool")
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at worker exit)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()
    _state["provider"] = _state["tracer"] = None


def enabled() -> bool:
    return _state["tracer"] is not None


def start_span(event: Event, headers: Mapping[str, str] | None, service: str, stream_seq: int) -> Any:
    """Start the span of one handled event, child of the producer's span when it is in the same trace."""
    parent = _parent_context(event, headers)
    return _state["tracer"].start_span(
        f"{service} {event.type}", context=parent, kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "nats", "messaging.operation": "process", "jetpool.service": service,
                    "jetpool.event.id": event.id, "jetpool.event.type": event.type,
                    "jetpool.aggregate_id": event.aggregate_id, "messaging.message.id": event.id,
                    "jetpool.stream_seq": stream_seq})


def end_span(span: Any, error: BaseException | None = None) -> None:
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


def traceparent_of(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _parent_context(event: Event, headers: Mapping[str, str] | None) -> Any:
    trace_id = _hex(event.trace_id, 32)
    incoming = (headers or {}).get(TRACEPARENT_HEADER, "")
    parts = incoming.split("-")
    if len(parts) == 4 and trace_id and _hex(parts[1], 32) == trace_id and _hex(parts[2], 16):
        span_id, flags = _hex(parts[2], 16), TraceFlags(int(parts[3], 16) & 1 or TraceFlags.SAMPLED)
    elif trace_id:
        span_id, flags = random.getrandbits(64) or 1, TraceFlags(TraceFlags.SAMPLED)
    else:
        return None
    remote = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(remote))


def _hex(text: str, digits: int) -> int:
    if len(text) != digits:
        return 0
    try:
        return int(text, 16)
    except ValueError:
        return 0
