"""The payment gateway simulator: its own HTTP service, and the client the payments service calls it with.

- :mod:`handlers.gateway.server` — the aiohttp service (``jetpool gateway``, or ``jetpool run``'s sidecar);
- :mod:`handlers.gateway.ledger` — its ledger in the shop's PostgreSQL (schema ``ledger``);
- :mod:`handlers.gateway.faults` — latency, failures, declines and the outage switch;
- :mod:`handlers.gateway.client` — one pooled HTTP client per payments worker process.

See docs/gateway.md. Only the client's names are imported here: a payments worker never loads the server.
"""

from handlers.gateway.client import (
    GATEWAY_URL_ENV,
    GatewayClient,
    GatewayError,
    GatewayNotConfigured,
    GatewayUnavailable,
    Result,
    close_clients,
    gateway_for,
    gateway_settings,
    gateway_url,
)

__all__ = [
    "GATEWAY_URL_ENV",
    "GatewayClient",
    "GatewayError",
    "GatewayNotConfigured",
    "GatewayUnavailable",
    "Result",
    "close_clients",
    "gateway_for",
    "gateway_settings",
    "gateway_url",
]
