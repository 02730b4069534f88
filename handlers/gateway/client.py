"""What the payments service uses to reach the gateway over HTTP: one pooled client session per worker process.

Where the gateway is: ``JETPOOL_SHOP_GATEWAY_URL`` (exported by ``jetpool run``'s gateway sidecar, or set
from the Deployment), else the payments service's ``settings.gateway.url``. The other settings of that
mapping this module reads: ``connect_timeout_s`` (1), ``timeout_s`` (5, the whole request) and
``max_connections`` (64, the pool's size).

Answers map onto what the saga needs: 200 → :class:`Result` ``authorized``/``refunded``; 402 → a
``declined`` Result (a business answer: the breaker counts it as a success); any other 4xx → an
``invalid`` Result (the request is wrong; retrying will not help); a 5xx, a timeout or a lost
connection → :class:`GatewayError` (503 with ``gateway_outage``: :class:`GatewayUnavailable`), which
the breaker counts and the engine retries.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from engine.config import Config
from engine.errors import JetpoolError

GATEWAY_URL_ENV = "JETPOOL_SHOP_GATEWAY_URL"


class GatewayError(Exception):
    """The gateway did not answer usefully (timeout, connection lost, 5xx): retry later."""


class GatewayUnavailable(GatewayError):
    """The gateway is in an outage."""


class GatewayNotConfigured(JetpoolError):
    """Nobody said where the gateway is."""


@dataclass(frozen=True, slots=True)
class Result:
    """What the gateway answered.

    Attributes:
        status: ``authorized`` | ``declined`` for charges, ``refunded`` for refunds, ``invalid`` for a
            request the gateway refused as malformed (``reason`` says why).
        reference: the gateway's id for the money movement (empty when declined).
        reason: why a charge was declined or a request refused.
        replayed: True when the idempotency key was seen before (no money moved this time).
    """

    status: str
    reference: str = ""
    reason: str = ""
    replayed: bool = False


class GatewayClient:
    """An HTTP client of the gateway; its session (and connection pool) opens on first use.

    Args:
        url: the gateway's base URL (``http://host:port``).
        connect_timeout_s: limit on opening a connection.
        timeout_s: limit on a whole request, connection included.
        max_connections: the pool's size.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0, timeout_s: float = 5.0,
                 max_connections: int = 64) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector,
                                                  json_serialize=lambda v: orjson.dumps(v).decode())
        return self._session

    async def charge(self, order_id: str, amount_cents: int, idempotency_key: str, currency: str = "usd") -> Result:
        """Charge an order; the same ``idempotency_key`` never charges twice."""
        status, body, replayed = await self._post("/v1/charges", idempotency_key,
                                                  {"order": order_id, "amount": amount_cents, "currency": currency})
        if status == 200:
            return Result("authorized", str(body["id"]), replayed=replayed)
        return _refused(status, body, replayed)

    async def refund(self, order_id: str, charge_reference: str, amount_cents: int, idempotency_key: str) -> Result:
        """Refund a charge (``order_id`` is the charge's, for the caller's logs); the same key never refunds twice."""
        status, body, replayed = await self._post("/v1/refunds", idempotency_key,
                                                  {"charge": charge_reference, "amount": amount_cents})
        if status == 200:
            return Result("refunded", str(body["id"]), replayed=replayed)
        return _refused(status, body, replayed)

    async def faults(self) -> dict[str, Any]:
        """The faults in force (``GET /admin/faults``)."""
        async with self.session.get(f"{self.url}/admin/faults") as response:
            return await _admin(response)

    async def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change some faults (``POST /admin/faults``); the faults now in force."""
        async with self.session.post(f"{self.url}/admin/faults", json=changes) as response:
            return await _admin(response)

    async def reset_faults(self) -> dict[str, Any]:
        """Back to the configured faults (``DELETE /admin/faults``)."""
        async with self.session.delete(f"{self.url}/admin/faults") as response:
            return await _admin(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, key: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any], bool]:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(f"{self.url}{path}")
        try:
            # A parsed URL and a body already in bytes: aiohttp would parse and encode them per request.
            async with self.session.post(url, data=orjson.dumps(dict(body)),
                                         headers={"Content-Type": "application/json",
                                                  "Idempotency-Key": key}) as response:
                raw = await response.read()
                status = response.status
                replayed = response.headers.get("Idempotent-Replayed") == "true"
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(f"payment gateway {path}: {type(exc).__name__}: {exc}") from None
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if status >= 500 or not isinstance(parsed, dict):
            error = parsed.get("error", {}) if isinstance(parsed, dict) else {}
            if status == 503 and isinstance(error, dict) and error.get("code") == "gateway_outage":
                raise GatewayUnavailable(f"payment gateway unavailable (outage): {path}")
            raise GatewayError(f"payment gateway {path}: HTTP {status}")
        return status, parsed, replayed


def _refused(status: int, body: Mapping[str, Any], replayed: bool) -> Result:
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message", f"HTTP {status}"))
    if status == 402:
        return Result("declined", reason=message, replayed=replayed)
    param = f" ({error['param']})" if error.get("param") else ""
    return Result("invalid", reason=f"HTTP {status} {error.get('code', '')}: {message}{param}", replayed=replayed)


async def _admin(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = orjson.loads(await response.read())
    if response.status != 200:
        raise GatewayError(f"payment gateway admin: HTTP {response.status}: {body}")
    return dict(body)


def gateway_settings(config: Config) -> dict[str, Any]:
    """The payments service's ``settings.gateway`` mapping in ``config`` (empty if there is none)."""
    for svc in config.services.values():
        if "handlers.payments:charge" in svc.routes.values():
            settings = svc.settings.get("gateway", {})
            return dict(settings) if isinstance(settings, dict) else {}
    return {}


