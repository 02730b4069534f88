"""The payment gateway simulator as an HTTP service (aiohttp), shaped like a card processor's API.

``POST /v1/charges`` and ``POST /v1/refunds`` take JSON and a required ``Idempotency-Key`` header: the
same key returns the first answer (with ``Idempotent-Replayed: true``) and moves no money twice; the
same key with another body is refused (422, ``idempotency_error``). A decline is a business answer
(402, ``card_error``); bad input is a 4xx with a JSON error naming the parameter, never a 500. The
ledger is the shop's PostgreSQL (:mod:`handlers.gateway.ledger`). Faults (latency, failures — half of
them after the money moved, the answer lost —, declines, an outage) are set through
``POST /admin/faults``. ``/health`` answers while the process runs, ``/ready`` while the database does.

Run it as ``jetpool gateway`` (:data:`command`), or let ``jetpool run`` start it locally through the
sidecar :func:`sidecar` (listed in the shop's YAML), which exports its URL to the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from engine.config import Config, load_config
from handlers import SHOP_YAML
from handlers.database import database_url
from handlers.gateway.client import GATEWAY_URL_ENV, gateway_settings
from handlers.gateway.faults import Faults, InvalidFault
from handlers.gateway.ledger import Answer, Charge, KeyReused, Ledger, Refund, RefundRefused, fingerprint

log = structlog.get_logger("jetpool.shop.gateway")

DEFAULT_PORT = 8100
MAX_BODY_BYTES = 64 * 1024
MAX_AMOUNT_CENTS = 99_999_999_999  # what the API accepts at all; the faults' max_amount_cents declines less
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_ORDER = re.compile(r"^[A-Za-z0-9_=:-]{1,128}$")
_CHARGE = re.compile(r"^ch_[0-9a-f]{1,64}$")
_CURRENCY = re.compile(r"^[a-z]{3}$")

LEDGER: web.AppKey[Ledger] = web.AppKey("ledger", Ledger)
STATE: web.AppKey[State] = web.AppKey("state", object)  # type: ignore[arg-type]  # State is defined below


class ApiError(Exception):
    """An answer other than 200: Stripe's error shape, ``{"error": {type, code, message, param}}``."""

    def __init__(self, status: int, type_: str, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "code": self.code, "message": str(self)}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


class State:
    """The gateway's mutable state: the faults in force (and the configured ones), its randomness."""

    def __init__(self, faults: Faults, rng: random.Random | None = None) -> None:
        self.configured = faults
        self.faults = faults
        self.rng = rng or random.Random()


