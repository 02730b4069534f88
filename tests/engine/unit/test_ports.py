"""Free ports are picked outside the kernel's ephemeral range, so a client's connection never takes one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from engine import ports
from engine.probes import listening_socket


def test_candidates_lie_below_the_ephemeral_range_or_above_it() -> None:
    assert ports.candidates((32768, 60999)) == range(ports.LOWEST, ports.HIGHEST_BELOW)
    assert ports.candidates((20000, 60999)) == range(ports.LOWEST, 20000)
    assert ports.candidates((10500, 60999)) == range(61000, 65536)  # no room below: above
    assert ports.candidates((10500, 65000)) is None  # no room either side: the kernel's pick


def test_the_range_is_read_from_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", path)
    assert ports.ephemeral_range() == (40000, 50000)
    path.write_text("garbage")
    assert ports.ephemeral_range() == (32768, 60999)


def test_picked_ports_are_distinct_free_and_not_ephemeral() -> None:
    low, high = ports.ephemeral_range()
    picked = ports.free_ports(50)
    assert len(set(picked)) == 50
    if ports.candidates((low, high)) is not None:
        assert not any(low <= port <= high for port in picked)
    for port in picked:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: the picking sockets are closed


def test_a_machine_without_room_gets_the_kernels_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = ports.ephemeral_range()
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    assert low <= ports.free_port() <= high  # bind(0): the kernel picks from its ephemeral range


def test_a_taken_candidate_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        monkeypatch.setattr(ports, "candidates", lambda _: range(taken, taken + 1))
        # The only candidate is taken: every try fails, and the kernel picks.
        assert ports.free_port() != taken


def test_the_probes_bind_a_free_port_themselves_and_a_taken_one_fails() -> None:
    """The probes' port 0 is bound where it is picked: nothing can take it before the server listens."""
    with listening_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        assert port > 0
        sock.listen()
        with pytest.raises(OSError), listening_socket("127.0.0.1", port):
            pass
