"""Async data: a loop's batches read from an async iterable, on the event loop.

An async iterable (an ``async def`` generator, a class with ``__aiter__``, an anyio memory
object stream) is read where it lives: each batch is awaited on the event loop of the task
that runs ``fit()``, when the step loop on the compute thread asks for it, through the
compute thread's requests (as an ``async def`` hook is; one round trip a batch). Its code
then never runs alongside a step, as a generator read on the data thread does not, and a
``stop()`` or a cancellation while a read waits cancels the read (not inside an accumulation
window: there the stop waits for the window's batches, unless it is forced).

At the end of an epoch's reading, however it ends, an async generator the epoch read is
closed on the event loop (``aclose()``, which runs its ``finally`` blocks and its ``async
with`` exits); another async iterator (a stream the caller keeps) is left open.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, TypeGuard

import anyio
import torch

from asynchat._compute import ComputeThread, JobCancelled
from asynchat._errors import add_note
from asynchat._mailbox import soon_on_this_loop
from asynchat._prefetch import Interrupted
from asynchat._tree import iter_tensors

#: True in the task that awaits a batch for a loop, while it does (an ask's future waited
#: for there would never be answered: the loop waits for the read).
READING = contextvars.ContextVar("asynchat_reading_data", default=False)


def is_async_source(data: object) -> TypeGuard[AsyncIterable[Any]]:
    """Whether ``data`` is an async iterable (and so read on the event loop)."""
    return hasattr(type(data), "__aiter__")


def is_async_iterator(data: object) -> bool:
    """Whether ``data`` is an async iterator: its ``aiter()`` is itself, read once."""
    return isinstance(data, AsyncIterator)


class AsyncIslice:
    """An async iterable without its first ``count`` items (reads and drops them, as a
    resumed epoch of any other iterable without a sampler does)."""

    def __init__(self, iterable: AsyncIterable[Any], count: int) -> None:
        self.iterable = iterable
        self.count = count

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        iterator = aiter(self.iterable)
        try:
            for _ in range(self.count):
                try:
                    await anext(iterator)
                except StopAsyncIteration:
                    return
            async for item in iterator:
                yield item
        finally:
            await _close(iterator)


async def _close(iterator: object) -> None:
    """``aclose()`` an async generator; any other async iterator is the caller's to close."""
    if inspect.isasyncgen(iterator):
        await iterator.aclose()


_END: Any = object()  # the data ran out
_INTERRUPTED: Any = object()  # stop() or a cancellation ended the read


class AsyncBatches:
    """The batch source of an epoch over an async iterable, iterated on the compute thread
    (the counterpart of :class:`~asynchat._prefetch.InlineBatches` and ``Prefetcher``).

    Each ``next()`` awaits the next item on the event loop (``compute.call_async``) and
    stages it with ``stage`` here; on CUDA the compute stream waits for what the read queued
    on the event loop's stream (a device-side wait). :meth:`interrupt` (from any thread)
    cancels a read in progress, or the next one, when ``interruptible()`` says so, asked on
    the event loop while the compute thread waits for the read, ``patience`` seconds later
    (a rank's item may be on its way: see ``LoopRun.interrupt``); ``next()`` then raises
    :class:`~asynchat._prefetch.Interrupted`.
    """

    finished = True  # (nothing of ours runs on after the epoch: the reads were awaited)

    def __init__(
        self,
        iterable: AsyncIterable[Any],
        *,
        compute: ComputeThread,
        stage: Callable[[Any], Any] | None,
        interruptible: Callable[[], bool],
        patience: float = 0.0,
    ) -> None:
        self._iterable = iterable
        self._compute = compute
        self._cuda = compute.stream is not None
        self._stage = stage
        self._interruptible = interruptible
        self._patience = patience
        self._iterator: AsyncIterator[Any] | None = None
        self._interrupted = False
        self._reading: anyio.CancelScope | None = None  # the read in progress, if any
        self._soon: Callable[[Callable[[], None]], object] | None = None  # set on the loop

    def __enter__(self) -> AsyncBatches:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is None or not inspect.isasyncgen(iterator):
            return
        try:  # (a cancelled job's requests are still served, shielded, until it returns)
            self._compute.call_async(lambda: _close(iterator))
        except JobCancelled:
            pass  # abandoned (a second Ctrl-C): nobody serves the event loop's side any more
        except Exception as error:
            if exc is None:
                raise
            add_note(exc, f"asynchat: closing the data's async generator also raised {error!r}")

    def __iter__(self) -> Iterator[Any]:
        return self if self._stage is None else map(self._stage, self)

    def settle(self) -> list[Any]:
        """No read is left in progress: an interrupted one was cancelled (an async
        generator's is closed; a memory object stream's receive takes nothing)."""
        return []

    def interrupt(self) -> None:
        self._interrupted = True
        soon = self._soon
        if soon is not None:
            # (RuntimeError: the event loop has ended, so no read can be waiting)
            with contextlib.suppress(RuntimeError):
                soon(self._cancel_read)

    def __next__(self) -> Any:
        """The next item, read on the event loop; on the compute thread."""
        reply = self._compute.call_async(self._read)
        if reply is None or reply is _INTERRUPTED:  # (None: the request itself was cancelled)
            raise Interrupted
        item, done = reply
        if item is _END:
            raise StopIteration
        if done is not None:
            torch.cuda.current_stream().wait_event(done)  # device-side: the host goes on
        return item

    async def _read(self) -> Any:
        """The next item and, on CUDA, an event after what its read queued; on the loop."""
        if self._soon is None:
            self._soon = soon_on_this_loop()
        deadline = math.inf
        if self._interrupted and self._interruptible():
            if not self._patience:
                return _INTERRUPTED
            deadline = anyio.current_time() + self._patience
        if self._iterator is None:
            self._iterator = aiter(self._iterable)
        reading = READING.set(True)
        with anyio.CancelScope(deadline=deadline) as self._reading:
            try:
                item = await anext(self._iterator)
            except StopAsyncIteration:
                return _END, None
            finally:
                self._reading = None
                READING.reset(reading)
            return item, _read_done(item) if self._cuda else None
        return _INTERRUPTED

    def _cancel_read(self) -> None:  # on the event loop
        reading = self._reading
        if reading is not None and self._interruptible():
            if self._patience:
                cut_at = anyio.current_time() + self._patience
                reading.deadline = min(reading.deadline, cut_at)
            else:
                reading.cancel()


def _read_done(item: Any) -> torch.cuda.Event | None:
    """An event on the event loop's stream after ``item`` was read, if it holds CUDA tensors
    (kernels queued there may still be writing them); else None."""
    for tensor in iter_tensors(item):
        if tensor.is_cuda:
            event: torch.cuda.Event = torch.cuda.current_stream(tensor.device).record_event()
            return event
    return None
