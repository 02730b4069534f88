"""Log set-up: JSON lines unless a person is watching the terminal, and the configured level filters."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
import yaml

from engine import cli
from engine.config import load_config
from engine.logs import configure_logging, json_records

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Stream(io.StringIO):
    """A stderr stand-in that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


SwapStderr = Callable[[bool], Stream]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[SwapStderr]:
    """Swap sys.stderr for a :class:`Stream`; structlog's process-wide set-up is reset afterwards."""

    def swap(tty: bool) -> Stream:
        stream = Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    try:
        yield swap
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()


def emit(level: str = "warning") -> None:
    getattr(structlog.get_logger("test"), level)("event.failed", event_id="e-1", stream_seq=7)


@pytest.mark.parametrize(("tty", "fmt", "as_json"), [
    (False, "auto", True), (True, "auto", False), (True, "json", True), (False, "console", False),
], ids=["auto-file", "auto-terminal", "json-terminal", "console-file"])
def test_json_for_machines_console_for_a_terminal(tty: bool, fmt: str, as_json: bool, stderr: SwapStderr) -> None:
    stream = stderr(tty)
    configure_logging("info", fmt, service="payments", worker=1)
    emit()
    text = stream.getvalue()
    assert text.count("\n") == 1, text
    if as_json:
        record = json.loads(text)
        assert record["event"] == "event.failed" and record["level"] == "warning"
        assert (record["service"], record["worker"], record["event_id"], record["stream_seq"]) == ("payments", 1,
                                                                                                   "e-1", 7)
        assert record["timestamp"].endswith("Z")
    else:
        plain = ANSI.sub("", text)
        assert not plain.lstrip().startswith("{")
        assert "event.failed" in plain and "warning" in plain
        assert "service=payments" in plain and "event_id=e-1" in plain and "stream_seq=7" in plain


@pytest.mark.parametrize(("level", "shown"), [
    ("debug", ["debug", "info", "warning", "error"]),
    ("info", ["info", "warning", "error"]),
    ("warning", ["warning", "error"]),
    ("error", ["error"]),
])
def test_the_level_filters(level: str, shown: list[str], stderr: SwapStderr) -> None:
    stream = stderr(False)
    configure_logging(level, "json")
    for method in ("debug", "info", "warning", "error"):
        emit(method)
    assert [r["level"] for r in json_records(stream.getvalue())] == shown


def test_the_level_comes_from_the_config_or_the_environment(tmp_path: Path, stderr: SwapStderr) -> None:
    path = tmp_path / "jetpool.yaml"
    path.write_text(yaml.safe_dump({
        "streams": [{"name": "S", "subjects": ["events.>"]}],
        "services": {"echo": {"stream": "S", "routes": {"Ping": "handlers.examples:echo"}}},
        "log": {"level": "warning", "format": "json"},
    }))
    assert load_config(path, env={}).log.level == "warning"
    cfg = load_config(path, env={"JETPOOL_LOG_LEVEL": "error"})
    assert cfg.log.level == "error"

    stream = stderr(True)
    configure_logging(cfg.log.level, cfg.log.format)  # as a worker does
    emit("warning")
    emit("error")
    assert [r["level"] for r in json_records(stream.getvalue())] == ["error"]


@pytest.mark.parametrize(("command", "shown"), [
    ("run", ["error"]), ("provision", ["error"]), ("dlq", ["error"]), ("demo", ["warning", "error"]),
])
def test_the_supervisor_and_tools_log_as_the_config_says(command: str, shown: list[str], tmp_path: Path,
                                                         stderr: SwapStderr, monkeypatch: pytest.MonkeyPatch) -> None:
    """``jetpool run``/``provision``/``dlq`` take log.level and JETPOOL_LOG_LEVEL as workers do; demo stays quiet."""
    path = tmp_path / "jetpool.yaml"
    path.write_text(yaml.safe_dump({
        "streams": [{"name": "S", "subjects": ["events.>"]}],
        "services": {"echo": {"stream": "S", "routes": {"Ping": "handlers.examples:echo"}}},
        "log": {"level": "info", "format": "json"},
    }))
    monkeypatch.setenv("JETPOOL_LOG_LEVEL", "error")
    stream = stderr(False)
    configure_logging("warning")  # what cli.main sets before the config is read
    cli.load(argparse.Namespace(command=command, config=str(path)))
    for method in ("info", "warning", "error"):
        emit(method)
    assert [r["level"] for r in json_records(stream.getvalue())] == shown


def test_records_interleaved_on_one_line_are_all_read() -> None:
    text = 'noise {"event": "a", "n": 1}{"event": "b"}\n{"event": "c", "nested": {"x": 1}} trailing {broken\n'
    assert [r["event"] for r in json_records(text)] == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_megabyte_field_makes_a_short_line(fmt: str, stderr: SwapStderr) -> None:
    """A value a producer controls (a reason quoting bad input, an aggregate id) is cut, with a marker."""
    stream = stderr(False)
    configure_logging("info", fmt)
    huge = "x" * 1_000_000
    structlog.get_logger("test").warning("event.bad_input", reason=huge, aggregate_id="order-1", attempt=3,
                                         headers={"X-Big": huge}, small={"a": 1}, error=ValueError(huge))
    text = stream.getvalue()
    assert text.count("\n") == 1 and len(text) < 2_500, len(text)
    assert "order-1" in text
    if fmt == "console":
        assert "x" * 512 + "…(+999488 chars)" in text
    else:
        record = json.loads(text)
        assert record["reason"] == "x" * 512 + "…(+999488 chars)"
        assert record["headers"].startswith("{'X-Big': 'xxx") and record["headers"].endswith(" chars)")
        assert record["error"].startswith("ValueError('xxx") and record["error"].endswith(" chars)")
        assert (record["attempt"], record["small"]) == (3, {"a": 1})  # short values are left alone


def test_a_traceback_is_kept_longer_but_bounded(stderr: SwapStderr) -> None:
    stream = stderr(False)
    configure_logging("info", "json")
    try:
        raise ValueError("y" * 1_000_000)
    except ValueError:
        structlog.get_logger("test").exception("handler.failed")
    record = json.loads(stream.getvalue())
    assert record["exception"].startswith("Traceback (most recent call last)")
    assert 16_384 < len(record["exception"]) < 16_500
