"""Everything that touches nats-py's or prometheus-client's internals, behind one fence.

Four fast paths, each measured to matter on the hot path, each with a fallback to the public API:

- :mod:`~engine.transport.parser`: a protocol reader that splits ``MSG``/``HMSG`` lines (``Client._ps``);
- :mod:`~engine.transport.inbox`: the two hot subscriptions delivered inline by the read loop
  (``Client._process_msg``, ``_process_headers``, ``_subs``, ``Subscription._id``);
- :mod:`~engine.transport.outbox`: ``PUB``/``HPUB`` commands appended to the pending buffer
  (``Client._pending``, ``_flush_queue``, ``_flusher_task``...);
- :mod:`~engine.transport.histogram`: pre-bucketed durations added to a Histogram's ``_buckets``/``_sum``.

Whether a path may go in is decided by :mod:`~engine.transport.fence`: the installed package's version
must lie in :data:`SUPPORTED` and the private names must be there; otherwise the path falls back, logs
``fast_path.fallback`` once and ``jetpool_fast_path{path}`` reads 0 (1 while in use). Decisions are
taken where a path is installed, never per message.

Entry points: :func:`install` for every connection (the parser, and the inbox and outbox checks, so the
gauge reads true from the connect on); :func:`inline` for each hot subscription; :class:`Outbox` for
each publishing component; :func:`histogram.add <engine.transport.histogram.add>` for the metrics
flush, which decides on its first call. docs/nats-py.md says what to do when a new nats-py lands.
"""

from __future__ import annotations

from typing import Any

from engine.transport import histogram, inbox, outbox, parser
from engine.transport.fence import FAST_PATH, PATHS, SUPPORTED, fallback_reason
from engine.transport.inbox import Message, header, inline, is_inline
from engine.transport.outbox import Outbox, header_bytes

__all__ = ["FAST_PATH", "PATHS", "SUPPORTED", "Message", "Outbox", "fallback_reason", "header", "header_bytes",
           "histogram", "inbox", "inline", "install", "is_inline", "outbox", "parser"]


def install(nc: Any) -> dict[str, bool]:
    """Put the fast paths the fence allows on ``nc`` (a connected ``nats.aio.client.Client``).

    Installs the fast parser, and checks that ``nc`` allows inline delivery and direct writes (used
    later by :func:`inline` and :class:`Outbox`), setting ``jetpool_fast_path`` for the three.

    Returns:
        ``{"parser": ..., "inbox": ..., "outbox": ...}``: True where the fast path is in use.
    """
    return {"parser": parser.install(nc), "inbox": inbox.available(nc), "outbox": outbox.available(nc)}
