"""The compute thread: one long-lived thread per running loop that owns the device.

The event loop hands the thread one job (the loop body) and awaits it without blocking. While
the job runs, the thread may ask the event loop to await a coroutine for it (an ``async def``
hook) with :meth:`ComputeThread.call_async`; the awaiting task serves those requests. This is
the only traffic between the two threads, and it happens only where an ``async def`` hook is
registered, so a loop whose step-level hooks are all plain ``def`` never hops threads per step.

Cancellation: the task awaiting :meth:`ComputeThread.run` cannot interrupt Python code running
on another thread. It calls the job's ``on_cancel`` (which asks the loop to end at its next
safe point), then keeps serving the job's requests inside a shielded scope until the job
returns, and re-raises the cancellation. No thread outlives ``async with ComputeThread()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import enum
import queue
import sys
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
import torch

T = TypeVar("T")


def _running_trio_token() -> Any:
    """The running trio loop's token, or None under asyncio (trio need not be installed)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_trio_token()
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
        self._future: asyncio.Future[None] | None = None
        self._event: anyio.Event | None = None
        trio_token = _running_trio_token()
        if trio_token is not None:
            self._loop: asyncio.AbstractEventLoop | None = None
            self._schedule: Callable[[Callable[[], None]], object] = trio_token.run_sync_soon
        else:
            self._loop = asyncio.get_running_loop()
            self._schedule = self._loop.call_soon_threadsafe

    def put(self, item: T) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._schedule(self._wake)

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


class _Kind(enum.Enum):
    DONE = enum.auto()  # the job returned or raised
    REQUEST = enum.auto()  # the job asks the event loop to await a coroutine
    ITEM = enum.auto()  # the job hands an item to the task iterating `run_streaming`
    EXITED = enum.auto()  # the thread left its main loop


class _Reply(enum.Enum):
    VALUE = enum.auto()
    ERROR = enum.auto()


_STOP = object()


class JobCancelled(BaseException):
    """Raised by a job to say it ended early because its awaiting task was cancelled.

    A ``BaseException`` so that ``except Exception`` in user code on the way out does not
    swallow it.
    """


