"""Progress beats from a rank process to the launcher that watches it for hangs.

In a process started by :func:`asynchat.launch`, every phase a loop reaches records the time
and a running count in a slot of shared memory the launcher reads; elsewhere :func:`beat` is
a no-op that costs one global read. The count tells the launcher which rank is furthest
behind when no rank moves any more (the others wait for it in a collective).
"""

from __future__ import annotations

import time
from typing import Any

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
