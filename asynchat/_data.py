"""Data loaders: checking them, reading an epoch with its last item known, skipping the
batches a resumed epoch already trained on (without loading them), and rebuilding a
DataLoader with another sampler."""

from __future__ import annotations

import enum
import inspect
import itertools
import os
import weakref
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeGuard, TypeVar

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from asynchat._async_data import AsyncIslice, is_async_iterator, is_async_source
from asynchat._errors import add_note
from asynchat._prefetch import Interrupted
from asynchat._rng import capture_rng, restore_rng

T = TypeVar("T")

#: What a loop reads its batches from: an iterable (a DataLoader, a list of batches, a
#: generator) or an async iterable (read on the event loop: ``asynchat._async_data``).
DataSource = Iterable[Any] | AsyncIterable[Any]


class _SkipFirst:
    """A sampler (or batch sampler) without its first ``count`` items: indices, not data.
    ``skipped`` is called once they are skipped, before the next item is handed out."""

    def __init__(self, sampler: Iterable[Any], count: int, skipped: Callable[[], None]) -> None:
        self.sampler = sampler
        self.count = count
        self.skipped = skipped

    def __iter__(self) -> Iterator[Any]:
        # A generator, so nothing is drawn before the first batch is asked for: a DataLoader
        # draws its workers' base seed when iterated and the sampler's order at the first
        # batch, and a resumed epoch must draw them in that same order.
        indices = iter(self.sampler)
        for _ in itertools.islice(indices, self.count):
            pass
        # The order is drawn; the next batch's data, not read yet, draws from the RNG state
        # the interrupted run had at its step (a random augmentation in the dataset).
        self.skipped()
        yield from indices

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.count)  # type: ignore[arg-type]


class _Islice:
    """Any re-iterable without its first ``count`` items (reads and drops them)."""

    def __init__(self, iterable: Iterable[Any], count: int) -> None:
        self.iterable = iterable
        self.count = count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.iterable), self.count, None)


def skip_batches(data_loader: DataSource, count: int, skipped: Callable[[], None]) -> DataSource:
    """``data_loader`` without its first ``count`` batches.

    A map-style ``DataLoader`` skips them in its sampler, so their data is never loaded or
    collated (``skipped`` is called then, before the next batch's data is read); a sequence
    is sliced; anything else read anew each epoch (an ``IterableDataset``, a
    generator-backed iterable, an async iterable) is read and the first batches dropped.
    Data read once (an iterator, a stream) is taken as it is: the resumed run's own
    iterator goes on from where it stands (dropping its first batches lost a stream's new
    data; one that replays from the start is a re-iterable's job).
    """
    if count == 0 or is_read_once(data_loader):
        return data_loader
    if is_async_source(data_loader):
        return AsyncIslice(data_loader, count)
    if isinstance(data_loader, DataLoader) and not isinstance(data_loader.dataset, IterableDataset):
        return _clone_skipping(data_loader, count, skipped)
    if isinstance(data_loader, Sequence):
        return data_loader[count:]
    return _Islice(data_loader, count)  # type: ignore[arg-type]  # (not async: above)


#: The loaders whose workers stop with them, and the iterator whose workers those are.
_GUARDED: weakref.WeakKeyDictionary[DataLoader[Any], int] = weakref.WeakKeyDictionary()


