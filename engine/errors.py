"""One error tree for jetpool; broker errors are converted at the boundary into these types."""

from __future__ import annotations


class JetpoolError(Exception):
    """Base class of every error jetpool raises on purpose."""


class ConfigError(JetpoolError):
    """The configuration file, an override or a route is invalid; the message names file and key path."""


class BrokerError(JetpoolError):
    """The broker could not be started, reached, or refused a request."""


class PublishError(BrokerError):
    """A publish was not stored: the PubAck carried an error, or no stream answered."""


class PayloadTooLarge(PublishError):
    """A message (body and headers) over the connection's max_payload: never sent, since the server
    answers one by closing the connection. Permanent: the same message is as large on every attempt."""


class PublishTimeout(PublishError):
    """No PubAck arrived within the publish timeout; the publish may or may not be stored."""


class MalformedEvent(JetpoolError):
    """A message body is not a valid jetpool event envelope (not JSON, missing or mistyped fields)."""


class NoRoute(JetpoolError):
    """An event's type has no route in the consuming service."""


class HandlerTimeout(JetpoolError):
    """A handler ran longer than its service's handler_timeout_s and was cancelled."""


class Retry(JetpoolError):
    """Raised by a handler: redeliver this event after ``delay_s`` seconds (a nak with delay)."""

    def __init__(self, delay_s: float = 1.0, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason


class Reject(JetpoolError):
    """Raised by a handler: never retry this event; terminate it and dead-letter it with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
