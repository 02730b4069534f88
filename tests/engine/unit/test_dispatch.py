"""Route resolution, the router's binding of outputs, and ack subject metadata."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.config import Config, parse_config
from engine.dispatch import Context, Handler, Router, ack_metadata, build_router, resolve_handler
from engine.errors import ConfigError, NoRoute
from engine.events import Event, derived_id

HERE = __name__  # route targets below point into this module


def not_async(event: Event, ctx: Context) -> None:
    return None


async def one_argument(event: Event) -> None:
    return None


async def two_outputs(event: Event, ctx: Context) -> list[Event]:
    return [Event(type="A", data={"n": 1}), Event(type="B", data={"n": 2})]


async def nothing(event: Event, ctx: Context) -> None:
    return None


def config(route: str) -> Config:
    return parse_config({
        "subject_prefix": "shop",
        "streams": [{"name": "SHOP", "subjects": ["shop.>"]}],
        "services": {"payments": {"stream": "SHOP", "routes": {"OrderPlaced": route}}},
    }, source="config/shop.yaml")


@pytest.mark.parametrize(("target", "problem"), [
    ("tests.no_such_module:handle", "cannot import module 'tests.no_such_module' (No module named"),
    ("tests.engine.unit.broken_module:handle",
     "importing module 'tests.engine.unit.broken_module' failed: RuntimeError: settings missing"),
    (f"{HERE}:missing", f"module '{HERE}' has no function 'missing'"),
    (f"{HERE}:not_async", f"'{HERE}:not_async' must be an 'async def' function"),
    (f"{HERE}:one_argument", f"'{HERE}:one_argument' must accept (event, ctx)"),
])
def test_bad_routes_name_file_and_route_key_path(target: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_router(config(target), "payments")
    assert str(info.value).startswith(f"config/shop.yaml: services.payments.routes.OrderPlaced: {problem}")


def test_resolve_handler_returns_the_function() -> None:
    assert resolve_handler("handlers.examples:echo", "x") is __import__("handlers.examples").examples.echo


def ctx(reply: str = "") -> Context:
    return Context(service="payments", worker=0, reply=reply, subject="shop.OrderPlaced")


def test_router_binds_outputs_to_the_input() -> None:
    router = build_router(config(f"{HERE}:two_outputs"), "payments")
    assert router.event_types == ["OrderPlaced"]
    parent = Event(type="OrderPlaced", data={})
    outputs = asyncio.run(router.dispatch(parent, ctx()))
    assert [o.type for o in outputs] == ["A", "B"]
    assert [o.id for o in outputs] == [derived_id(parent.id, 0), derived_id(parent.id, 1)]
    assert all(o.causation_id == parent.id and o.trace_id == parent.trace_id for o in outputs)


def test_router_returns_no_outputs_for_none_and_raises_no_route() -> None:
    router = build_router(config(f"{HERE}:nothing"), "payments")
    assert asyncio.run(router.dispatch(Event(type="OrderPlaced"), ctx())) == []
    with pytest.raises(NoRoute, match="no route for event type 'Refund' in service 'payments'"):
        asyncio.run(router.dispatch(Event(type="Refund"), ctx()))


def test_middleware_wraps_in_declared_order() -> None:
    calls: list[str] = []

    def tag(name: str) -> Any:
        def wrap(handler: Handler) -> Handler:
            async def wrapped(event: Event, c: Context) -> Any:
                calls.append(name)
                return await handler(event, c)
            return wrapped
        return wrap

    router = Router({"OrderPlaced": nothing}, [tag("outer"), tag("inner")])
    asyncio.run(router.dispatch(Event(type="OrderPlaced"), ctx()))
    assert calls == ["outer", "inner"]


# $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>
OLD = "$JS.ACK.SHOP.payments.3.1042.17.1700000000000000000.5"
# $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>.<token>
NEW = "$JS.ACK.hub.ACCHASH.SHOP.payments.4.2042.18.1700000000000000000.6.rand0m"


def test_ack_metadata_reads_both_subject_formats() -> None:
    assert ack_metadata(OLD) == (3, 1042)
    assert ack_metadata(NEW) == (4, 2042)
    assert ack_metadata("") == (1, 0)


def test_context_exposes_attempt_and_sequence() -> None:
    c = ctx(NEW)
    assert (c.attempt, c.stream_seq) == (4, 2042)
    c = Context("payments", 0, OLD, "shop.OrderPlaced", {"breaker": "b"})
    assert c.resource("breaker") == "b"
    with pytest.raises(LookupError, match="no resource named 'store' in service 'payments'"):
        c.resource("store")


CALLED: list[str] = []


def sync_setup(ctx: Context) -> None:
    CALLED.append(f"sync:{ctx.service}")


async def async_setup(ctx: Context) -> None:
    CALLED.append(f"async:{ctx.settings['x']}")


def setup_config(*setup: str) -> Config:
    return parse_config({
        "subject_prefix": "shop",
        "streams": [{"name": "SHOP", "subjects": ["shop.>"]}],
        "services": {"payments": {"stream": "SHOP", "routes": {"OrderPlaced": f"{HERE}:nothing"},
                                  "setup": list(setup), "settings": {"x": 7}}},
    }, source="config/shop.yaml")


def test_setup_hooks_run_in_order_sync_or_async() -> None:
    router = build_router(setup_config(f"{HERE}:sync_setup", f"{HERE}:async_setup"), "payments")
    CALLED.clear()
    asyncio.run(router.run_setup(Context("payments", 0, "", "", {}, {"x": 7})))
    assert CALLED == ["sync:payments", "async:7"]


@pytest.mark.parametrize(("target", "problem"), [
    (f"{HERE}:missing", f"module '{HERE}' has no function 'missing'"),
    (f"{HERE}:two_outputs", f"'{HERE}:two_outputs' must accept (ctx)"),
])
def test_bad_setup_hooks_name_file_and_key_path(target: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_router(setup_config(target), "payments")
    assert str(info.value) == f"config/shop.yaml: services.payments.setup[0]: {problem}"
