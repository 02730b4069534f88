"""A route target whose import kills a worker process: the crash-loop test routes to it.

The supervisor imports every route before it spawns workers (to fail fast on bad routes), so the
crash is limited to multiprocessing children, and only when ``CRASH_FIXTURE_EXIT_CODE`` is set.
"""

from __future__ import annotations

import multiprocessing
import os

from engine import Context, Event

_CODE = os.environ.get("CRASH_FIXTURE_EXIT_CODE")
if _CODE and multiprocessing.parent_process() is not None:
    os._exit(int(_CODE))


async def never_runs(event: Event, ctx: Context) -> None:
    """The route exists so the config is valid; a worker dies before it could call this."""
    return None
