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

Interrupts: trio delivers Ctrl-C as ``KeyboardInterrupt`` raised into whatever its main task
awaits, shield or not, so it can land here while the job runs. It is handled like a
cancellation (the job winds down: its step completes, ``on_loop_end`` runs) and then
re-raised. A second one while winding down forces the exit: the task stops waiting and
raises at once; the thread finishes its step and ``def`` teardown hooks (``async def`` ones
are skipped, nobody is left to await them) and ends by itself. Likewise, if the event loop
goes away while the job waits on it, the job's requests fail with :class:`JobCancelled`
instead of blocking forever, and the thread ends after the job.

Why not ``anyio.to_thread.run_sync`` and ``anyio.from_thread``: the loop needs one long-lived
thread that owns the CUDA device and stream for a whole run (a worker pool hands out any
thread); an ``async def`` hook must be awaited inside the ``fit()`` task itself, in its cancel
scope and context, not in a new task per hop; and each hop through a portal costs several
times the bare "call soon" wake-up this module uses (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextvars
import enum
import queue
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import torch

from asynchat._errors import add_note
from asynchat._mailbox import Mailbox

T = TypeVar("T")


class _Kind(enum.Enum):
    DONE = enum.auto()  # the job returned or raised
    REQUEST = enum.auto()  # the job asks the event loop to await a coroutine
    ITEM = enum.auto()  # the job hands an item to the task iterating `run_streaming`
    EXITED = enum.auto()  # the thread left its main loop


class _Reply(enum.Enum):
    VALUE = enum.auto()
    ERROR = enum.auto()


_STOP = object()
_GONE = object()  # no reply will come: the event loop that would send it has ended
_POLL_S = 0.25  # how often a waiting compute thread checks that its event loop is alive


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
        # Set by the event loop when a second interrupt makes it stop serving the job; read
        # by the compute thread before each request. `_request_pending` is the compute
        # thread's. Both change under `_abandon_lock`, so a request is either refused or
        # answered (never left waiting).
        self._abandoned = False
        self._request_pending = False
        self._abandon_lock = threading.Lock()
        self._job_done = False  # the current job has reported DONE (its outcome is final)

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
        if self._abandoned:
            return  # a forced exit: the thread ends by itself after the job's step
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
        self._job_done = False
        self._inbox.put(lambda: context.run(fn))
        try:
            return await self._serve()  # type: ignore[no-any-return]
        except BaseException:
            if self._job_done:
                raise  # the job's own outcome
            # Cancelled, or interrupted (trio's Ctrl-C), while the job runs: wind it down.
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
        self._job_done = False
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
                    self._job_done = True
                    outcome, result = value
                    if outcome is _Reply.ERROR:
                        raise result
                    return
        except BaseException as exc:
            if self._job_done:
                raise
            # Closed early (the consumer left), cancelled or interrupted: wind the job down.
            self._discarding = True
            (on_close if isinstance(exc, GeneratorExit) else on_cancel)()
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
                if self._job_done:
                    raise
                # Only a second native asyncio cancellation gets through the shield; the job
                # still runs on the thread, so keep serving it (the mailbox loses nothing).
                continue
            except KeyboardInterrupt:
                if not self._job_done:
                    self._abandon()  # a second Ctrl-C: stop waiting, force the exit
                raise
            return

    def _abandon(self) -> None:
        """Stop serving the job: its pending and future requests fail with JobCancelled."""
        with self._abandon_lock:
            self._abandoned = True
            if self._request_pending:
                self._inbox.put((_Reply.ERROR, JobCancelled()))

    async def _serve(self) -> Any:
        assert self._outbox is not None
        while True:
            kind, value = await self._outbox.get()
            if kind is _Kind.DONE:
                self._job_done = True
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
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            # The request was cancelled or interrupted (trio raises Ctrl-C into the hook it
            # awaits). Ask the job to end *before* releasing the thread, so it cannot start
            # another step first; then tell it the request is done.
            self._on_cancel()
            self._reply((_Reply.VALUE, None))
            raise
        except BaseException as exc:
            self._reply((_Reply.ERROR, exc))
        else:
            self._reply((_Reply.VALUE, result))

    def _reply(self, reply: tuple[_Reply, Any]) -> None:
        with self._abandon_lock:
            if self._request_pending:  # not already answered by _abandon
                self._request_pending = False
                self._inbox.put(reply)

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
        with self._abandon_lock:
            if self._abandoned:
                raise JobCancelled  # nobody serves requests any more
            self._request_pending = True
        if not self._outbox.put((_Kind.REQUEST, fn)):
            raise JobCancelled  # the event loop is gone
        reply = self._receive()
        if reply is _GONE:
            raise JobCancelled
        outcome, value = reply
        if outcome is _Reply.ERROR:
            raise value
        return value  # type: ignore[no-any-return]

    def _receive(self) -> Any:
        """The next message from the event loop, or ``_GONE`` once that loop has ended."""
        assert self._outbox is not None
        while True:
            try:
                return self._inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._outbox.receiver_alive():
                    return _GONE

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
        try:
            while (job := self._receive()) is not _STOP and job is not _GONE:
                result = self._run_job(job)
                del job
                outbox.put((_Kind.DONE, result))
                del result
        finally:
            outbox.put((_Kind.EXITED, None))  # on every way out: the owner never waits forever

    def _run_job(self, job: Callable[[], object]) -> tuple[_Reply, Any]:
        try:
            result: tuple[_Reply, Any] = (_Reply.VALUE, job())
        except BaseException as exc:
            result = (_Reply.ERROR, exc)
        if self.stream is not None:
            # Host/device sync, once per job, on this thread (never the event loop's): the
            # job's kernels must be done before another thread's stream uses what they
            # wrote (the next loop on this device, a checkpoint reader). A sticky CUDA error
            # raises here too: it becomes the job's error rather than killing the thread.
            try:
                self.stream.synchronize()
            except BaseException as exc:
                if result[0] is _Reply.VALUE:
                    result = (_Reply.ERROR, exc)
                else:
                    add_note(result[1], f"and the end-of-job stream sync raised: {exc!r}")
        return result

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
