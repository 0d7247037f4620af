"""Progress beats from a rank process to the launcher that watches it for hangs.

In a process started by :func:`asynchat.launch`, every phase a loop reaches records the time
and a running count in a slot of shared memory the launcher reads; elsewhere :func:`beat` is
a no-op that costs one global read. The count tells the launcher which rank is furthest
behind when no rank moves any more (the others wait for it in a collective). A paused loop
makes no progress on purpose: it says it is alive every :data:`HELD_BEAT_S` seconds. A rank
whose function has returned waits for the others (launch's closing barrier): it says it has
finished (its time becomes :data:`FINISHED`), so that it is never taken for the one they
wait for.
"""

from __future__ import annotations

import math
import time
from typing import Any

# How often a held (paused) loop says it is alive; well under any useful hang_timeout.
HELD_BEAT_S = 0.5

# The time of a rank whose function has returned.
FINISHED = math.inf

# (shared double array, index of this rank's [time, count] pair); set in a launched rank only.
_slot: tuple[Any, int] | None = None


def install(array: Any, rank: int) -> None:
    """Make this process report its progress into ``array`` (in the rank, at start)."""
    global _slot
    _slot = (array, 2 * rank)
    beat()


def installed() -> bool:
    """Whether this process reports progress (it is a launched rank)."""
    return _slot is not None


def beat() -> None:
    """Record that this process made progress (a loop reached a phase)."""
    slot = _slot
    if slot is not None:
        array, i = slot
        array[i] = time.monotonic()
        array[i + 1] += 1.0


def alive() -> None:
    """Record that this process is alive though it makes no progress, on purpose: a loop
    held by ``pause()``. Only the time: the count still tells who is behind."""
    slot = _slot
    if slot is not None:
        array, i = slot
        array[i] = time.monotonic()


def finished() -> None:
    """Record that this process's function has returned: from now on it only waits for the
    other ranks to return theirs."""
    slot = _slot
    if slot is not None:
        array, i = slot
        array[i] = FINISHED
