"""structlog set-up: JSON lines for machines, a readable renderer when attached to a terminal."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)


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
