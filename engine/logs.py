"""structlog set-up: JSON lines for machines, a readable renderer when attached to a terminal."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
MAX_FIELD_CHARS = 512
# A traceback is written by the engine and read in full when debugging; it is bounded all the same,
# since its last line quotes the exception, whose message may carry what a producer sent.
MAX_TRACEBACK_CHARS = 16_384


def configure_logging(level: str = "info", fmt: str = "auto", **context: Any) -> None:
    """Configure structlog for this process; ``context`` (service, worker...) is bound to every line."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            bound_fields,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)


def bound_fields(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: cut every over-long value of a record, with a marker.

    Field values often come from events (a reason quoting bad input, an aggregate id, an error's text):
    a producer can make them megabytes long, and one log line must not be. A string longer than
    :data:`MAX_FIELD_CHARS` (:data:`MAX_TRACEBACK_CHARS` for ``exception``) keeps its start and ends with
    ``…(+N chars)``; any other value (a dict, an exception) whose ``repr``, which is how the renderers
    print it, is that long is replaced by its ``repr`` cut the same way.
    """
    for key, value in event_dict.items():
        limit = MAX_TRACEBACK_CHARS if key == "exception" else MAX_FIELD_CHARS
        if value is None or isinstance(value, bool | int | float):
            continue
        text = value if isinstance(value, str) else repr(value)
        if len(text) > limit:
            event_dict[key] = f"{text[:limit]}…(+{len(text) - limit} chars)"
    return event_dict


def json_records(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON log record in ``text``, written by several processes to one file.

    Two processes' writes can interleave, so a line may hold more than one record: each line is
    decoded record by record.
    """
    decoder = json.JSONDecoder()
    for line in text.splitlines():
        position = line.find("{")
        while position != -1:
            try:
                record, end = decoder.raw_decode(line, position)
            except ValueError:
                break
            if isinstance(record, dict):
                yield record
            position = line.find("{", end)