def gateway_url(settings: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """The gateway's base URL: ``JETPOOL_SHOP_GATEWAY_URL``, else ``settings['url']``.

    Raises:
        GatewayNotConfigured: neither is set.
    """
    env = os.environ if env is None else env
    url = env.get(GATEWAY_URL_ENV) or settings.get("url")
    if not url:
        raise GatewayNotConfigured(f"no payment gateway: set {GATEWAY_URL_ENV} or the payments service's "
                                   "settings.gateway.url, or let 'jetpool run' start one (the shop's "
                                   "handlers.gateway.server:sidecar)")
    return str(url)


# One client per process and event loop: an aiohttp session belongs to the loop that opened it.
_clients: dict[tuple[str, str], tuple[asyncio.AbstractEventLoop, GatewayClient]] = {}


# The last answer of gateway_for: its settings (held, so their id is not reused), URL, loop and client.
_last: tuple[Mapping[str, Any], str, asyncio.AbstractEventLoop, GatewayClient] | None = None


def gateway_for(settings: Mapping[str, Any], env: Mapping[str, str] | None = None) -> GatewayClient:
    """This process's client of the gateway for these settings (built once per event loop, then reused).

    Called per payment with the service's own settings mapping: the same mapping, URL and loop as the
    last call answer at once, without building the lookup key. So a mapping must not be changed in place
    once used (a service's settings never are: they are read from its config once).
    """
    global _last
    url = gateway_url(settings, env)
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0] is settings and last[1] == url and last[2] is loop:
        return last[3]
    client = _client_for(settings, url, loop)
    _last = (settings, url, loop, client)
    return client


def _client_for(settings: Mapping[str, Any], url: str, loop: asyncio.AbstractEventLoop) -> GatewayClient:
    key = (url, orjson.dumps(dict(settings), option=orjson.OPT_SORT_KEYS).decode())
    entry = _clients.get(key)
    if entry is None or entry[0] is not loop:
        client = GatewayClient(url, connect_timeout_s=float(settings.get("connect_timeout_s", 1.0)),
                               timeout_s=float(settings.get("timeout_s", 5.0)),
                               max_connections=int(settings.get("max_connections", 64)))
        entry = _clients[key] = (loop, client)
    return entry[1]


async def close_clients() -> None:
    """Close this event loop's clients (a process that is done with the gateway, or a test)."""
    global _last
    loop = asyncio.get_running_loop()
    if _last is not None and _last[2] is loop:
        _last = None
    for key, (owner, client) in list(_clients.items()):
        if owner is loop:
            del _clients[key]
            await client.close()
