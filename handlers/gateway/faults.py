"""What the simulated processor does wrong, on purpose: latency, failures, declines, an outage.

The starting values come from the payments service's ``settings.gateway`` in the shop's YAML; the
admin endpoint (``POST /admin/faults``) changes them while the gateway runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class InvalidFault(ValueError):
    """A fault setting of the wrong type or out of range.

    Attributes:
        param: the setting's name.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Faults:
    """The simulator's behaviour.

    Attributes:
        latency_ms: time every answer takes at least.
        jitter_ms: uniform extra time, 0..jitter_ms.
        failure_rate: fraction of requests that fail (0..1): half before anything happened (a 503),
            half after the money moved, with the answer lost (the connection is closed, or a 500).
        decline_rate: fraction of orders whose card is declined (stable per order id: 402).
        outage: every request to ``/v1`` answers 503 at once.
        max_amount_cents: charges above it are declined.
    """

    latency_ms: float = 5.0
    jitter_ms: float = 2.0
    failure_rate: float = 0.0
    decline_rate: float = 0.0
    outage: bool = False
    max_amount_cents: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Faults:
        """The faults named in ``settings`` (other keys, such as ``url`` or ``timeout_s``, are not faults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls().updated({k: v for k, v in settings.items() if k in names})

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with ``changes`` applied, each checked.

        Raises:
            InvalidFault: an unknown name, a wrong type or a value out of range.
        """
        values: dict[str, Any] = {}
        for name, value in changes.items():
            values[name] = _checked(name, value)
        return dataclasses.replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_RANGES: dict[str, tuple[float, float]] = {
    "latency_ms": (0, 600_000), "jitter_ms": (0, 600_000), "failure_rate": (0, 1), "decline_rate": (0, 1),
    "max_amount_cents": (0, 10**12),
}


def _checked(name: str, value: Any) -> Any:
    if name == "outage":
        if not isinstance(value, bool):
            raise InvalidFault(name, f"{name}: expected true or false, got {value!r}")
        return value
    if name not in _RANGES:
        raise InvalidFault(name, f"unknown fault {name!r}: expected one of outage, {', '.join(_RANGES)}")
    low, high = _RANGES[name]
    number_ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if name == "max_amount_cents":
        number_ok = isinstance(value, int) and not isinstance(value, bool)
    if not number_ok or not low <= value <= high:
        kind = "an integer" if name == "max_amount_cents" else "a number"
        raise InvalidFault(name, f"{name}: expected {kind} in [{low:g}, {high:g}], got {value!r}")
    return int(value) if name == "max_amount_cents" else float(value)
