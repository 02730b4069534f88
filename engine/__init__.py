"""jetpool: a multiprocess, high-throughput worker engine for NATS JetStream.

Read the modules in the order an event travels: config → supervisor → worker → consumer →
dispatch → (handler) → publisher → outcome.
"""

from engine.dispatch import Context, Handler, Middleware
from engine.errors import Reject, Retry
from engine.events import Event

__all__ = ["Context", "Event", "Handler", "Middleware", "Reject", "Retry"]