def make_app(ledger: Ledger, faults: Faults, *, rng: random.Random | None = None) -> web.Application:
    """The gateway's aiohttp application over ``ledger``, starting with ``faults``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[LEDGER] = ledger
    app[STATE] = State(faults, rng)
    app.router.add_post("/v1/charges", create_charge)
    app.router.add_post("/v1/refunds", create_refund)
    app.router.add_get("/admin/faults", get_faults)
    app.router.add_post("/admin/faults", set_faults)
    app.router.add_delete("/admin/faults", reset_faults)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON: ours as they are, aiohttp's (404, 405, 413) in the same shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.status, exc.body())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "api_error" if exc.status >= 500 else "invalid_request_error"
        code = {404: "resource_missing", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "error")
        return _json(exc.status, ApiError(exc.status, kind, code, exc.reason).body())


def _json(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


# ---- the API ----

async def create_charge(request: web.Request) -> web.StreamResponse:
    """``POST /v1/charges`` ``{"amount": cents, "currency": "usd", "order": id}``: 200, or 402 if declined."""
    key = _idempotency_key(request)
    body = await _body(request)
    amount = _amount(body, "amount", required=True)
    order = _string(body, "order", _ORDER)
    params = {"amount": amount, "currency": _currency(body), "order": order}
    state = request.app[STATE]
    faults = await _enter(state)
    answer, charge = _decide(state.faults, key, params)
    try:
        stored = await request.app[LEDGER].charge(key, fingerprint("charge", params), order, answer, charge)
    except KeyReused as exc:
        raise ApiError(422, "idempotency_error", "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    return _answer(request, state, faults, stored)


async def create_refund(request: web.Request) -> web.StreamResponse:
    """``POST /v1/refunds`` ``{"charge": id, "amount": cents}`` (amount optional: the whole charge)."""
    key = _idempotency_key(request)
    body = await _body(request)
    charge_id = _string(body, "charge", _CHARGE)
    amount = _amount(body, "amount", required=False)
    state = request.app[STATE]
    faults = await _enter(state)
    ledger = request.app[LEDGER]
    if amount is None:
        found = await ledger.charge_order(charge_id)
        if found is None:
            raise ApiError(400, "invalid_request_error", "resource_missing", f"no such charge: {charge_id!r}",
                           "charge")
        amount = found[1]
    params = {"charge": charge_id, "amount": amount}
    refund = Refund(f"re_{_digest(key)}", charge_id, amount)
    answer = Answer(200, {"id": refund.id, "object": "refund", "charge": charge_id, "amount": amount,
                          "status": "succeeded", "created": int(time.time())})
    try:
        stored = await ledger.refund(key, fingerprint("refund", params), answer, refund)
    except KeyReused as exc:
        raise ApiError(422, "idempotency_error", "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    except RefundRefused as exc:
        raise ApiError(400, "invalid_request_error", exc.code, str(exc), exc.param) from None
    return _answer(request, state, faults, stored)


def _decide(faults: Faults, key: str, params: Mapping[str, Any]) -> tuple[Answer, Charge | None]:
    """Authorize or decline (a decline is stable per order: the same order is always declined)."""
    order, amount = str(params["order"]), int(params["amount"])
    reason = ("amount over limit" if amount > faults.max_amount_cents
              else "card declined" if _fraction(order) < faults.decline_rate else "")
    if reason:
        error = ApiError(402, "card_error", "card_declined", reason, "amount" if "amount" in reason else None)
        return Answer(402, error.body()), None
    charge = Charge(f"ch_{_digest(key)}", order, amount, str(params["currency"]))
    return Answer(200, {"id": charge.id, "object": "charge", "amount": amount, "currency": charge.currency,
                        "order": order, "status": "succeeded", "created": int(time.time())}), charge


async def _enter(state: State) -> Faults:
    """Outage, latency and the failures that happen before anything did; the faults the request runs under."""
    faults = state.faults
    if faults.outage:
        raise ApiError(503, "api_error", "gateway_outage", "the payment gateway is unavailable (outage)")
    delay_s = (faults.latency_ms + state.rng.uniform(0, faults.jitter_ms)) / 1000
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    if faults.failure_rate and state.rng.random() < faults.failure_rate / 2:
        raise ApiError(503, "api_error", "service_unavailable", "the payment gateway failed; retry later")
    return faults


def _answer(request: web.Request, state: State, faults: Faults, stored: Answer) -> web.StreamResponse:
    """The stored answer, unless a failure after the money moved loses it (connection closed, or a 500)."""
    if faults.failure_rate and state.rng.random() < faults.failure_rate / (2 - faults.failure_rate):
        # The second half of the failures: the ledger holds the movement, the caller hears nothing useful.
        if state.rng.random() < 0.5 and request.transport is not None:
            log.debug("gateway.answer_lost", path=request.path)
            request.transport.abort()
            raise asyncio.CancelledError  # nothing more to send on a connection that is gone
        raise ApiError(500, "api_error", "internal_error", "the payment gateway failed after processing")
    headers = {"Idempotent-Replayed": "true"} if stored.replayed else None
    return _json(stored.http_status, stored.body, headers)


# ---- input ----

def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        raise ApiError(400, "invalid_request_error", "parameter_missing", "the Idempotency-Key header is required",
                       "Idempotency-Key")
    if not _KEY.match(key):
        raise ApiError(400, "invalid_request_error", "parameter_invalid",
                       "Idempotency-Key: expected 1 to 255 printable ASCII characters", "Idempotency-Key")
    return key


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "invalid_request_error", "unsupported_media_type",
                       f"expected Content-Type application/json, got {request.content_type or 'none'}")
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request_error", "invalid_json", "expected a JSON object")
    return body


def _amount(body: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    if name not in body and not required:
        return None
    value = body.get(name)
    if value is None:
        raise ApiError(400, "invalid_request_error", "parameter_missing", f"{name} is required", name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_AMOUNT_CENTS:
        raise ApiError(400, "invalid_request_error", "parameter_invalid_integer",
                       f"{name}: expected a positive integer of cents up to {MAX_AMOUNT_CENTS}, got {value!r:.60}",
                       name)
    return value


def _currency(body: Mapping[str, Any]) -> str:
    value = body.get("currency", "usd")
    if not isinstance(value, str) or not _CURRENCY.match(value):
        raise ApiError(400, "invalid_request_error", "parameter_invalid",
                       f"currency: expected a three-letter lowercase ISO code, got {value!r:.60}", "currency")
    return value


def _string(body: Mapping[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = body.get(name)
    if value is None:
        raise ApiError(400, "invalid_request_error", "parameter_missing", f"{name} is required", name)
    if not isinstance(value, str) or not pattern.match(value):
        raise ApiError(400, "invalid_request_error", "parameter_invalid",
                       f"{name}: expected a string matching {pattern.pattern}, got {value!r:.60}", name)
    return value


# ---- admin and probes ----

async def get_faults(request: web.Request) -> web.StreamResponse:
    """``GET /admin/faults``: the faults in force."""
    return _json(200, request.app[STATE].faults.as_dict())


async def set_faults(request: web.Request) -> web.StreamResponse:
    """``POST /admin/faults`` ``{"outage": true, "failure_rate": 0.2, ...}``: change some; answer all."""
    state = request.app[STATE]
    try:
        state.faults = state.faults.updated(await _body(request))
    except InvalidFault as exc:
        raise ApiError(422, "invalid_request_error", "parameter_invalid", str(exc), exc.param) from None
    log.info("gateway.faults", **state.faults.as_dict())
    return _json(200, state.faults.as_dict())


async def reset_faults(request: web.Request) -> web.StreamResponse:
    """``DELETE /admin/faults``: back to the configured faults."""
    state = request.app[STATE]
    state.faults = state.configured
    log.info("gateway.faults", **state.faults.as_dict())
    return _json(200, state.faults.as_dict())


async def health(request: web.Request) -> web.StreamResponse:
    return _json(200, {"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    try:
        await request.app[LEDGER].ping()
    except (OSError, TimeoutError) as exc:
        return _json(503, {"status": "unavailable", "reason": f"database: {type(exc).__name__}"})
    except Exception as exc:  # asyncpg's errors share no base class with OSError
        return _json(503, {"status": "unavailable", "reason": f"database: {type(exc).__name__}"})
    return _json(200, {"status": "ready"})


def _fraction(text: str) -> float:
    """A stable number in [0, 1) for a string: the same order always gets the same verdict."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# ---- running it ----

