"""Snapshots of a loop and the events its subscribers receive."""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
import time
import weakref
from collections.abc import Callable

import anyio

from asynchat._mailbox import Mailbox


class LoopStatus(enum.StrEnum):
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


@dataclasses.dataclass(frozen=True, slots=True)
class LoopSnapshot:
    """Where a loop is, read at any time from any thread without blocking (``loop.snapshot()``).

    ``steps_per_s`` and ``samples_per_s`` average over the run so far (``samples_per_s`` uses
    the size of the current epoch's first batch), less the time it was held by ``pause()``
    (``paused_s``); ``metrics`` are the last published values; ``run_id`` names the run
    across its resumes (:attr:`~asynchat.LoopHandle.run_id`: its checkpoints and JSON log
    lines carry it).
    """

    name: str
    run_id: str
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
    paused_s: float = 0.0
    time: float = dataclasses.field(default_factory=time.time)


class Throughput:
    """Steps and samples per second of a run so far, for :class:`LoopSnapshot`.

    :meth:`start` runs once, before the run; ``batch_size`` is written on the compute thread
    at each epoch's first batch; :meth:`rates` is read from any thread (a torn read costs at
    most one stale figure).
    """

    def __init__(self) -> None:
        self._started_at: float | None = None
        self._steps_before = 0
        self.batch_size = 0
        # (seconds held by pause() before the current hold, when the current one began);
        # one tuple, replaced whole, so that a reader on another thread never sees half.
        self._held: tuple[float, float | None] = (0.0, None)
        self._ended_at: float | None = None

    def start(self, global_step: int) -> None:
        self._started_at = time.perf_counter()
        self._steps_before = global_step

    def stop(self) -> None:
        """The run ended: its rates stay as they are now (they decayed towards zero after
        the end, as the time since the start went on growing)."""
        self._ended_at = time.perf_counter()

    def held(self, paused: bool) -> None:
        """The loop's status changed: held by ``pause()`` (``paused``) or not. Held time is
        left out of the rates: a run paused for an hour after ten minutes reported a
        seventh of its speed for the rest of its run."""
        before, since = self._held
        if paused and since is None:
            self._held = (before, time.perf_counter())
        elif not paused and since is not None:
            self._held = (before + time.perf_counter() - since, None)

    def paused_s(self) -> float:
        """Seconds held by ``pause()`` so far, the current hold included."""
        before, since = self._held
        return before + (self._now() - since if since is not None else 0.0)

    def _now(self) -> float:
        ended = self._ended_at
        return ended if ended is not None else time.perf_counter()

    def rates(self, global_step: int) -> tuple[float, float]:
        """``(steps_per_s, samples_per_s)`` since :meth:`start`, less the time held (zeros
        before it)."""
        if self._started_at is None:
            return 0.0, 0.0
        elapsed = self._now() - self._started_at - self.paused_s()
        steps_per_s = (global_step - self._steps_before) / elapsed if elapsed else 0.0
        return steps_per_s, steps_per_s * self.batch_size


class EventKind(enum.StrEnum):
    """What a :class:`LoopEvent` reports."""

    STATUS = "status"  # the status changed (running, paused, stopping)
    EPOCH_BEGIN = "epoch_begin"
    EPOCH_END = "epoch_end"  # the snapshot has the epoch's metrics
    PROGRESS = "progress"  # periodic, made for each subscriber while nothing else happens
    END = "end"  # the final outcome: finished, failed or cancelled; always the last event


@dataclasses.dataclass(frozen=True, slots=True)
class LoopEvent:
    """One event of ``loop.events()``: its kind, the loop's snapshot when it happened, and how
    many older events this subscriber missed because it fell behind (``dropped``)."""

    kind: EventKind
    snapshot: LoopSnapshot
    dropped: int = 0


class EventHub:
    """The subscribers of one loop's events: :meth:`publish` hands an event to each of them
    from any thread and never blocks (each has a bounded, lossy mailbox).

    ``publish`` takes no lock: the list of subscribers is replaced, never changed in place
    (under ``_lock``, among those who change it), and read as it is. A status change
    publishes, and one can be made from a signal handler (``stop()``), which runs on the
    main thread between two bytecodes: perhaps of a subscription, inside ``_lock``.
    """

    def __init__(self, snapshot: Callable[[], LoopSnapshot]) -> None:
        self.snapshot = snapshot
        self._subscribers: list[Mailbox[LoopEvent]] = []
        self._lock = threading.Lock()

    def subscribe(self, buffer: int, progress_every: float | None) -> EventStream:
        return EventStream(self, buffer, progress_every)

    def publish(self, kind: EventKind) -> None:
        subscribers = self._subscribers
        if not subscribers:
            return
        event = LoopEvent(kind, self.snapshot())
        for mailbox in subscribers:
            if not mailbox.abandoned:
                mailbox.put(event)

    def _add(self, mailbox: Mailbox[LoopEvent]) -> None:
        with self._lock:
            self._subscribers = [*self._live(), mailbox]

    def _remove(self, mailbox: Mailbox[LoopEvent]) -> None:
        with self._lock:
            self._subscribers = [m for m in self._live() if m is not mailbox]

    def _abandon(self, mailbox: Mailbox[LoopEvent]) -> None:
        """A stream's finalizer: the garbage collector runs it at any allocation of any
        thread, perhaps one inside ``_lock``: waiting for the lock then deadlocked that
        thread. It never waits: where the lock is taken, the mailbox is marked, no longer
        published to, and dropped at the next change of the subscribers."""
        mailbox.abandoned = True
        if self._lock.acquire(blocking=False):
            try:
                self._subscribers = self._live()
            finally:
                self._lock.release()

    def _live(self) -> list[Mailbox[LoopEvent]]:
        return [mailbox for mailbox in self._subscribers if not mailbox.abandoned]


class EventStream:
    """A subscription to a loop's events (see :meth:`LoopBase.events`); an async iterator,
    also usable as ``async with loop.events() as events:`` to unsubscribe on leaving."""

    def __init__(self, hub: EventHub, buffer: int, progress_every: float | None) -> None:
        self._hub = hub
        self._progress_every = progress_every if progress_every else math.inf
        # A full buffer drops its oldest event: `end`, the last one put, is never dropped.
        self._mailbox: Mailbox[LoopEvent] = Mailbox(maxlen=buffer)
        self._reported_drops = 0
        self._ended = False
        hub._add(self._mailbox)
        # A subscriber that leaves its `async for` early without closing the stream (a
        # `break`, an error, a dropped client) unsubscribes once the stream is garbage.
        weakref.finalize(self, hub._abandon, self._mailbox)
        snapshot = hub.snapshot()
        if snapshot.status.done:  # subscribed after the end: the end is all there is to see
            self._mailbox.put(LoopEvent(EventKind.END, snapshot))

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> LoopEvent:
        if self._ended:
            raise StopAsyncIteration
        event = None
        with anyio.move_on_after(self._progress_every):
            event = await self._mailbox.get()
        if event is None:
            event = LoopEvent(EventKind.PROGRESS, self._hub.snapshot())
        dropped = self._mailbox.dropped - self._reported_drops
        if dropped:
            event = dataclasses.replace(event, dropped=dropped)
            self._reported_drops = self._mailbox.dropped
        if event.kind is EventKind.END:
            self._ended = True
            self._hub._remove(self._mailbox)
        return event

    async def aclose(self) -> None:
        self._ended = True
        self._hub._remove(self._mailbox)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
