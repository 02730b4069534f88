"""A config's sidecars: imported by key path, entered in order around the run, exited in reverse."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from engine.config import Config, parse_config
from engine.errors import ConfigError
from engine.runtime import resolve_sidecars, sidecars

EVENTS: list[str] = []


@contextlib.asynccontextmanager
async def first(cfg: Config) -> AsyncIterator[None]:
    EVENTS.append(f"start first for {cfg.app}")
    try:
        yield
    finally:
        EVENTS.append("stop first")


@contextlib.asynccontextmanager
async def second(cfg: Config) -> AsyncIterator[None]:
    EVENTS.append("start second")
    try:
        yield
    finally:
        EVENTS.append("stop second")


def config(*targets: str) -> Config:
    return parse_config({"app": "demo", "streams": [{"name": "S", "subjects": ["events.>"]}],
                         "services": {"echo": {"stream": "S", "routes": {"Ping": "handlers.examples:echo"}}},
                         "sidecars": list(targets)}, source="app.yaml")


def test_sidecars_start_in_order_and_stop_in_reverse_also_when_the_run_fails() -> None:
    cfg = config(f"{__name__}:first", f"{__name__}:second")
    EVENTS.clear()

    async def run() -> None:
        async with sidecars(cfg, resolve_sidecars(cfg)):
            EVENTS.append("workers")
            raise RuntimeError("the supervisor failed")

    with pytest.raises(RuntimeError):
        asyncio.run(run())
    assert EVENTS == ["start first for demo", "start second", "workers", "stop second", "stop first"]


def test_a_bad_sidecar_names_its_key_path() -> None:
    with pytest.raises(ConfigError, match=r"^app\.yaml: sidecars\[1\]: module 'test_x' has no function|"
                                          r"^app\.yaml: sidecars\[1\]: cannot import module 'nowhere'"):
        resolve_sidecars(config(f"{__name__}:first", "nowhere:at_all"))
    with pytest.raises(ConfigError, match=r"^app\.yaml: sidecars: expected 'module:function', got 'no-colon'$"):
        config("no-colon")
