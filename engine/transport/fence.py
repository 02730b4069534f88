"""The fence's gate: which versions of nats-py and prometheus-client the fast paths are written against.

Each fast path of :mod:`engine.transport` leans on private names of one package. Before a path goes
in, its module asks :func:`enable`, which takes the installed version of that package (from its
distribution metadata) and the private names the module found missing, and answers whether the fast
path may be used. Outside :data:`SUPPORTED`, or with a name missing, the path falls back to the
package's public API, says so once in the log (``fast_path.fallback``) and sets
``jetpool_fast_path{path}`` to 0; otherwise the gauge reads 1.

The decision itself is :func:`fallback_reason`, a pure function of a version string and a list of
missing names, so a test can ask what another release would get without installing it.

The gauge lives here rather than in :mod:`engine.metrics` because metrics imports this package (the
histogram write): defined in metrics it would be an import circle. It is registered the same way
as the engine's other worker metrics (the default registry; in a worker, prometheus-client's
multiprocess files that the supervisor's ``/metrics`` merges), and listed in
:data:`engine.metrics.EXPORTED_METRICS`.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from functools import cache

import structlog
from prometheus_client import Gauge

log = structlog.get_logger("jetpool.transport")

NATS_PY = "nats-py"
PROMETHEUS_CLIENT = "prometheus-client"
# (lowest supported, first unsupported) release of each package, as (major, minor).
SUPPORTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    NATS_PY: ((2, 16), (2, 17)),  # 2.16.x, as pyproject pins it
    PROMETHEUS_CLIENT: ((0, 21), (0, 27)),  # pyproject's floor to the release tested (0.26.0)
}
# Each fast path and the package whose internals it uses.
PATHS: dict[str, str] = {"parser": NATS_PY, "inbox": NATS_PY, "outbox": NATS_PY, "histogram": PROMETHEUS_CLIENT}

FAST_PATH = Gauge("jetpool_fast_path", "1 while a fast path through nats-py or prometheus-client internals is "
                  "in use, 0 when it fell back to the public API (by path: parser, inbox, outbox, histogram); "
                  "the lowest over live workers.", ["path"], multiprocess_mode="livemin")

_RELEASE = re.compile(r"(\d+)\.(\d+)")
_fell_back: set[str] = set()  # paths whose fallback was logged (logged once per change, not per check)


@cache
def installed(package: str) -> str | None:
    """The installed version of ``package`` (its distribution metadata), None if there is none."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def supported(package: str, version: str) -> bool:
    """Whether ``version`` of ``package`` lies in :data:`SUPPORTED` (pre-releases count as their release)."""
    match = _RELEASE.match(version)
    if match is None:
        return False
    low, high = SUPPORTED[package]
    return low <= (int(match[1]), int(match[2])) < high


def fallback_reason(path: str, version: str | None, missing: Sequence[str] = ()) -> str | None:
    """Why ``path`` must use the public API with ``version`` installed and ``missing`` names absent; None if not."""
    package = PATHS[path]
    if version is None:
        return f"{package} has no distribution metadata: its version is unknown"
    if not supported(package, version):
        (a, b), (c, d) = SUPPORTED[package]
        return f"{package} {version} is outside the supported range >={a}.{b},<{c}.{d}"
    if missing:
        return f"{package} {version} lacks {', '.join(missing)}"
    return None


def enable(path: str, missing: Sequence[str] = (), version: str | None = None) -> bool:
    """Decide whether ``path`` may take its fast path; set ``jetpool_fast_path{path}`` to match.

    Call it where a path is installed (a connection, a subscription, an outbox), never per message.

    Args:
        path: one of :data:`PATHS`.
        missing: the private names the caller looked for and did not find.
        version: the package's version to judge; the installed one when None.
    """
    reason = fallback_reason(path, installed(PATHS[path]) if version is None else version, missing)
    FAST_PATH.labels(path).set(0 if reason else 1)
    if reason is None:
        _fell_back.discard(path)
        return True
    if path not in _fell_back:
        _fell_back.add(path)
        log.warning("fast_path.fallback", path=path, reason=reason)
    return False