class _WorkersStopWithLoader:
    """A DataLoader with persistent workers, iterated so that its workers stop at once when
    the loader is garbage collected.

    Such a loader keeps one iterator, and its worker processes, for as long as it lives. A
    loop's objects refer to each other (``state.loop``), so a loader held only by a finished
    loop goes with it in Python's cycle collector, which finalizes the objects of a cycle in
    no set order: where the pipes of the iterator's queues are closed first, the iterator can
    no longer tell its workers to stop and waits for each to time out (measured: 5.2 s, in
    whatever thread the collection ran in: the next job's compute thread, or the event loop).
    A finalizer on the loader, which the collector runs before finalizing the cycle's
    objects, stops the workers while the pipes still work; the iterator it holds does not
    refer to the loader, so it does not keep the loader alive.
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        stop = getattr(iterator, "_shutdown_workers", None)  # PyTorch's own clean shutdown
        if stop is not None and _GUARDED.get(self.loader) != id(iterator):
            _GUARDED[self.loader] = id(iterator)
            weakref.finalize(self.loader, _stop_in, os.getpid(), stop)
        return iterator


def _stop_in(pid: int, stop: Callable[[], None]) -> None:
    """``stop()`` in process ``pid``. A process forked later (the next loader's worker)
    inherits the loader, its iterator and this finalizer, and a collection there stopped
    workers that are not its children: Python refused ("Exception ignored ...
    AssertionError: can only test a child process", printed by every such worker). There
    the iterator is only marked as shut down, so that its own ``__del__`` does not try."""
    if os.getpid() == pid:
        stop()
    else:
        iterator = getattr(stop, "__self__", None)
        if iterator is not None:
            iterator._shutdown = True  # (what _shutdown_workers checks first)


def has_persistent_workers(data: object) -> TypeGuard[DataLoader[Any]]:
    """Whether ``data`` is a DataLoader that keeps its worker processes, and so one iterator,
    across epochs (every ``iter()`` returns that iterator, reset to its start)."""
    return isinstance(data, DataLoader) and data.persistent_workers and data.num_workers > 0


def workers_stop_with_loader(source: DataSource) -> DataSource:
    """``source``, iterated so that a DataLoader's persistent workers stop when it goes (see
    :class:`_WorkersStopWithLoader`); any other iterable as it is."""
    return _WorkersStopWithLoader(source) if has_persistent_workers(source) else source


def start_workers_as_before(loader: DataSource) -> None:
    """Create a persistent-worker DataLoader's iterator now, if it has none, and put every
    generator back as it was: the epoch's order is then drawn by a reset, as in a run that
    never stopped.

    Such a loader draws its workers' base seed from its generator (or torch's) once, when
    its one iterator is created, at the first epoch; each later epoch's ``iter()`` resets
    that iterator and draws only the order. A run resumed after the first epoch (or its
    loader cloned to skip a resumed epoch's first batches) creates the iterator there, and
    the extra draw gave the epoch another order than the uninterrupted run's. The workers'
    base seed is then drawn from the generators' state at that point, not the first
    epoch's, which does not matter where each batch seeds its worker
    (:func:`asynchat._worker_seeds.seeded_per_batch`).
    """
    if not has_persistent_workers(loader) or getattr(loader, "_iterator", None) is not None:
        return
    generators = loader_generators(loader)
    saved, rng = [g.get_state() for g in generators], capture_rng()
    iter(_WorkersStopWithLoader(loader))
    restore_rng(rng)
    for generator, state in zip(generators, saved, strict=True):
        generator.set_state(state)


def retire(loader: DataSource) -> None:
    """Stop the persistent workers of a loader made for one epoch (:func:`skip_batches`'s
    clone) as its epoch ends, rather than when the collector frees the clone."""
    iterator = getattr(loader, "_iterator", None) if has_persistent_workers(loader) else None
    if iterator is not None:
        iterator._shutdown_workers()


def loader_settings(loader: DataLoader[Any]) -> dict[str, Any]:
    """The keyword arguments that rebuild ``loader`` around another sampler: everything but
    the dataset and how it is sampled and batched."""
    settings: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        # The same generator object: the base seed and the permutation are drawn from it in
        # the same order as in the original loader.
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
    }
    if loader.num_workers > 0:
        settings["prefetch_factor"] = loader.prefetch_factor
    return settings


def _clone_skipping(
    loader: DataLoader[Any], count: int, skipped: Callable[[], None]
) -> DataLoader[Any]:
    kwargs = loader_settings(loader)
    if loader.batch_sampler is not None:
        skipping = _SkipFirst(loader.batch_sampler, count, skipped)
        return DataLoader(loader.dataset, batch_sampler=skipping, **kwargs)
    skipping = _SkipFirst(loader.sampler, count, skipped)
    return DataLoader(loader.dataset, batch_size=None, sampler=skipping, **kwargs)


def loader_generators(data_loader: DataSource) -> list[torch.Generator]:
    """The generators a DataLoader draws its order and worker seeds from, if it has its own."""
    if not isinstance(data_loader, DataLoader):
        return []
    found: list[torch.Generator] = []
    for owner in (
        data_loader,
        data_loader.sampler,
        getattr(data_loader.batch_sampler, "sampler", None),
    ):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _run_out(items: Iterator[Any]) -> BaseException | None:
    """Read ``items`` past its end; return the error that raised instead, if any."""
    try:
        next(items, None)
    except BaseException as exc:
        return exc
    return None


def with_last(
    items: Iterator[T],
    limit: int | None,
    length: int | None,
    agree_last: Callable[[bool], bool] | None = None,
    *,
    unread: bool = False,
) -> EpochReads[T]:
    """The epoch's items, iterated as ``(item, is_last, ends_data)``, for at most ``limit``
    items of an epoch of ``length`` items; ``ends_data`` marks an item after which the
    epoch's data is known to have run out.

    With a known length the last item is counted, and the iterator let end after it (read
    past its end), unless ``unread``: this rank's data has more items than the ``length``
    its group agreed to step on, and those are left unread (reading one would run its
    random augmentations, in a run going on and not in a run stopped there, and the two
    would go on from other RNG states). Without a length the last item is found by reading
    one item ahead (so a data loader without ``len()`` is read one item early; an item read
    ahead when the steps end is the result's ``held``). An error from reading ahead is
    raised after the item already read has been yielded. ``agree_last``
    (ranks of a group whose lengths are not all known): whether an item is the last is
    agreed before its step (``agree_last(flag)`` is True if ``flag`` is on any rank), and
    whether there is a first one, so every rank ends the epoch at the same step, when the
    first runs out; an error from reading ahead is raised at once then (a rank that went
    on alone to the item's step would meet its peers in another collective), and a read
    that ``stop()`` or a cancellation ended (``Interrupted``) is agreed as the data's end
    (the agreement carries the request that ended it: the loop ends there).
    """
    reads: EpochReads[T] = EpochReads()
    if length is not None:
        reads.items = _counted(items, limit, length, unread)
    else:
        reads.items = _read_ahead(items, limit, agree_last, reads)
    return reads


class EpochReads(Generic[T]):
    """An epoch's items, iterated as ``(item, is_last, ends_data)`` (see :func:`with_last`).

    ``held`` is ``(item,)`` while an item read ahead has not been yielded (the steps ended
    as it was read: a ``stop()`` at the boundary, or while the next item was awaited), else
    None: a loop whose data is read once (an iterator) runs its step rather than drop it.
    The loop adds the item yielded last where a stop agreed with its read ends the steps
    before its step (ranks): ``(item, item read ahead)``.
    """

    def __init__(self) -> None:
        self.items: Iterator[tuple[T, bool, bool]] = iter(())
        self.held: tuple[T, ...] | None = None

    def __iter__(self) -> Iterator[tuple[T, bool, bool]]:
        return self.items


def _counted(
    items: Iterator[T], limit: int | None, length: int, unread: bool
) -> Iterator[tuple[T, bool, bool]]:
    bound = length if limit is None else min(length, limit)
    try:
        if length <= 0:
            # No step: an epoch resumed after its last step, or one the ranks agreed is
            # empty. The iterator is let end all the same (below), unless this rank's data
            # goes on: that is left unread.
            if not unread and (failed := _run_out(items)) is not None:
                raise failed
            return
        for count, item in enumerate(items, start=1):
            # With this item the data runs out: let the iterator end now, as a data thread
            # reading ahead does, before the step (which may stop the loop): a sampler may
            # draw from its generator at its end (RandomSampler does), and the next epoch's
            # order, or a checkpoint's generator state, depends on it. An error it raises
            # there follows the item's step.
            failed = _run_out(items) if count >= length and not unread else None
            yield item, count >= bound, count >= length
            if failed is not None:
                raise failed
            if count >= bound:
                return
    except Interrupted:
        raise
    except Exception as exc:  # (the loop's steps raise where they run, not in here)
        add_note(exc, READ_NOTE)
        raise


def _read_ahead(
    items: Iterator[T],
    limit: int | None,
    agree_last: Callable[[bool], bool] | None,
    reads: EpochReads[T],
) -> Iterator[tuple[T, bool, bool]]:
    current = _read_or_cut(items, agree_last)
    if agree_last is not None and agree_last(current is _END):
        return  # some rank's epoch is empty (or a request ended its read)
    if current is _END:
        return
    count = 1
    while True:
        reads.held = None  # (current: its step runs now)
        if limit is not None and count >= limit:
            yield current, True, False
            return
        try:
            following = _read_or_cut(items, agree_last)
        except Interrupted:  # (alone) stop() or cancellation: the current item's step has not begun
            reads.held = (current,)
            raise
        except BaseException:
            if agree_last is None:
                yield current, True, False  # train on what was read before the error
            raise
        last = following is _END
        if agree_last is not None:
            last = agree_last(last)
        reads.held = None if last else (following,)
        yield current, last, last
        if last:
            return
        current = following
        count += 1


def _read(items: Iterator[T]) -> T:
    """``next(items)``, or ``_END`` past the end; an error the data raised is marked."""
    try:
        return next(items)
    except StopIteration:
        return _END  # type: ignore[no-any-return]
    except Interrupted:
        raise
    except Exception as exc:
        add_note(exc, READ_NOTE)
        raise


def _read_or_cut(items: Iterator[T], agree_last: Callable[[bool], bool] | None) -> T:
    """:func:`_read`; for ranks that agree the epoch's end (``agree_last``), a read that a
    request ended is the end of this rank's data: its peers end the epoch with it."""
    try:
        return _read(items)
    except Interrupted:
        if agree_last is None:
            raise
        return _END  # type: ignore[no-any-return]


_END: Any = object()  # read past the data's end

# On an error the data loader raised: the loop says where, in place of this note.
READ_NOTE = "asynchat: raised reading the data"


class Reading(enum.Enum):
    """How a loop with ``prefetch>0`` reads its data loader; see :func:`reading`."""

    INLINE = "on the compute thread"
    ON_REQUEST = "on the data thread, each batch when the step asks for it"
    AHEAD = "on the data thread, ahead of the steps"


def reading(data_loader: DataSource, device: torch.device) -> Reading:
    """How a loop with ``prefetch>0`` reads ``data_loader``.

    - ``INLINE``: a list or tuple of batches on the CPU (nothing to load: a data thread
      would only contend for the GIL and the cores), and a map-style ``DataLoader`` without
      workers. Its dataset, sampler and ``collate_fn`` then never run alongside a step, so
      what they draw from the global RNGs (a random augmentation: torch's, ``random``'s,
      numpy's) comes in the order a hand-written loop draws it rather than interleaved with
      the step's draws (dropout) by thread timing, and a seeded run repeats bitwise. Its
      reads index local data, so ``stop()`` waits at most for one batch; a hand-off to a
      thread would cost more than the read (measured: 35-70 us a round trip here).
    - ``AHEAD``, ``prefetch`` batches ahead on the data thread, where none of the user's
      code runs in the reading: a ``DataLoader`` with workers (they run its dataset and
      ``collate_fn``, seeded batch by batch; the thread waits for their batches and
      stages them) and a list or tuple of batches for an accelerator (the thread pins and
      copies them).
    - ``ON_REQUEST``, on the data thread one batch at a time, while the step loop waits for
      it: anything else (an ``IterableDataset``, a generator: a stream that may wait). Its
      code never runs alongside a step either, and a stop or a cancellation still ends a
      loop whose read blocks.
    """
    if isinstance(data_loader, (list, tuple)):
        return Reading.INLINE if device.type == "cpu" else Reading.AHEAD
    if isinstance(data_loader, DataLoader):
        if data_loader.num_workers > 0:
            return Reading.AHEAD
        if not isinstance(data_loader.dataset, IterableDataset):
            return Reading.INLINE
    return Reading.ON_REQUEST


def is_read_once(data: object) -> bool:
    """Whether ``data`` is read once: an iterator (a generator, a stream), sync or async,
    whose items read cannot be read again (``iter()`` of it is itself)."""
    return isinstance(data, Iterator) or is_async_iterator(data)


def data_length(data_loader: DataSource) -> int | None:
    try:
        return len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_data_loader(data_loader: object, num_epochs: int | None) -> None:
    if is_async_source(data_loader):
        if inspect.iscoroutinefunction(type(data_loader).__aiter__):
            raise TypeError(
                f"data_loader's __aiter__ ({type(data_loader).__name__}.__aiter__) is an async "
                "def that returns: aiter() would give a coroutine. Make it a plain def that "
                "returns an async iterator, or an async generator (async def with yield)"
            )
    else:
        _check_iterable(data_loader)
    if is_read_once(data_loader) and num_epochs != 1:
        kind, instead = (
            ("an async iterator", "an async iterable whose every aiter() starts over (a class "
             "whose __aiter__ is an async generator)")
            if is_async_iterator(data_loader)
            else ("an iterator", "a re-iterable such as a DataLoader or a list")
        )  # fmt: skip
        raise TypeError(
            f"data_loader is {kind} ({type(data_loader).__name__}), which can be read only "
            f"once, but the loop may need several epochs; pass {instead}, or num_epochs=1"
        )


def _check_iterable(data_loader: object) -> None:
    if inspect.isasyncgenfunction(data_loader) or inspect.isgeneratorfunction(data_loader):
        name = getattr(data_loader, "__qualname__", "it")
        raise TypeError(
            f"data_loader is the generator function {name}, not its batches: call it "
            f"({name}(...)) for a generator, read once, or pass an object whose __iter__ "
            "(or __aiter__) calls it, for data read anew each epoch"
        )
    if not isinstance(data_loader, Iterable):
        raise TypeError(
            f"data_loader must be iterable (a DataLoader, a list of batches, ...) or async "
            f"iterable, got {type(data_loader).__name__}"
        )
    if isinstance(data_loader, (str, bytes)):  # (iterable: each character a batch)
        raise TypeError(
            f"data_loader must be a DataLoader, a list of batches, ..., got the "
            f"{type(data_loader).__name__} {data_loader!r:.80}; a path is not read"
        )


def distributed_sampler(data_loader: DataSource) -> DistributedSampler[Any] | None:
    """The ``DistributedSampler`` a DataLoader draws from: its sampler, or its batch
    sampler's ``.sampler``; None if it has none."""
    if not isinstance(data_loader, DataLoader):
        return None
    for sampler in (data_loader.sampler, getattr(data_loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def shard_loader(data_loader: DataSource) -> DataSource:
    """For a rank of a distributed job: a DataLoader rebuilt with a DistributedSampler
    (shuffled if the original was); anything else as it is, a DataLoader over an
    ``IterableDataset`` too (it has no sampler: the dataset reads its rank's share)."""
    if (
        not isinstance(data_loader, DataLoader)
        or isinstance(data_loader.dataset, IterableDataset)
        or distributed_sampler(data_loader) is not None
    ):
        return data_loader
    if data_loader.batch_sampler is None:
        raise ValueError(
            "a DataLoader with batch_size=None cannot be sharded; pass a DistributedSampler"
        )
    if data_loader.batch_size is None:  # a batch_sampler of the user's: its own batches
        raise ValueError(
            f"a DataLoader with a batch_sampler ({type(data_loader.batch_sampler).__name__}) "
            "cannot be sharded over the ranks by the trainer: build it over a "
            "DistributedSampler, as its .sampler (e.g. BatchSampler(DistributedSampler("
            "dataset), batch_size, drop_last)), so that each rank batches its own shard"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        data_loader.dataset,
        shuffle=isinstance(data_loader.sampler, RandomSampler),
        drop_last=data_loader.drop_last,
    )
    return DataLoader(
        data_loader.dataset,
        batch_size=data_loader.batch_size,
        sampler=sampler,
        drop_last=data_loader.drop_last,
        **loader_settings(data_loader),
    )
