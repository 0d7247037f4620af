"""Mailbox: messages from any thread to one task on an event loop, without blocking; and
AwaitableFuture, a thread's future that a task awaits through one."""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")
_LOG = logging.getLogger("asynchat.loop")
STALLED_AFTER_S = 60.0  # how long a wait that may never end goes on before it is logged


def running_trio_token() -> Any:
    """The running trio loop's token, or None under asyncio (trio need not be installed)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_trio_token()
    except RuntimeError:  # trio is imported but this is not a trio run
        return None


def soon_on_this_loop() -> Callable[[Callable[[], None]], object]:
    """The running event loop's thread-safe "call soon": a function that, from any thread,
    has the loop call a function (``call_soon_threadsafe`` on asyncio and uvloop, the trio
    token's ``run_sync_soon``). It raises ``RuntimeError`` once the loop has ended."""
    trio_token = running_trio_token()
    if trio_token is not None:
        return trio_token.run_sync_soon  # type: ignore[no-any-return]
    return asyncio.get_running_loop().call_soon_threadsafe


def current_task() -> object:
    """The task running this code (asyncio's, uvloop's or trio's; None outside any),
    cheaply: anyio's ``get_current_task()`` costs several times as much, at every
    ``async def`` hook."""
    if asyncio._get_running_loop() is not None:
        return asyncio.current_task()
    trio = sys.modules.get("trio")
    try:
        return None if trio is None else trio.lowlevel.current_task()
    except RuntimeError:  # trio is imported but this is not a trio run
        return None


class Mailbox(Generic[T]):
    """Messages from other threads to one task on the event loop that created the mailbox.

    ``put`` never blocks and may be called from any thread; ``get`` is awaited on the event
    loop. Each message schedules a wake-up with the backend's thread-safe "call soon"
    (``call_soon_threadsafe`` on asyncio and uvloop, the trio token's ``run_sync_soon``). On
    asyncio the waiter is a bare future, the cheapest wake-up there; it matters because an
    ``async def`` hook at a step-level phase costs two of these hops per step.
    """

    def __init__(self, maxlen: int | None = None) -> None:
        # With maxlen, a full mailbox drops its oldest message for each new one (`dropped`).
        self._items: collections.deque[T] = collections.deque(maxlen=maxlen)
        self.dropped = 0
        self.abandoned = False  # set once its receiver is gone: senders then let it go
        self._future: asyncio.Future[None] | None = None
        self._event: anyio.Event | None = None
        self._schedule = soon_on_this_loop()
        self._loop = asyncio._get_running_loop()  # (None under trio: an anyio.Event waits)

    def put(self, item: T) -> bool:
        """Queue ``item`` and wake the receiver; False if its event loop is gone."""
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        try:
            self._schedule(self._wake)
        except RuntimeError:  # asyncio: "Event loop is closed"; trio: RunFinishedError
            return False
        return True

    def receiver_alive(self) -> bool:
        """Whether the event loop that reads this mailbox still runs."""
        try:
            self._schedule(_nothing)
        except RuntimeError:
            return False
        return True

    def _wake(self) -> None:  # on the event loop thread
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        elif self._event is not None:
            self._event.set()

    async def get(self) -> T:
        # No message can arrive unnoticed between the check and the wait: _wake runs on this
        # thread, so a message put meanwhile wakes the waiter created below.
        while not self._items:
            try:
                if self._loop is not None:
                    self._future = self._loop.create_future()
                    await self._future
                else:
                    self._event = anyio.Event()
                    await self._event.wait()
            finally:
                self._future = self._event = None
        return self._items.popleft()


def _nothing() -> None:
    pass


class AwaitableFuture(Future[T]):
    """A :class:`concurrent.futures.Future` that a task also awaits, on any backend anyio
    runs (asyncio, uvloop, trio): ``result = await future``, from any number of tasks.

    The wait holds no thread and blocks nothing. Cancelled (a timeout, a client gone), it
    stops waiting, leaves the future as it is, for its other waiters, and leaves nothing of
    itself behind (a service's clients may give up on a paused job's save many times over
    before it is made). (Awaited through
    ``anyio.to_thread.run_sync(future.result)``, a wait held a worker thread and could not
    be cancelled: on trio, a ``move_on_after`` around the wait for the save of a paused
    loop never moved on; ``asyncio.wrap_future`` cancels the future itself.) Threads use it
    as any ``Future``: ``result(timeout)``, ``add_done_callback``.

    ``deadlock``, if given, is asked as a wait for a future not yet answered begins (an
    await, ``result()``, ``exception()``; not a look with ``timeout=0``, which waits for
    nothing): a message if the answer cannot come while it waits, raised as a
    ``RuntimeError`` instead. ``stalled``, if given, is asked when a task has awaited the
    future for a minute: a message if the answer may never come, logged as a warning on
    the ``asynchat.loop`` logger (once a wait; the wait goes on).
    """

    def __init__(
        self,
        deadlock: Callable[[], str | None] | None = None,
        stalled: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self._deadlock = deadlock
        self._stalled = stalled
        self._waiting: set[Mailbox[None]] = set()  # the tasks awaiting it, to wake
        self._wakes = False  # whether the future wakes them as it is answered
        self._waiting_lock = threading.Lock()  # (the tasks come and go on their threads)

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    def set_result(self, result: T) -> None:
        super().set_result(result)
        self._deadlock = self._stalled = None  # (they may hold a loop, and its model)

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self._deadlock = self._stalled = None

    def result(self, timeout: float | None = None) -> T:
        self._refuse_to_wait_forever(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._refuse_to_wait_forever(timeout)
        return super().exception(timeout)

    def _refuse_to_wait_forever(self, timeout: float | None = None) -> None:
        waits = timeout is None or timeout > 0  # (a look, timeout=0: TimeoutError if not yet)
        if waits and not self.done() and self._deadlock is not None:
            why = self._deadlock()
            if why is not None:
                raise RuntimeError(why)

    async def _wait(self) -> T:
        if not self.done():
            self._refuse_to_wait_forever()
            answered: Mailbox[None] = Mailbox()
            with self._waiting_lock:
                self._waiting.add(answered)
                first, self._wakes = not self._wakes, True
            if first:  # (one callback for all its waiters: at once if answered since)
                self.add_done_callback(_wake_waiting)
            try:
                if not self.done():  # (answered once its callbacks run: they wake it)
                    await self._answered(answered)
            finally:
                with self._waiting_lock:
                    self._waiting.discard(answered)
        return self.result()

    async def _answered(self, answered: Mailbox[None]) -> None:
        """Until ``answered`` wakes; a wait that has gone on for ``STALLED_AFTER_S`` and
        may never end (``stalled``) is logged once."""
        if self._stalled is not None:
            with anyio.move_on_after(STALLED_AFTER_S):
                await answered.get()
                return
            stalled = self._stalled
            why = None if stalled is None else stalled()  # (None once answered meanwhile)
            if why is not None:
                _LOG.warning("a task has waited %g s for %s", STALLED_AFTER_S, why)
        await answered.get()


def _wake_waiting(future: Future[Any]) -> None:
    """Wake the tasks awaiting ``future``, answered (its one done callback: a function, so
    that the future does not hold itself)."""
    assert isinstance(future, AwaitableFuture)
    with future._waiting_lock:
        waiting = list(future._waiting)
    for answered in waiting:
        answered.put(None)
