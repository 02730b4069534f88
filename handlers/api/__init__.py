"""The shop's HTTP order API: ``POST /orders`` with an ``Idempotency-Key``, ``GET /orders/{id}[?wait=5s]``.

- :mod:`handlers.api.orders_input` — the boundary: what a request may carry, Stripe-shaped errors;
- :mod:`handlers.api.service` — the broker side: one order per key, the order's state, waiting for its end;
- :mod:`handlers.api.server` — the aiohttp application and the OpenAPI document (``openapi.yaml``);
- :mod:`handlers.api.run` — ``jetpool api`` (:data:`command`) and ``jetpool run``'s :func:`sidecar`.

See docs/api.md.
"""

from handlers.api.run import DEFAULT_PORT, PORT_ENV, URL_ENV, command, serve, sidecar

__all__ = ["DEFAULT_PORT", "PORT_ENV", "URL_ENV", "command", "serve", "sidecar"]
