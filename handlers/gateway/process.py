"""The gateway as a child process (``python -m handlers.gateway``) of a tool or a test, stopped by its PID.

The demo, the chaos shop and the tests run the gateway apart from the engine, as a deployment does: it
outlives worker kills and engine restarts, and its faults are changed over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping, MutableMapping
from pathlib import Path
from typing import Self

from engine.errors import JetpoolError
from engine.lifeline import die_with_parent
from handlers.database import DATABASE_URL_ENV, database_url
from handlers.gateway.client import GATEWAY_URL_ENV


class GatewayStartError(JetpoolError):
    """The gateway process exited or did not become ready."""


class GatewayProcess:
    """One ``python -m handlers.gateway`` on 127.0.0.1 at a free port.

    Args:
        dsn: the ledger's database.
        config: the YAML whose payments ``settings.gateway`` gives the starting faults (None: the shop's).
        log_path: the process's output (None: discarded).
        env: its environment (default: this process's), the DSN added.
        tied: SIGTERM it when the thread that started it ends (see :mod:`engine.lifeline`).
    """

    def __init__(self, dsn: str, config: Path | None = None, log_path: Path | None = None, *,
                 env: Mapping[str, str] | None = None, tied: bool = False) -> None:
        self.dsn = dsn
        self.config = config
        self.log_path = log_path
        self.env = {**(os.environ if env is None else env), DATABASE_URL_ENV: dsn}
        self.tied = tied
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, ready_timeout_s: float = 30.0) -> Self:
        """Start it and wait until ``/ready`` answers 200."""
        port = _free_port()
        args = [sys.executable, "-m", "handlers.gateway", "--port", str(port), "--log-level", "info"]
        if self.config is not None:
            args += ["-c", str(self.config)]
        preexec = die_with_parent(signal.SIGTERM) if self.tied else None
        with open(self.log_path or os.devnull, "ab") as out:
            self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=out, start_new_session=True,
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
                raise GatewayStartError(f"the payment gateway exited with code {self.proc.returncode}"
                                     + (f" (see {self.log_path})" if self.log_path else ""))
            with (contextlib.suppress(urllib.error.URLError, OSError),
                  urllib.request.urlopen(f"{self.url}/ready", timeout=1) as response):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise GatewayStartError(f"the payment gateway at {self.url} was not ready within {timeout_s}s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def gateway_process(config: Path, log_path: Path,
                          env: MutableMapping[str, str] | None = None) -> AsyncIterator[str | None]:
    """A gateway process for a local run (the demo) unless ``JETPOOL_SHOP_GATEWAY_URL`` is set; its URL
    exported there while the block runs (the engine started inside inherits it and starts none itself).

    Needs the shop's database (``JETPOOL_SHOP_DATABASE_URL``, or the running embedded server).
    """
    env = os.environ if env is None else env
    if env.get(GATEWAY_URL_ENV):
        yield env[GATEWAY_URL_ENV]
        return
    gateway = GatewayProcess(database_url(env), config, log_path, env=env, tied=True)
    await asyncio.to_thread(gateway.start)  # tied to the loop's (main) thread, which outlives the run
    env[GATEWAY_URL_ENV] = gateway.url
    try:
        yield gateway.url
    finally:
        env.pop(GATEWAY_URL_ENV, None)
        await asyncio.to_thread(gateway.stop)
