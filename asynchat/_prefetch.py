"""Iterating the data loader off the event loop, and staging batches on the device ahead of use.

A :class:`Prefetcher` runs the user's iterable on a thread of its own, ``depth`` items ahead of
the compute thread (or each item when it is asked for), and stages each item with a
:class:`DeviceStager`. On CUDA the stager pins the batch's tensors and copies them to the
device on a copy stream with ``non_blocking=True``; the compute thread makes its stream wait
on the copy's event (a device-side wait, not a host sync), so the copy of batch N+1 overlaps
the compute of batch N.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

import torch

from asynchat._capture import GATE
from asynchat._tree import iter_tensors, map_tensors

T = TypeVar("T")


class Staged(NamedTuple):
    """A batch on its way to the device: ``ready`` is the copy's CUDA event."""

    batch: Any
    ready: torch.cuda.Event


class DeviceStager:
    """Moves batches to ``device``: asynchronously on CUDA. On the CPU (``moves`` False)
    batches are used as they come, and a loop neither stages nor takes them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.moves = self._copy_stream is not None

    def stage(self, batch: Any) -> Staged:
        """Start moving ``batch`` to the device (on the prefetch thread)."""
        assert self._copy_stream is not None, "only a stager that moves batches stages them"
        with GATE.work():  # never while a CUDA graph is being captured
            if any(tensor.is_cuda for tensor in iter_tensors(batch)):
                # Written by kernels queued on this thread's stream (a collate or dataset
                # working on the GPU); pool streams do not wait for it by themselves. A
                # device-side wait: the host does not block. Only then: read on the compute
                # thread, this stream is the compute stream, and a copy from the host made
                # to wait for it would no longer overlap the step in flight.
                self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                moved = map_tensors(self._copy_to_device, batch)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        return Staged(moved, ready)

    def _copy_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        if tensor.device.type == "cpu" and not tensor.is_pinned():
            # Only a copy from pinned memory is truly asynchronous; from pageable memory
            # CUDA would stage it through a bounce buffer and block this thread.
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @staticmethod
    def take(staged: Staged) -> Any:
        """Make the batch usable on the current (compute) stream; on the compute thread."""
        stream = torch.cuda.current_stream()
        stream.wait_event(staged.ready)  # device-side wait: the host does not block
        for tensor in iter_tensors(staged.batch):
            # The tensors were allocated on the copy stream; tell the caching allocator
            # they are used on the compute stream too, so it won't reuse them early.
            tensor.record_stream(stream)
        return staged.batch


_LOG = logging.getLogger("asynchat.loop")

# How long leaving a Prefetcher waits for its thread to come back from the data loader.
JOIN_TIMEOUT_S = 10.0


def stop_workers(iterator: object) -> None:
    """Shut the worker processes of a DataLoader's iterator down now, as its epoch's reading
    ends however it ends, unless its loader keeps them for the next epoch (persistent
    workers); anything else is left alone.

    Left to the iterator's release, an epoch ended early (a stop, a cancellation, an error)
    kept its workers running for as long as a reference cycle held the iterator (the frames
    of the traceback that ended it), until the cycle collector came by; a later loader's
    workers, forked meanwhile, inherited it, and a collection in one of them ran its shutdown
    there ("Exception ignored ... AssertionError: can only test a child process")."""
    shutdown = _workers_shutdown(iterator)
    if shutdown is not None:
        shutdown()


def _workers_shutdown(iterator: object) -> Callable[[], None] | None:
    """PyTorch's shutdown of a DataLoader iterator's worker processes, unless its loader
    keeps them for the next epoch (persistent workers); None for anything else."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    return None if getattr(iterator, "_persistent_workers", True) else shutdown


class Interrupted(Exception):
    """The consumer of a :class:`Prefetcher` was interrupted while waiting for an item."""


class _End(NamedTuple):
    error: BaseException | None


