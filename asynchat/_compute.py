"""The compute thread: the thread that owns the device while a loop runs.

``async with ComputeThread(device)`` leases a worker thread for one run of a loop, and the
event loop hands it one job (the loop body) and awaits it without blocking. While
the job runs, the thread may ask the event loop to await a coroutine for it (an ``async def``
hook) with :meth:`ComputeThread.call_async`; the awaiting task serves those requests. This is
the only traffic between the two threads, and it happens only where an ``async def`` hook is
registered, so a loop whose step-level hooks are all plain ``def`` never hops threads per step.

Cancellation: the task awaiting :meth:`ComputeThread.run` cannot interrupt Python code running
on another thread. It calls the job's ``on_cancel`` (which asks the loop to end at its next
safe point), then keeps serving the job's requests inside a shielded scope until the job
returns, and re-raises the cancellation. No job outlives ``async with ComputeThread()``.

Workers live across loops: leaving ``async with`` hands the idle worker back to a
process-wide pool, and the next loop on the same device takes it (the one used last), with
its current device and stream already set and whatever the thread keeps in thread-local
state: ``torch.compile``'s CUDA-graph trees (``mode="reduce-overhead"``) are per thread, so
a new thread per ``fit()`` would record them again. Loops that run at the same time on one
device each take a worker of their own. A worker left idle for :data:`IDLE_TIMEOUT_S`
seconds ends, so does the longest idle one past :data:`MAX_IDLE_PER_DEVICE` on a device,
and the idle ones end at interpreter exit (before its join of non-daemon threads). Idle
workers are named ``asynchat-idle-<device>``; a leased one takes the loop's name.

Interrupts: trio delivers Ctrl-C as ``KeyboardInterrupt`` raised into whatever its main task
awaits, shield or not, so it can land here while the job runs. It is handled like a
cancellation (the job winds down: its step completes, ``on_loop_end`` runs) and then
re-raised. A second one while winding down forces the exit: the task stops waiting and
raises at once; the thread finishes its step and ``def`` teardown hooks (``async def`` ones
are skipped, nobody is left to await them) and ends by itself. Likewise, if the event loop
goes away while the job waits on it, the job's requests fail with :class:`JobCancelled`
instead of blocking forever, and the thread ends after the job (neither of these two
workers goes back to the pool).

Why not ``anyio.to_thread.run_sync`` and ``anyio.from_thread``: the loop needs one long-lived
thread that owns the CUDA device and stream for a whole run, and the same thread for the
next run on that device (anyio's pool hands out any thread); an ``async def`` hook must be
awaited inside the ``fit()`` task itself, in its cancel scope and context, not in a new
task per hop; and each hop through a portal costs several times the bare "call soon" wake-up
this module uses (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import os
import queue
import sys
import threading
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import anyio
import torch

from asynchat._errors import add_note
from asynchat._mailbox import Mailbox, current_task

T = TypeVar("T")
_LOG = logging.getLogger("asynchat.loop")


class _Kind(enum.Enum):
    DONE = enum.auto()  # the job returned or raised
    REQUEST = enum.auto()  # the job asks the event loop to await a coroutine
    ITEM = enum.auto()  # the job hands an item to the task iterating `run_streaming`
    EXITED = enum.auto()  # the thread left its main loop


class _Reply(enum.Enum):
    VALUE = enum.auto()
    ERROR = enum.auto()


_STOP = object()  # to a worker: end once the job in progress (if any) is done
_RELEASE = object()  # to a leased worker: the lease is over, wait in the pool
_GONE = object()  # no reply will come: the event loop that would send it has ended
_POLL_S = 0.25  # how often a waiting compute thread checks that its event loop is alive
IDLE_TIMEOUT_S = 300.0
"""How long an idle worker waits in the pool for the next loop on its device before it ends."""
MAX_IDLE_PER_DEVICE = 8
"""How many idle workers a device keeps; past that, the one idle longest ends."""
SLOW_END_S = 10.0
"""How long a job asked to end early may run on before a warning says where its thread is."""


class JobCancelled(BaseException):
    """Raised by a job to say it ended early because its awaiting task was cancelled.

    A ``BaseException`` so that ``except Exception`` in user code on the way out does not
    swallow it.
    """


class _Worker:
    """One thread for one device, serving leases (:class:`ComputeThread`) one at a time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = None  # made on the thread, at its first lease
        self.broken = False  # its stream's sync raised (a sticky CUDA error): never reused
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name=_idle_name(device), daemon=False)

    def _main(self) -> None:
        while True:
            try:
                message = self.inbox.get(timeout=IDLE_TIMEOUT_S)
            except queue.Empty:
                if _POOL.retire(self):
                    return
                continue  # just taken from the pool: its lease is on the way
            if message is _STOP:
                return
            back = message.run_lease(self)
            # The ended lease refers to its loop (model, optimizer, data): an idle worker must
            # not keep a finished job's memory for its IDLE_TIMEOUT_S.
            del message
            if not back:
                return

    def prepare(self, num_threads: int) -> None:
        """At the start of each lease, on this thread: the device, and a clean slate.

        A lease starts where a new thread would: the lessor's intra-op threads, the worker's
        own stream current (grad mode is the run's to set). On CUDA, one host/device sync
        per lease: work that other threads queued on their streams (a loop that ran before,
        the model's ``.to(device)``) must be done before this thread's stream reads its
        results.
        """
        torch.set_num_threads(num_threads)
        if self.device.type != "cuda":
            return
        # Current device and stream are per thread: this thread computes on its own stream,
        # leaving the default stream free and letting copy streams overlap.
        torch.cuda.set_device(self.device)
        torch.cuda.synchronize(self.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        torch.cuda.set_stream(self.stream)


def _report_slow_end(name: str, thread: threading.Thread, why: str, waiting: str) -> None:
    frame = sys._current_frames().get(thread.ident or -1)
    where = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "  (gone)\n"
    _LOG.warning(
        "%s: %s %s s ago, the job still runs the step or hook in progress; it ends at its "
        "next boundary, and %s returns then. Its thread is in, innermost last:\n%s",
        name, why, f"{SLOW_END_S:g}", waiting, where.rstrip("\n"),
    )  # fmt: skip


def _nothing() -> None:
    """The cancel callback of a lease with no job."""


def _idle_name(device: torch.device) -> str:
    return f"asynchat-idle-{device}"


class _Pool:
    """The idle workers of the process, per device; the last one back is the first out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[torch.device, list[_Worker]] = {}
        self._closed = False  # the interpreter is exiting: no worker waits any more

    def take(self, device: torch.device) -> tuple[_Worker, bool]:
        """An idle worker for ``device``, or a new one (not started); and whether it is new."""
        with self._lock:
            idle = self._idle.get(device)
            if idle:
                return idle.pop(), False
        return _Worker(device), True

    def give_back(self, worker: _Worker) -> None:
        """Put a worker whose lease has ended back, or end it if the interpreter is exiting."""
        worker.thread.name = _idle_name(worker.device)
        with self._lock:
            if self._closed:
                surplus = [worker]
            else:
                idle = self._idle.setdefault(worker.device, [])
                idle.append(worker)
                surplus = idle[:-MAX_IDLE_PER_DEVICE]  # the longest idle first
                del idle[:-MAX_IDLE_PER_DEVICE]
        for each in surplus:
            each.inbox.put(_STOP)

    def retire(self, worker: _Worker) -> bool:
        """Take an idle worker out for good; False if a lease has just taken it."""
        with self._lock:
            idle = self._idle.get(worker.device, [])
            if worker in idle:
                idle.remove(worker)
                return True
            return False

    def close(self) -> None:
        """End every idle worker (at interpreter exit)."""
        with self._lock:
            self._closed = True
            idle = [worker for workers in self._idle.values() for worker in workers]
            self._idle.clear()
        for worker in idle:
            worker.inbox.put(_STOP)

    def forget(self) -> None:
        """In a forked child: the parent's workers are not threads of this process."""
        self._lock = threading.Lock()
        self._idle = {}


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)
# Called at interpreter exit before non-daemon threads are joined (what concurrent.futures
# uses for its workers), so idle workers do not hold the exit up for IDLE_TIMEOUT_S.
threading._register_atexit(_POOL.close)  # type: ignore[attr-defined]


