"""Child processes that die with their parent, even when the parent is SIGKILLed.

`jetpool run` starts its own nats-server and `jetpool demo` starts an engine. A SIGTERM or Ctrl-C to
the parent stops those children by PID, but a SIGKILL (the OOM killer, ``kill -9``, a container
runtime giving up) runs no code in the parent, and the children would live on as orphans: a broker
holding the store dir's lock, an engine consuming with nobody watching it. Linux can deliver a
signal to a child when its parent dies (``PR_SET_PDEATHSIG``); the child asks for it between fork
and exec, which is what :func:`die_with_parent` is for (``subprocess.Popen(preexec_fn=...)``).

The kernel sends that signal when the *thread* that forked the child exits, not the process. Spawn
tied children from the main thread (the event loop's): a worker thread of an executor may end
while the child should still run. When the whole process dies, the child is handed to each of its
other threads in turn and gets the signal again each time: a child must take a repeated signal as
one request (nats-server does; the supervisor drains on SIGHUP however often it comes).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child receive ``sig`` when this thread ends; None off Linux.

    Not SIGKILL: the broker then stops cleanly, and an engine (SIGHUP) drains what it holds.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not inside the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal will come
            os.kill(os.getpid(), sig)

    return preexec
