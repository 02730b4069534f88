"""One of the shop's HTTP services (the gateway, the order API) as a child process of a tool or a test.

It listens on 127.0.0.1 at a free port, is ready when its ``/ready`` answers 200, and is stopped by its
PID (SIGTERM, then SIGKILL). ``tied``: it gets SIGTERM when the thread that started it ends (see
:mod:`engine.lifeline`), so a killed tool leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from engine.errors import JetpoolError
from engine.lifeline import die_with_parent
from engine.ports import free_port


class ServiceStartError(JetpoolError):
    """The service's process exited or did not become ready."""


class ExitedEarly(ServiceStartError):
    """The service's process exited before it was ready."""


_START_ATTEMPTS = 3


class ServiceProcess:
    """Start, wait for and stop one HTTP service process; subclasses say which (:meth:`command`).

    Args:
        what: how errors name it, e.g. "the payment gateway".
        log_path: the process's output (None: discarded).
        env: its environment.
        tied: SIGTERM it when the thread that started it ends.
    """

    def __init__(self, what: str, log_path: Path | None, env: Mapping[str, str], tied: bool) -> None:
        self.what = what
        self.log_path = log_path
        self.env = dict(env)
        self.tied = tied
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def command(self, port: int) -> list[str]:
        """The argv that serves on 127.0.0.1:``port``."""
        raise NotImplementedError

    def start(self, ready_timeout_s: float = 30.0) -> Self:
        """Start it and wait until ``/ready`` answers 200.

        The port is free when picked, not necessarily when the child binds it: a child that exits before
        it is ready while something else listens on its port is started again on a new port, up to three
        times in all. Any other early exit fails at once.
        """
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = free_port()
            preexec = die_with_parent(signal.SIGTERM) if self.tied else None
            with open(self.log_path or os.devnull, "ab") as out:
                self.proc = subprocess.Popen(self.command(port), env=self.env, stdout=out, stderr=out,
                                             start_new_session=True, preexec_fn=preexec)
            self.url = f"http://127.0.0.1:{port}"
            try:
                self._wait_ready(ready_timeout_s)
                return self
            except ExitedEarly:
                if attempt == _START_ATTEMPTS or not _listening(port):
                    raise
            except BaseException:
                self.stop()
                raise
        return self  # not reached: the last attempt returned or raised

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
                raise ExitedEarly(f"{self.what} exited with code {self.proc.returncode}"
                                        + (f" (see {self.log_path})" if self.log_path else ""))
            with (contextlib.suppress(urllib.error.URLError, OSError),
                  urllib.request.urlopen(f"{self.url}/ready", timeout=1) as response):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise ServiceStartError(f"{self.what} at {self.url} was not ready within {timeout_s}s")


def _listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` (our child has exited: someone else)."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