class ComputeThread:
    """A worker thread, leased for one run, that runs the batch processor and ``def`` hooks.

    Use it as ``async with ComputeThread(device) as compute: await compute.run(fn)``. On a CUDA
    device the thread makes that device current and computes on a stream of its own
    (:attr:`stream`), so copies issued on other streams overlap with its work.
    """

    def __init__(self, device: torch.device, *, name: str = "asynchat-compute") -> None:
        self.device = device
        self.name = name
        self.stream: torch.cuda.Stream | None = None
        # Intra-op parallelism is a per-thread setting; the compute thread takes its lessor's,
        # so torch.set_num_threads(n) before fit() applies to training.
        self._num_threads = torch.get_num_threads()
        self._on_cancel: Callable[[], None] = _nothing
        self._on_force: Callable[[], None] = _nothing
        self._slots = threading.Semaphore(0)  # unread items a job may still emit
        self._discarding = False  # nobody reads emitted items any more
        self._worker: _Worker | None = None  # the one leased (kept after the lease ends)
        self._leased = False
        self._outbox: Mailbox[tuple[_Kind, Any]] | None = None
        # Set by the event loop when a second interrupt makes it stop serving the job; read
        # by the compute thread before each request. `_request_pending` is the compute
        # thread's. Both change under `_abandon_lock`, so a request is either refused or
        # answered (never left waiting).
        self._abandoned = False
        self._request_pending = False
        self._abandon_lock = threading.Lock()
        self._job_done = True  # no job is running (the last one has reported DONE)
        #: The task awaiting a request of the job (an ``async def`` hook) while one runs:
        #: the thread waits for it, so nothing the job does next can be awaited there.
        self.serving: object = None

    # -- event loop side -------------------------------------------------------------------

    async def __aenter__(self) -> ComputeThread:
        self._outbox = Mailbox()
        worker, new = _POOL.take(self.device)
        self._worker, self._leased = worker, True
        worker.thread.name = self.name
        worker.inbox.put(self)
        if new:
            worker.thread.start()
        with anyio.CancelScope(shield=True):  # a started lease is never left behind
            kind, error = await self._outbox.get()  # sent once the device is selected
        if kind is _Kind.EXITED:
            worker.thread.join()
            self._leased = False
            raise RuntimeError(f"{self.name} could not select device {self.device}") from error
        self.stream = worker.stream
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        worker = self._worker
        assert self._outbox is not None and worker is not None
        self._leased = False
        self._on_cancel = self._on_force = _nothing  # the loop's: nothing is left to cancel
        if self._abandoned:
            worker.inbox.put(_STOP)  # a forced exit: the thread ends by itself after the job
            return
        if self._job_done and not worker.broken:
            worker.inbox.put(_RELEASE)  # it has nothing left to do: back to the pool
            _POOL.give_back(worker)
            return
        # Not reached by run() and run_streaming(), which serve their job to its end; should
        # a job still run, the worker is not reused: wait for the job, then the thread, to end.
        worker.inbox.put(_STOP)
        with anyio.CancelScope(shield=True):
            while (await self._outbox.get())[0] is not _Kind.EXITED:
                pass
        worker.thread.join()

    async def run(
        self,
        fn: Callable[[], T],
        *,
        on_cancel: Callable[[], None] = lambda: None,
        on_force: Callable[[], None] = lambda: None,
    ) -> T:
        """Run ``fn()`` on the thread, serving its :meth:`call_async` requests meanwhile.

        ``fn`` runs in a copy of the caller's context (so context variables set in the task
        are visible to it). Its exception propagates as itself. If the awaiting task is
        cancelled, ``on_cancel()`` is called (before the thread is released, if the
        cancellation interrupts one of its requests); ``fn``'s requests are then still served,
        shielded, until it returns, and the cancellation is re-raised. If ``fn`` raises while
        being cancelled, that exception propagates instead. A second interrupt or native
        cancellation while it winds down calls ``on_force()`` (end even where a cancellation
        would wait); an interrupt also stops serving it and is raised at once.
        """
        assert self._outbox is not None, "use `async with ComputeThread(...)` first"
        context = contextvars.copy_context()
        self._on_cancel, self._on_force = on_cancel, on_force
        self._job_done = False
        self._worker_inbox().put(lambda: context.run(fn))
        try:
            return await self._serve()  # type: ignore[no-any-return]
        except BaseException:
            if self._job_done:
                raise  # the job's own outcome
            # Cancelled, or interrupted (trio's Ctrl-C), while the job runs: wind it down.
            on_cancel()  # again if a request already did: on_cancel must be idempotent
            with anyio.CancelScope(shield=True), self._reporting_a_slow_end("cancelled", "fit()"):
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
        self._worker_inbox().put(lambda: context.run(fn))
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
            closed = isinstance(exc, GeneratorExit)
            (on_close if closed else on_cancel)()
            why = ("its stream was closed", "the close") if closed else ("cancelled", "the stream")
            with anyio.CancelScope(shield=True), self._reporting_a_slow_end(*why):
                await self._serve_until_done()
            raise

    @contextlib.contextmanager
    def _reporting_a_slow_end(self, why: str, waiting: str) -> Iterator[None]:
        """While a job asked to end winds down: if it runs on for :data:`SLOW_END_S` (a long
        step, or a hook that never returns), say once where its thread is. It ends only at
        its next boundary, and nothing can make Python code on another thread return."""
        assert self._worker is not None
        thread = self._worker.thread
        timer = threading.Timer(SLOW_END_S, _report_slow_end, (self.name, thread, why, waiting))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

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
                # Only a second native asyncio cancellation gets through the shield (asyncio.run
                # cancels its tasks so after a second Ctrl-C): the job is to end as soon as it
                # can; it still runs on the thread, so keep serving it (the mailbox loses
                # nothing).
                self._on_force()
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
                self._worker_inbox().put((_Reply.ERROR, JobCancelled()))
        self._on_force()

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

    def _worker_inbox(self) -> queue.SimpleQueue[Any]:
        assert self._worker is not None, "use `async with ComputeThread(...)` first"
        return self._worker.inbox

    async def _answer(self, request: Callable[[], Awaitable[object]]) -> None:
        self.serving = current_task()
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
        finally:
            self.serving = None

    def _reply(self, reply: tuple[_Reply, Any]) -> None:
        with self._abandon_lock:
            if self._request_pending:  # not already answered by _abandon
                self._request_pending = False
                self._worker_inbox().put(reply)

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
        """Whether the caller is running on this compute thread (and it is leased here)."""
        worker = self._worker
        return self._leased and worker is not None and threading.current_thread() is worker.thread

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
        inbox = self._worker_inbox()
        while True:
            try:
                return inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._outbox.receiver_alive():
                    return _GONE

    def run_lease(self, worker: _Worker) -> bool:
        """The lease, on ``worker``'s thread: its jobs until it ends. True: back to the pool."""
        assert self._outbox is not None
        outbox = self._outbox
        try:
            worker.prepare(self._num_threads)
        except BaseException as exc:
            outbox.put((_Kind.EXITED, exc))
            return False
        outbox.put((_Kind.DONE, None))
        released = False
        try:
            while True:
                job = self._receive()
                if job is _RELEASE:
                    released = True
                    return True
                if job is _STOP or job is _GONE:
                    return False
                result = self._run_job(job, worker)
                del job
                if not outbox.put((_Kind.DONE, result)) or self._abandoned:
                    self._report_unheard(result)
                del result
        finally:
            if not released:  # on every other way out: the lessor never waits forever
                outbox.put((_Kind.EXITED, None))

    def _report_unheard(self, result: tuple[_Reply, Any]) -> None:
        """Log the error of a job that nobody awaits any more (after a second Ctrl-C, or once
        its event loop has gone): its ``def`` teardown hooks ran on alone, and their failures
        (a last checkpoint that could not be written) must not vanish. A bare
        :class:`JobCancelled` is the forced exit itself; notes on it are hooks that failed."""
        outcome, error = result
        if outcome is _Reply.VALUE:
            return
        if isinstance(error, JobCancelled) and not getattr(error, "__notes__", None):
            return
        _LOG.error(
            "%s: the loop went on alone after fit() stopped waiting for it, and failed",
            self.name,
            exc_info=error,
        )

    def _run_job(self, job: Callable[[], object], worker: _Worker) -> tuple[_Reply, Any]:
        try:
            result: tuple[_Reply, Any] = (_Reply.VALUE, job())
        except BaseException as exc:
            result = (_Reply.ERROR, exc)
        if worker.stream is not None:
            # Host/device sync, once per job, on this thread (never the event loop's): the
            # job's kernels must be done before another thread's stream uses what they
            # wrote (the next loop on this device, a checkpoint reader). A sticky CUDA error
            # raises here too: it becomes the job's error rather than killing the thread,
            # and the worker is not lent again.
            try:
                worker.stream.synchronize()
            except BaseException as exc:
                worker.broken = True
                if result[0] is _Reply.VALUE:
                    result = (_Reply.ERROR, exc)
                else:
                    add_note(result[1], f"and the end-of-job stream sync raised: {exc!r}")
        return result
