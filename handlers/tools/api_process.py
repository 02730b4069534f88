"""The order API as a child process (``python -m engine api``) of a tool or a test, stopped by its PID.

The demo runs the API beside the engine as a deployment does (its own process and NATS connection), so the
orders it places come in over HTTP and the engine's workers are left the CPU they would have deployed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from handlers.service_process import ServiceProcess


class ApiProcess(ServiceProcess):
    """One ``python -m engine api`` on 127.0.0.1 at a free port.

    Args:
        config: the shop's YAML.
        nats_url: the broker it connects to.
        log_path: the process's output (None: discarded).
        env: its environment (default: this process's); NATS credentials go here (``JETPOOL_NATS_USER``...).
        tied: SIGTERM it when the thread that started it ends (see :mod:`engine.lifeline`).
    """

    def __init__(self, config: Path, nats_url: str, log_path: Path | None = None, *,
                 env: Mapping[str, str] | None = None, tied: bool = False) -> None:
        # The URL goes in the environment, never in argv: ps shows argv (and a password in it) to everyone.
        env = {k: v for k, v in (os.environ if env is None else env).items() if k != "JETPOOL__NATS__URL"}
        super().__init__("the order API", log_path, {**env, "JETPOOL_NATS_URL": nats_url}, tied)
        self.config = config
        self.nats_url = nats_url

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "engine", "api", "-c", str(self.config),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]

    def start(self, ready_timeout_s: float = 60.0) -> Self:
        """Start it and wait until ``/ready`` answers 200 (connected, the orders bucket provisioned)."""
        return super().start(ready_timeout_s)