class Prefetcher(Generic[T]):
    """Iterates ``iterable`` on a thread, ``depth`` items ahead, applying ``stage`` to each.

    With ``ahead=False`` the thread reads an item only when ``next()`` asks for it (and calls
    ``iter()`` at the first): the iterable's code then never runs while the consumer does, so
    what it draws from the global RNGs comes in the order a plain ``for`` loop draws it,
    while a consumer waiting for a blocked read can still be interrupted.

    Use as a context manager; leaving it stops the thread (after the item it is fetching) and
    joins it. Exceptions from the iterable or from ``stage`` are raised by ``next()`` as
    themselves, in order, after the items that came before them. :meth:`interrupt` (from any
    thread) makes a waiting ``next()`` raise :class:`Interrupted` when ``interruptible()``,
    asked on the consuming thread, says so (else it waits on, and asks again at the next
    interrupt: a loop inside a gradient-accumulation window needs the window's batches),
    once it has waited ``patience`` seconds since it learnt of the interrupt (a rank's item
    may be on its way: see ``LoopRun.interrupt``).

    A data loader blocked in ``__next__`` cannot be interrupted: after ``JOIN_TIMEOUT_S``
    seconds, leaving gives up on the thread with a ``RuntimeWarning`` naming the loader. The
    thread is a daemon, so it is left blocked until the loader returns (it then drops the
    item and ends) or the process exits; the loop ends meanwhile.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        *,
        stage: Callable[[Any], T] | None,
        depth: int,
        ahead: bool = True,
        name: str = "asynchat-prefetch",
        label: Callable[[], str] = lambda: "the data loader",
        interruptible: Callable[[], bool] = lambda: True,
        patience: float = 0.0,
    ) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth!r}")
        self._iterable = iterable
        self._stage = stage
        self._ahead = ahead
        self._depth = depth if ahead else 1
        self._items: collections.deque[T | _End] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._wanted = False  # ahead=False: the consumer waits for an item not yet read
        self._interrupts = 0  # interrupt() calls (a wait for an item ends after the first)
        self._given_up = False  # settle() waited for the thread in vain (leaving: no more)
        self._interruptible = interruptible
        self._patience = patience
        self._label = label
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._reading: Iterator[Any] | None = None  # the iterator the thread reads
        self._num_threads = torch.get_num_threads()  # collation runs torch ops here too

    def __enter__(self) -> Prefetcher[T]:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(0.0 if self._given_up else JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            shutdown = _workers_shutdown(self._reading)
            if shutdown is not None:
                # Its worker processes outlived the job (in a service, every such job's):
                # shut down on a thread of their own, PyTorch's way (seconds per blocked one).
                name = f"{self._thread.name}-workers-shutdown"
                threading.Thread(target=shutdown, name=name, daemon=True).start()
            workers = "; its worker processes are shut down" if shutdown is not None else ""
            warnings.warn(
                f"{self._label()} did not return from __next__ within {JOIN_TIMEOUT_S:g} s of "
                f"the loop leaving the epoch; its thread {self._thread.name!r} is left blocked "
                f"there (a daemon thread: it ends when __next__ returns, or with the process)"
                f"{workers}. A DataLoader's timeout=... bounds how long its workers may take "
                "for a batch",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def finished(self) -> bool:
        """Whether the thread has ended (after leaving: it was not left blocked)."""
        return not self._thread.is_alive()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        with self._cond:
            if not self._ahead and not self._items:
                self._wanted = True
                self._cond.notify_all()
            cut_at = None  # (when the wait ends, interrupted)
            while not self._items:
                if not (self._interrupts and self._interruptible()):
                    self._cond.wait()
                    continue
                now = time.monotonic()
                cut_at = now + self._patience if cut_at is None else cut_at
                if now >= cut_at:
                    raise Interrupted
                self._cond.wait(cut_at - now)
            item = self._items.popleft()
            if len(self._items) <= self._depth // 2:
                self._cond.notify_all()
        if isinstance(item, _End):
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def interrupt(self) -> None:
        with self._cond:
            self._interrupts += 1
            self._cond.notify_all()

    def settle(self) -> list[T]:
        """After ``next()`` was interrupted (one item at a time): the item the thread was
        reading for it, once the data loader returns it, within :data:`JOIN_TIMEOUT_S` (a
        stream's item, taken from it as the loop stopped, is then trained rather than
        dropped); none if it ends, raises, does not return in time or another interrupt
        comes (a cancellation, a second Ctrl-C): leaving then waits for it no more."""
        if self._ahead:
            return []
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        with self._cond:
            interrupts = self._interrupts
            while not self._items and self._wanted:
                left = deadline - time.monotonic()
                if left <= 0 or self._interrupts != interrupts:
                    self._given_up = True
                    return []
                self._cond.wait(left)
            if self._items and not isinstance(self._items[0], _End):
                return [self._items.popleft()]  # type: ignore[list-item]
        return []

    def _push(self, item: T | _End) -> bool:
        with self._cond:
            if len(self._items) >= self._depth:
                # Full: sleep until the consumer has drained half of the queue, then refill in
                # a burst. Each wake-up of this thread makes it compete with the compute
                # thread for the GIL, so fewer, longer turns cost the compute thread less.
                while len(self._items) > self._depth // 2 and not self._closing:
                    self._cond.wait()
            if self._closing:
                if not self._ahead and not isinstance(item, _End):  # (a stream's, perhaps)
                    _LOG.warning(
                        "%s returned a batch after the loop had left its epoch: dropped",
                        self._label(),
                    )
                return False
            self._items.append(item)
            self._wanted = False
            self._cond.notify_all()
            return True

    def _asked(self) -> bool:
        """Whether to read the next item: at once when reading ahead; else once the consumer
        asks for it. False once the consumer has left."""
        if self._ahead:
            return True
        with self._cond:
            while not self._wanted and not self._closing:
                self._cond.wait()
            return not self._closing

    def _main(self) -> None:
        try:
            torch.set_num_threads(self._num_threads)
            if not self._asked():
                return
            iterator = self._reading = iter(self._iterable)
            try:
                while True:
                    try:
                        item = next(iterator)
                    except StopIteration:
                        break
                    staged = item if self._stage is None else self._stage(item)
                    if not self._push(staged) or not self._asked():
                        return
            finally:
                stop_workers(iterator)
            self._push(_End(None))
        except BaseException as exc:
            self._push(_End(exc))


class InlineBatches:
    """The ``depth=0`` counterpart of :class:`Prefetcher`: iterates on the consumer's thread.

    ``iter()`` of it is the iterable's own iterator when there is no ``stage`` (on the CPU):
    a step then reads its batch with no Python frame of ours in between.
    """

    def __init__(self, iterable: Iterable[Any], *, stage: Callable[[Any], Any] | None) -> None:
        self._iterable = iterable
        self._stage = stage
        self._iterator: Iterator[Any] | None = None

    def __enter__(self) -> InlineBatches:
        self._iterator = iter(self._iterable)
        return self

    def __exit__(self, *exc_info: object) -> None:
        iterator, self._iterator = self._iterator, None
        stop_workers(iterator)

    def __iter__(self) -> Iterator[Any]:
        assert self._iterator is not None, "iterated inside its with block"
        if self._stage is None:
            return self._iterator
        return map(self._stage, self._iterator)

    finished = True  # (the consumer's thread iterates it: nothing is left running)

    def interrupt(self) -> None:
        """Nothing to wake: the consumer is the thread that iterates."""

    def settle(self) -> list[Any]:
        """No read is left in progress (see :meth:`Prefetcher.settle`)."""
        return []
