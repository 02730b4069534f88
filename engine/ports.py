"""Free loopback ports for the servers the project starts, picked outside the kernel's ephemeral range.

A port asked of the kernel with ``bind(0)`` comes from the ephemeral range, the one every outgoing
connection on the machine draws its local port from. A server that is stopped and started again on
"its" port (a broker restarted under its clients, a cluster node) can then find the port taken by some
client's connection made meanwhile, and exit on "address already in use". Ports below that range are
never handed out implicitly, so only another explicit bind can take one. Each pick is checked by
binding it; picks are random, so two processes picking at once rarely collide (and a server that picked
its own port starts again on a new one when it does).
"""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below: well-known and registered services crowd the space
HIGHEST_BELOW = 30_000  # Kubernetes NodePorts (30000-32767) may be redirected on loopback with no socket bound
_TRIES = 200
_RANDOM = random.SystemRandom()  # not the global generator: a test that seeds it must not make picks repeat


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for implicitly bound local ports (Linux's default where it cannot be read)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def candidates(ephemeral: tuple[int, int]) -> range | None:
    """The ports to pick from: below the ephemeral range, else above it; None when neither is wide enough."""
    low, high = ephemeral
    below = min(low, HIGHEST_BELOW)
    if below - LOWEST >= 1000:
        return range(LOWEST, below)
    if 65535 - high >= 1000:
        return range(high + 1, 65536)
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held together while picking, so none repeats)."""
    pool = candidates(ephemeral_range())
    with ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            ports.append(_bind_one(sock, pool))
        return ports


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the ephemeral range when the machine leaves room for it."""
    return free_ports(1)[0]


def _bind_one(sock: socket.socket, pool: range | None) -> int:
    if pool is not None:
        for _ in range(_TRIES):
            port = _RANDOM.choice(pool)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    sock.bind(("127.0.0.1", 0))  # a crowded or unusual machine: the kernel's pick, as before
    return int(sock.getsockname()[1])
