"""The shop's HTTP order API (aiohttp): place an order, read what became of it.

- ``POST /orders``: a JSON order line and a required ``Idempotency-Key`` → ``202`` with the order id and
  ``Location: /orders/{id}`` once ``OrderPlaced`` is stored on the stream (:mod:`handlers.api.service`);
- ``GET /orders/{id}[?wait=5s]``: the order's state, optionally once it ended;
- ``/health`` (the process answers), ``/ready`` (NATS connected, the orders bucket reachable);
- ``/openapi.yaml`` (the file kept next to this module, as it is) and ``/openapi.json`` (the same document).

Every error is JSON in Stripe's shape, ``{"error": {"type", "code", "message", "param"?}}``, and bad input
is refused before anything reaches the broker. The errors aiohttp's HTTP parser raises itself (a header
line over 8 KiB, a malformed request line) get the same shape through :class:`_JsonErrorProtocol`.
See docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import structlog
import yaml
from aiohttp import web

from handlers.api.orders_input import (
    MAX_BODY_BYTES,
    ApiError,
    content_type,
    idempotency_key,
    order_id_param,
    order_line,
    parse_body,
    wait_param,
)
from handlers.api.service import OrderDesk, Unavailable, broker_down

log = structlog.get_logger("jetpool.shop.api")

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
DESK: web.AppKey[OrderDesk] = web.AppKey("desk", OrderDesk)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(desk: OrderDesk) -> web.Application:
    """The API's aiohttp application over ``desk``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[DESK] = desk
    app.router.add_post("/orders", place_order)
    app.router.add_get("/orders/{order_id}", get_order)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/openapi.yaml", openapi_yaml)
    app.router.add_get("/openapi.json", openapi_json)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON: ours as they are, aiohttp's (404, 405, 413) in the same shape, the broker's as 503."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(_http_error(exc.status, exc.reason))
    except Exception as exc:
        if broker_down(exc):
            log.warning("api.broker_unavailable", path=request.path, error=f"{type(exc).__name__}: {exc}")
            return _error(Unavailable("the shop's broker is not answering; retry (with the same Idempotency-Key)"))
        log.exception("api.failed", path=request.path)
        return _error(ApiError(500, "internal_error", "the order API failed", type_="api_error"))


def _http_error(status: int, reason: str) -> ApiError:
    code = {404: "resource_missing", 405: "method_not_allowed", 413: "request_too_large",
            431: "headers_too_large"}.get(status, "bad_request")
    kind = "api_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, code, reason, type_=kind)


def _error(exc: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return _json(exc.status, exc.body(), headers)


def _json(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


async def place_order(request: web.Request) -> web.StreamResponse:
    """``POST /orders``: ``{"customer_id", "sku", "qty", "amount_cents"}`` → 202 ``{"order_id", "status"}``."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "request_too_large", f"the body may be at most {MAX_BODY_BYTES} bytes")
    content_type(request.content_type)
    key = idempotency_key(request.headers)
    line = order_line(parse_body(await request.read()))
    order_id, seen = await request.app[DESK].place(key, line)
    log.debug("api.order_placed", order_id=order_id, replayed=seen)
    headers = {"Location": f"/orders/{order_id}", **({"Idempotent-Replayed": "true"} if seen else {})}
    return _json(202, {"order_id": order_id, "status": "placed"}, headers)


async def get_order(request: web.Request) -> web.StreamResponse:
    """``GET /orders/{id}[?wait=5s]``: the order's state (200), 404 if nobody placed it."""
    order_id = order_id_param(request.match_info["order_id"])
    wait_s = wait_param(request.query.get("wait"))
    state = await request.app[DESK].wait(order_id, wait_s)
    if state is None:
        raise ApiError(404, "resource_missing", f"no such order: {order_id}", "order_id")
    return _json(200, state)


async def health(request: web.Request) -> web.StreamResponse:
    return _json(200, {"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    problem = await request.app[DESK].ready()
    if problem:
        return _json(503, {"status": "unavailable", "reason": problem})
    return _json(200, {"status": "ready"})


async def openapi_yaml(request: web.Request) -> web.StreamResponse:
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/yaml")


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return _json(200, yaml.safe_load(OPENAPI_PATH.read_bytes()))


class _JsonErrorProtocol(web.RequestHandler):
    """aiohttp's connection handler, answering the errors its HTTP parser raises as JSON too."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response already started
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        error = _http_error(status, phrase if status >= 500 else (message or phrase).splitlines()[0][:200])
        response = _error(error)
        response.force_close()
        return response


@contextlib.asynccontextmanager
async def running(desk: OrderDesk, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the API over ``desk`` on ``host:port`` (0: any free port) in this loop; yield its base URL."""
    runner = web.AppRunner(make_app(desk), access_log=None, handle_signals=False)
    await runner.setup()
    server, loop = runner.server, asyncio.get_running_loop()
    assert server is not None  # set up above
    quiet: dict[str, Any] = {"access_log": None}  # one line per request is the load tool's job, not ours
    listener = await loop.create_server(lambda: _JsonErrorProtocol(server, loop=loop, **quiet), host, port,
                                        reuse_address=True)
    try:
        bound = listener.sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}"
    finally:
        listener.close()
        await runner.cleanup()  # closes the open connections, then the app
        await listener.wait_closed()
