"""Snapshots of a loop and the events its subscribers receive."""

from __future__ import annotations

import dataclasses
import enum
import time


class LoopStatus(str, enum.Enum):
    """Where a loop is in its life: ``created -> running -> stopping -> finished|failed|cancelled``.

    ``running <-> paused`` while :meth:`~asynchat.LoopBase.pause` holds the loop at a step
    boundary.

    ``stopping`` covers every way out before the end: a ``stop()`` request, a cancellation or an
    error being unwound (``on_loop_end`` runs in this status).
    """

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (LoopStatus.FINISHED, LoopStatus.FAILED, LoopStatus.CANCELLED)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class LoopSnapshot:
    """Where a loop is, read at any time from any thread without blocking (``loop.snapshot()``).

    ``steps_per_s`` and ``samples_per_s`` average over the run so far (``samples_per_s`` uses
    the size of the current epoch's first batch); ``metrics`` are the last published values.
    """

    name: str
    status: LoopStatus
    epoch: int
    step: int
    global_step: int
    num_epochs: int | None
    num_steps: int | None
    steps_per_s: float
    samples_per_s: float
    metrics: dict[str, float]
    stop_reason: str | None
    error: str | None
    time: float = dataclasses.field(default_factory=time.time)


class EventKind(str, enum.Enum):
    """What a :class:`LoopEvent` reports."""

    STATUS = "status"  # the status changed (running, paused, stopping)
    EPOCH_BEGIN = "epoch_begin"
    EPOCH_END = "epoch_end"  # the snapshot has the epoch's metrics
    PROGRESS = "progress"  # periodic, made for each subscriber while nothing else happens
    END = "end"  # the final outcome: finished, failed or cancelled; always the last event

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class LoopEvent:
    """One event of ``loop.events()``: its kind, the loop's snapshot when it happened, and how
    many older events this subscriber missed because it fell behind (``dropped``)."""

    kind: EventKind
    snapshot: LoopSnapshot
    dropped: int = 0
