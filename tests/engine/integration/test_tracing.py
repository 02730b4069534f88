"""One trace across three services: spans chained through the traceparent header on every event."""

from __future__ import annotations

import asyncio
import uuid

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import tracing
from engine.config import parse_config
from engine.connection import connect
from engine.consumer import Consumer
from engine.dispatch import build_router
from engine.embedded import EmbeddedServer
from engine.events import TRACEPARENT_HEADER, Event
from engine.provision import provision
from engine.publisher import Publisher

SERVICES = {"a": "Start", "b": "Mid", "c": "End"}


async def _run_flow(url: str, exporter: InMemorySpanExporter) -> tuple[Event, dict[str, str]]:
    uid = uuid.uuid4().hex[:8]
    cfg = parse_config({
        "app": "trace", "subject_prefix": f"tr{uid}", "nats": {"url": url},
        "streams": [{"name": f"TR{uid}", "subjects": [f"tr{uid}.>"]}],
        "services": {name: {"stream": f"TR{uid}", "routes": {t: "tests.engine.failure_handlers:chain"}}
                     for name, t in SERVICES.items()},
        "dead_letter": {"stream": f"TRDLQ{uid}", "subject_prefix": f"trdlq{uid}"},
    })
    nc = await connect(cfg.nats, "trace-test")
    try:
        js = nc.jetstream()
        await provision(js, cfg)
        publisher = Publisher(nc, cfg.subject_prefix)
        await publisher.start()
        consumers = [Consumer(nc, cfg, name, build_router(cfg, name), publisher) for name in SERVICES]
        for consumer in consumers:
            await consumer.start()
        start = Event(type="Start", data={"order": 1}, aggregate_id="order-1")
        await publisher.publish_events([start])
        for _ in range(200):
            if consumers[2].counts["ack"] == 1:
                break
            await asyncio.sleep(0.05)
        for consumer in consumers:
            await consumer.stop(1)
        end = await js.get_last_msg(f"TR{uid}", f"tr{uid}.End")
        return start, dict(end.headers or {})
    finally:
        await nc.close()


def test_one_trace_spans_three_services(nats_server: EmbeddedServer) -> None:
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("trace-test", exporter, batch=False)
    try:
        start, end_headers = asyncio.run(_run_flow(nats_server.url, exporter))
    finally:
        tracing.shutdown_tracing()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"a Start", "b Mid", "c End"}
    trace_ids = {s.context.trace_id for s in spans.values()}
    assert trace_ids == {int(start.trace_id, 16)}  # the envelope's trace id is the OTel trace id
    mid_parent, end_parent = spans["b Mid"].parent, spans["c End"].parent
    assert mid_parent is not None and end_parent is not None
    assert mid_parent.span_id == spans["a Start"].context.span_id
    assert end_parent.span_id == spans["b Mid"].context.span_id
    b = spans["b Mid"].context
    assert end_headers[TRACEPARENT_HEADER] == f"00-{b.trace_id:032x}-{b.span_id:016x}-01"
    start_attributes = spans["a Start"].attributes
    assert start_attributes is not None and start_attributes["jetpool.event.id"] == start.id