@contextlib.asynccontextmanager
async def running(ledger: Ledger, faults: Faults, host: str = "127.0.0.1", port: int = 0,
                  rng: random.Random | None = None) -> AsyncIterator[str]:
    """Serve the gateway on ``host:port`` (0: any free port) in this event loop; yield its base URL."""
    runner = web.AppRunner(make_app(ledger, faults, rng=rng), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(settings: Mapping[str, Any], host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                dsn: str | None = None) -> AsyncIterator[str]:
    """The gateway on its ledger (``dsn``, else the shop's database); faults from ``settings``; yield its URL."""
    faults = Faults.from_settings(settings)
    ledger = await Ledger.open(dsn or database_url())
    try:
        async with running(ledger, faults, host, port) as url:
            log.info("gateway.started", url=url, pid=os.getpid(), **faults.as_dict())
            yield url
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def sidecar(config: Config) -> AsyncIterator[None]:
    """``jetpool run``'s sidecar: a local gateway unless one is configured, its URL exported to the workers.

    Configured means ``JETPOOL_SHOP_GATEWAY_URL`` is set or the payments service's ``settings.gateway.url``
    is; then this does nothing. Otherwise the gateway listens on 127.0.0.1 at ``settings.gateway.port``
    (8100; 0 picks a free port) and its URL is in ``JETPOOL_SHOP_GATEWAY_URL`` while the engine runs.
    Needs the shop's database: list ``handlers.database:sidecar`` before it.
    """
    settings = gateway_settings(config)
    if os.environ.get(GATEWAY_URL_ENV) or settings.get("url"):
        yield
        return
    async with serve(settings, "127.0.0.1", int(settings.get("port", DEFAULT_PORT))) as url:
        os.environ[GATEWAY_URL_ENV] = url
        try:
            yield
        finally:
            os.environ.pop(GATEWAY_URL_ENV, None)


class GatewayCommand:
    """``jetpool gateway``: the payment gateway simulator as its own service (a Deployment in Kubernetes)."""

    name = "gateway"
    help = "run the payment gateway simulator (HTTP; its ledger in the shop's PostgreSQL)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
        parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0: any)")
        parser.add_argument("-c", "--config", default=str(SHOP_YAML),
                            help="YAML whose payments settings.gateway gives the starting faults "
                                 "(default: the shop's, installed with the package)")
        parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    async def run(self, args: argparse.Namespace) -> int:
        settings = gateway_settings(load_config(Path(args.config)))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with serve(settings, args.host, args.port):
            await stop.wait()
        log.info("gateway.stopped")
        return 0


command = GatewayCommand()