class ComputeThread:
    """A worker thread that runs the batch processor and every plain ``def`` hook.

    Use it as ``async with ComputeThread(device) as compute: await compute.run(fn)``. On a CUDA
    device the thread makes that device current and computes on a stream of its own
    (:attr:`stream`), so copies issued on other streams overlap with its work.
    """

    def __init__(self, device: torch.device, *, name: str = "asynchat-compute") -> None:
        self.device = device
        self.name = name
        self.stream: torch.cuda.Stream | None = None
        # Intra-op parallelism is a per-thread setting for a new thread; the compute thread
        # takes its creator's, so torch.set_num_threads(n) before fit() applies to training.
        self._num_threads = torch.get_num_threads()
        self._on_cancel: Callable[[], None] = lambda: None
        self._slots = threading.Semaphore(0)  # unread items a job may still emit
        self._discarding = False  # nobody reads emitted items any more
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: Mailbox[tuple[_Kind, Any]] | None = None
        self._thread: threading.Thread | None = None

    # -- event loop side -------------------------------------------------------------------

    async def __aenter__(self) -> ComputeThread:
        self._outbox = Mailbox()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=False)
        self._thread.start()
        with anyio.CancelScope(shield=True):  # a started thread is never left behind
            kind, error = await self._outbox.get()  # sent once the device is selected
        if kind is _Kind.EXITED:
            self._thread.join()
            raise RuntimeError(f"{self.name} could not select device {self.device}") from error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._outbox is not None and self._thread is not None
        self._inbox.put(_STOP)
        with anyio.CancelScope(shield=True):  # the thread is always joined
            while (await self._outbox.get())[0] is not _Kind.EXITED:
                pass
        self._thread.join()  # returns at once: the thread has left its main loop

    async def run(
        self,
        fn: Callable[[], T],
        *,
        on_cancel: Callable[[], None] = lambda: None,
    ) -> T:
        """Run ``fn()`` on the thread, serving its :meth:`call_async` requests meanwhile.

        ``fn`` runs in a copy of the caller's context (so context variables set in the task
        are visible to it). Its exception propagates as itself. If the awaiting task is
        cancelled, ``on_cancel()`` is called (before the thread is released, if the
        cancellation interrupts one of its requests); ``fn``'s requests are then still served,
        shielded, until it returns, and the cancellation is re-raised. If ``fn`` raises while
        being cancelled, that exception propagates instead.
        """
        assert self._outbox is not None, "use `async with ComputeThread(...)` first"
        context = contextvars.copy_context()
        self._on_cancel = on_cancel
        self._inbox.put(lambda: context.run(fn))
        try:
            return await self._serve()  # type: ignore[no-any-return]
        except anyio.get_cancelled_exc_class():
            on_cancel()  # again if a request already did: on_cancel must be idempotent
            with anyio.CancelScope(shield=True):
                await self._serve_until_done()
            raise

    async def run_streaming(
        self,
        fn: Callable[[], object],
        *,
        on_cancel: Callable[[], None],
        on_close: Callable[[], None],
        buffer: int,
    ) -> AsyncGenerator[Any, None]:
        """Run ``fn()`` like :meth:`run`, yielding the items it hands over with :meth:`emit`.

        At most ``buffer`` items wait unread: then :meth:`emit` blocks the job (backpressure).
        If the iteration is closed early (the consumer breaks out), ``on_close()`` asks the job
        to end, its further items are dropped, and the job is served until it returns.
        """
        assert self._outbox is not None, "use `async with ComputeThread(...)` first"
        context = contextvars.copy_context()
        self._on_cancel = on_cancel
        self._slots = threading.Semaphore(buffer)
        self._discarding = False
        self._inbox.put(lambda: context.run(fn))
        try:
            while True:
                kind, value = await self._outbox.get()
                if kind is _Kind.ITEM:
                    self._slots.release()
                    yield value
                elif kind is _Kind.REQUEST:
                    await self._answer(value)
                elif kind is _Kind.DONE:
                    outcome, result = value
                    if outcome is _Reply.ERROR:
                        raise result
                    return
        except anyio.get_cancelled_exc_class():
            self._discarding = True
            on_cancel()
            with anyio.CancelScope(shield=True):
                await self._serve_until_done()
            raise
        except GeneratorExit:
            self._discarding = True
            on_close()
            with anyio.CancelScope(shield=True):
                await self._serve_until_done()
            raise

    async def _serve_until_done(self) -> None:
        """Serve the cancelled job until it ends; its own exception, if any, propagates."""
        while True:
            try:
                await self._serve()
            except JobCancelled:
                pass
            except anyio.get_cancelled_exc_class():
                # Only a second native asyncio cancellation gets through the shield; the job
                # still runs on the thread, so keep serving it (the mailbox loses nothing).
                continue
            return

    async def _serve(self) -> Any:
        assert self._outbox is not None
        while True:
            kind, value = await self._outbox.get()
            if kind is _Kind.DONE:
                outcome, result = value
                if outcome is _Reply.ERROR:
                    raise result
                return result
            if kind is _Kind.REQUEST:
                await self._answer(value)
            elif kind is _Kind.ITEM:
                self._slots.release()  # an item nobody reads any more: dropped
            elif kind is _Kind.EXITED:  # pragma: no cover - the main loop never exits mid-job
                raise RuntimeError(f"{self.name} exited while running a job") from value

    async def _answer(self, request: Callable[[], Awaitable[object]]) -> None:
        try:
            result = await request()
        except anyio.get_cancelled_exc_class():
            # The request was interrupted. Ask the job to end *before* releasing the thread,
            # so it cannot start another step first; then tell it the request is done.
            self._on_cancel()
            self._inbox.put((_Reply.VALUE, None))
            raise
        except BaseException as exc:
            self._inbox.put((_Reply.ERROR, exc))
        else:
            self._inbox.put((_Reply.VALUE, result))

    # -- compute thread side ---------------------------------------------------------------

    def emit(self, item: object) -> bool:
        """From the running job: hand ``item`` to the task iterating :meth:`run_streaming`.

        Blocks while the consumer has ``buffer`` items unread; returns False, dropping the
        item, once nobody reads any more (the iteration was closed or cancelled).
        """
        assert self._outbox is not None and self.on_thread()
        while not self._slots.acquire(timeout=0.05):
            if self._discarding:
                return False
        self._outbox.put((_Kind.ITEM, item))
        return True

    def on_thread(self) -> bool:
        """Whether the caller is running on this compute thread."""
        return threading.current_thread() is self._thread

    def call_async(self, fn: Callable[[], Awaitable[T]]) -> T:
        """From the running job: await ``fn()`` on the event loop and return its result.

        Blocks this thread until the event loop has awaited it; an exception it raises is
        raised here as itself.
        """
        assert self.on_thread(), "call_async is for the compute thread"
        assert self._outbox is not None
        self._outbox.put((_Kind.REQUEST, fn))
        outcome, value = self._inbox.get()
        if outcome is _Reply.ERROR:
            raise value
        return value  # type: ignore[no-any-return]

    def _main(self) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        try:
            torch.set_num_threads(self._num_threads)
            self._select_device()
        except BaseException as exc:
            outbox.put((_Kind.EXITED, exc))
            return
        outbox.put((_Kind.DONE, None))
        while (job := self._inbox.get()) is not _STOP:
            try:
                result = (_Reply.VALUE, job())
            except BaseException as exc:
                result = (_Reply.ERROR, exc)
            del job
            if self.stream is not None:
                # Host/device sync, once per job, on this thread (never the event loop's):
                # the job's kernels must be done before another thread's stream uses what
                # they wrote (the next loop on this device, a checkpoint reader).
                self.stream.synchronize()
            outbox.put((_Kind.DONE, result))
            del result
        outbox.put((_Kind.EXITED, None))

    def _select_device(self) -> None:
        if self.device.type == "cuda":
            # Current device and stream are per thread: this thread computes on its own
            # stream, leaving the default stream free and letting copy streams overlap.
            torch.cuda.set_device(self.device)
            # Host/device sync, once per loop, on this new thread: work that other threads
            # queued on their streams (a loop that ran before, the model's .to(device)) must
            # be done before this thread's own stream reads its results.
            torch.cuda.synchronize(self.device)
            self.stream = torch.cuda.Stream(self.device)
            torch.cuda.set_stream(self.stream)
