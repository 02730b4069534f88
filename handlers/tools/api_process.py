"""The order API as a child process (``python -m engine api``) of a tool or a test, stopped by its PID.

The demo runs the API beside the engine as a deployment does (its own process and NATS connection), so the
orders it places come in over HTTP and the engine's workers are left the CPU they would have deployed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from engine.errors import JetpoolError
from engine.lifeline import die_with_parent


class ApiStartError(JetpoolError):
    """The API process exited or did not become ready."""


class ApiProcess:
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
        self.config = config
        self.nats_url = nats_url
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.tied = tied
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, ready_timeout_s: float = 60.0) -> Self:
        """Start it and wait until ``/ready`` answers 200 (connected, the orders bucket provisioned)."""
        port = _free_port()
        # The URL goes in the environment, never in argv: ps shows argv (and a password in it) to everyone.
        args = [sys.executable, "-m", "engine", "api", "-c", str(self.config),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
        env = {k: v for k, v in self.env.items() if k != "JETPOOL__NATS__URL"}
        env["JETPOOL_NATS_URL"] = self.nats_url
        preexec = die_with_parent(signal.SIGTERM) if self.tied else None
        with open(self.log_path or os.devnull, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=out, start_new_session=True,
                                         preexec_fn=preexec)
        self.url = f"http://127.0.0.1:{port}"
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
                return

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ApiStartError(f"the order API exited with code {self.proc.returncode}"
                                    + (f" (see {self.log_path})" if self.log_path else ""))
            with (contextlib.suppress(urllib.error.URLError, OSError),
                  urllib.request.urlopen(f"{self.url}/ready", timeout=1) as response):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise ApiStartError(f"the order API at {self.url} was not ready within {timeout_s}s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
