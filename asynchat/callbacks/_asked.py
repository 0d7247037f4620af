"""Saves asked for: by the clock (``Checkpoint(every_n_seconds=...)``) and on demand
(:meth:`Checkpoint.request_save`: a future per ask, from the thread that asks to the save
that serves it); answering such futures (the Profiler's too)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import Any, TypeVar

from asynchat._async_data import READING
from asynchat._errors import CheckpointError
from asynchat._handle import LoopHandle
from asynchat._mailbox import AwaitableFuture
from asynchat._state import LoopState

SaveFuture = AwaitableFuture[Path | None]
T = TypeVar("T")


class SaveOutcome:
    """The futures one save serves, settled once: with the checkpoint's path once written
    (None on a rank that writes no file), or with the error that lost it. A future added
    after that gets the same outcome at once."""

    def __init__(self, futures: Iterable[SaveFuture] = ()) -> None:
        self._lock = threading.Lock()
        self._futures = list(futures)
        self._outcome: tuple[Path | None, BaseException | None] | None = None

    def add(self, futures: Iterable[SaveFuture]) -> None:
        with self._lock:
            if self._outcome is None:
                self._futures += futures
                return
            path, error = self._outcome
        _answer(futures, path, error)

    def join(self, other: SaveOutcome) -> None:
        """Serve ``other``'s futures with this save (``other``'s was not taken: this save,
        at the same step, holds what it would have)."""
        with other._lock:
            futures, other._futures = other._futures, []
        self.add(futures)

    def settle(self, path: Path | None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = (path, error)
            futures, self._futures = self._futures, []
        _answer(futures, path, error)

    def run(self, write: Callable[[], Path | None]) -> None:
        """``write()`` (on the writer thread), settled with what it returns or raises."""
        try:
            path = write()
        except BaseException as exc:
            self.settle(None, exc)
            raise
        self.settle(path)


def settle(futures: Iterable[Future[T]], result: T) -> None:
    """Each of ``futures`` answered ``result`` (one its caller cancelled is left so)."""
    for future in futures:
        with contextlib.suppress(InvalidStateError):
            future.set_result(result)


def fail(futures: Iterable[Future[Any]], error: BaseException) -> None:
    """Each of ``futures`` answered ``error`` (one its caller cancelled is left so)."""
    for future in futures:
        with contextlib.suppress(InvalidStateError):
            future.set_exception(error)


def refused(error: BaseException) -> AwaitableFuture[Any]:
    """A future answered ``error`` at once: an ask that asks nothing."""
    future: AwaitableFuture[Any] = AwaitableFuture()
    future.set_exception(error)
    return future


def how_it_ended(error: BaseException | None) -> str:
    """How a run ended by ``error`` (None: none), for a message about what it left undone:
    ``"ended"``, ``"failed"`` or ``"was cancelled"``."""
    if error is None:
        return "ended"
    return "failed" if isinstance(error, Exception) else "was cancelled"


def answered_after_hooks(loop: LoopHandle, what: str) -> AwaitableFuture[Any]:
    """A future of ``what`` that ``loop`` answers after its hooks, with two guards:

    - ``deadlock``: waited for in one of those hooks (or in those of a loop run inline in
      it, a Validation's), which the loop waits for, it would wait forever (before, it did:
      no error, no step, no save);
    - ``stalled``: a wait that goes on while the loop waits for an ``async def`` hook is a
      deadlock if the hook waits for the waiting task, one of a task group it opened, say
      (which cannot be seen from here: a task group the loop's own task opened before may
      hold the task as well).
    """

    def deadlock() -> str | None:
        if not loop._waits_for_caller():
            return None
        if READING.get():
            return (
                f"{what} is made at a step's boundary, once the read of a batch waiting for "
                f"it has returned ({loop.name} waits for its async data): waited for there it "
                "would wait forever. Ask in the read and wait for the future in a task of "
                "your own (or after the loop)"
            )
        return (
            f"{what} is made once the hook waiting for it has returned ({loop.name} waits "
            "for its hooks): waited for there it would wait forever. Ask in the hook and "
            "wait for the future in a task or thread of your own (or after the loop)"
        )

    def stalled() -> str | None:
        if not loop._waits_for_a_hook():
            return None
        return (
            f"{what}, which is made once the async def hook {loop.name} waits for has "
            "returned: if that hook waits for this task (one of a task group it opened, "
            "say), neither will end. Wait for the future in a task the hook does not wait for"
        )

    return AwaitableFuture(deadlock, stalled)


def _answer(futures: Iterable[SaveFuture], path: Path | None, error: BaseException | None) -> None:
    if error is None:
        settle(futures, path)
    else:
        fail(futures, error)


class SaveRequests:
    """The asks of one Checkpoint: :meth:`ask` from any thread (a signal handler of the
    main thread too: an ask made inside another is safe, the lock being reentrant), the
    rest on the compute thread."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lock = threading.RLock()
        self._loop: LoopHandle | None = None  # the run's, while one runs
        self._asked = False  # asked since the compute thread last looked
        self._asks: collections.deque[SaveFuture] = collections.deque()  # not looked at yet
        self._taken: list[SaveFuture] = []  # looked at: served by the next save

    def open(self, loop: LoopHandle) -> None:
        """A run of ``loop`` has taken the callback: asks are kept from now on, for its
        saves."""
        with self._lock:
            self._loop = loop

    def ask(self) -> SaveFuture:
        with self._lock:
            if self._loop is None:
                return refused(
                    CheckpointError(f"{self.owner}: no save asked for: no loop runs with it")
                )
            future: SaveFuture = answered_after_hooks(self._loop, "the save asked for")
            self._asks.append(future)
            self._asked = True  # (after the append: whoever sees it finds the future)
        return future

    def take(self) -> bool:
        """Whether a save was asked for since the last call; its futures then wait for the
        next save (:meth:`for_save`)."""
        if not self._asked:  # (read without the lock: the step's usual case)
            return False
        with self._lock:
            self._asked = False
            self._taken += self._asks
            self._asks.clear()
        return True

    def for_save(self) -> SaveOutcome:
        """The futures this save serves: every ask taken so far."""
        with self._lock:  # (a run cut short by a second Ctrl-C may close meanwhile)
            taken, self._taken = self._taken, []
        return SaveOutcome(taken)

    def close(self, error: BaseException | None) -> None:
        """The run is over: the asks no save served fail, saying why (``error``: what
        ended it, if anything did)."""
        with self._lock:
            self._loop, self._asked = None, False
            futures, self._taken = [*self._taken, *self._asks], []
            self._asks.clear()
        why = how_it_ended(error) + (" without it" if error is None else "")
        lost = CheckpointError(f"{self.owner}: the save asked for was not taken: the loop {why}")
        lost.__cause__ = error
        fail(futures, lost)


class SaveClock:
    """``every_n_seconds``: the training time since the last save (or the run's start),
    time held by ``pause()`` left out."""

    def __init__(self) -> None:
        self.since = 0.0
        self.paused = 0.0
        self.asked = False  # a save was asked for by this clock and has not happened yet

    def restart(self, state: LoopState) -> None:
        self.since, self.paused, self.asked = time.monotonic(), state.loop.paused_s, False

    def due(self, state: LoopState, every: float) -> bool:
        if self.asked:
            return False
        return time.monotonic() - self.since - (state.loop.paused_s - self.paused) >= every
