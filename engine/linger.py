"""Linger: a mostly idle worker lets events gather before it reads them, so it handles them together.

When events arrive at a steady pace rather than as a backlog, each reaches a worker alone: one
wake-up and one read for it, one write for its output, another wake-up for the PubAck, one more write
for the ack — and as many wake-ups in the broker, which is paid per wake-up far more than per message
(benchmarks/results/paced.md). The same events cost a fraction of that in a backlog, where one read
carries hundreds. Kafka producers answer this with ``linger.ms``; here the worker itself lingers.

With ``linger_ms`` set, a worker's loop alternates a short *awake* window, in which it handles
whatever has arrived (deliveries, PubAcks, KV answers, HTTP responses), with a *linger*: a blocking
sleep of ``linger_ms`` during which nothing is read, so what arrives meanwhile waits in the socket
and is read, handled and answered in one go afterwards. Its outputs and acks leave in one write, so
the broker, too, reads them together and delivers their consequences together.

A linger never starts while the worker waits for the broker's answer to something it sent (a KV
read, a PubAck of an output or of a compare-and-set): such an answer takes a fraction of a
millisecond, and a handler usually awaits several in a row (read, write, publish), so sleeping
across each would add a linger per round trip to every event's path instead of one per hop. The
worker stays awake, up to :data:`MAX_EXTRA` more awake windows, until those answers are in. Calls to
other services (HTTP) are not waited for: they take milliseconds, and their answers gather too.

Only a mostly idle worker lingers: after an awake window in which the process was busy for more than
half the time (a backlog, a burst), it goes on without a pause, so a backlog is never slowed; and a
worker with nothing at all to do stops lingering until work comes back, so idling costs nothing extra.
The price is latency: up to ``linger_ms`` per hop of an event's path (and per call to another service a
handler waits for), which is why it is off by default and set per service, within the app's latency
budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

AWAKE_S = 0.001  # each awake window: long enough for a burst's chain of callbacks to finish
BUSY = 0.5  # busy for more than this share of an awake window: no linger after it
IDLE = 0.05  # busy for less than this share: nothing arrived
DORMANT_AFTER = 4  # empty windows in a row (about 20 ms at 4 ms) before lingering stops until work comes
DORMANT_S = 0.05  # how often a dormant worker looks whether work came (it handles it at once regardless)
MAX_EXTRA = 3  # awake windows at most spent waiting for the broker's due answers before a linger
# Loop passes before answers due are counted: an answer that just came resumes its handler only in the
# next pass, where it may send the next request (an output after a write's PubAck); counted before
# that, nothing would look due and the request would wait out a whole linger.
SETTLE_PASSES = 2


def should_linger(cpu_s: float, wall_s: float) -> bool:
    """Whether a window in which the process used ``cpu_s`` of CPU over ``wall_s`` was mostly idle."""
    return cpu_s < wall_s * BUSY


def idle(cpu_s: float, wall_s: float) -> bool:
    """Whether nothing but the linger itself ran in the window."""
    return cpu_s < wall_s * IDLE


async def linger(linger_s: float, awake_s: float = AWAKE_S, answers_due: Callable[[], int] | None = None) -> None:
    """Alternate awake windows and lingers of ``linger_s`` for as long as the task runs (cancel to stop).

    ``answers_due`` counts the broker answers the worker waits for; a linger waits until it is 0 (for
    at most :data:`MAX_EXTRA` awake windows).

    A worker with nothing to do stops lingering after :data:`DORMANT_AFTER` empty windows (a linger
    costs two wake-ups, which an idle process should not pay hundreds of times a second) and only looks
    every :data:`DORMANT_S` whether work came back; the first events after a quiet spell are handled at
    once (the loop is not blocked then), and the window they fall in starts the lingering again.
    """
    loop = asyncio.get_running_loop()
    due = answers_due or _none_due
    empty = 0
    while True:
        cpu, wall = time.process_time(), loop.time()
        await asyncio.sleep(DORMANT_S if empty >= DORMANT_AFTER else awake_s)
        cpu, wall = time.process_time() - cpu, loop.time() - wall
        empty = empty + 1 if idle(cpu, wall) else 0
        if empty < DORMANT_AFTER and should_linger(cpu, wall):
            await _await_answers(due, awake_s)
            time.sleep(linger_s)  # blocking on purpose: the loop must not read the socket meanwhile


async def _await_answers(answers_due: Callable[[], int], awake_s: float) -> None:
    for _ in range(MAX_EXTRA):
        await _settle()
        if not answers_due():
            return
        await asyncio.sleep(awake_s)
    await _settle()  # given up waiting: still let the last window's resumed handlers send what they send


async def _settle() -> None:
    for _ in range(SETTLE_PASSES):
        await asyncio.sleep(0)


def _none_due() -> int:
    return 0
