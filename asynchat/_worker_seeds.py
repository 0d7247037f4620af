"""Random numbers drawn in DataLoader workers, seeded batch by batch so that a resumed run
draws them again.

A DataLoader seeds each worker process once, when it starts, and deals the epoch's batches
to the workers in turn; a random augmentation in the dataset then draws a batch's noise from
wherever its worker's generators have got to. A run resumed inside an epoch skips the trained
batches (their indices only) and deals the rest from its first worker on, so every batch met
other generator states than in the run that was interrupted, and the resumed run trained on
other data. Here each batch's indices carry a seed of their own, derived from one number the
loader draws as each epoch's order is drawn (from the loader's generator, or torch's, as it
draws its workers' base seed) and the batch's place in the epoch; the worker seeds torch's
(CPU), Python's and NumPy's global generators with it before it reads the batch. A batch's
random numbers then depend only on the run's RNG state at the epoch's start and on which
batch it is, whichever worker reads it and whatever was skipped.

The seed rides on the indices themselves (a ``list`` that seeds the worker the first time
the worker looks at it, which the DataLoader's fetch, or the dataset's ``__getitems__``,
does before it reads any sample), so the dataset the workers see, and
``get_worker_info().dataset``, stay the user's own.
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, SupportsIndex, overload

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from asynchat._data import DataSource, loader_settings

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    """SplitMix64's finalizer: nearby inputs, unrelated 64-bit outputs."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def batch_seed(epoch_seed: int, number: int) -> int:
    """The 63-bit seed of batch ``number`` of an epoch: neighbouring batches, and epochs,
    get unrelated streams."""
    return _mix((epoch_seed + (number + 1) * _GOLDEN) & _MASK64) >> 1


def _seed_worker(seed: int) -> None:
    """Seed the global generators a dataset draws from, as the DataLoader seeds a worker
    when it starts: torch's CPU generator, ``random`` and NumPy's (if installed), NumPy's
    from another number (``random`` and NumPy's legacy generator are the same Mersenne
    Twister, seeded the same way: one seed would make them draw the same numbers)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    other = _mix(seed ^ _GOLDEN)
    np.random.seed([other & 0xFFFFFFFF, other >> 32])


class SeededIndices(list[Any]):
    """A batch's indices, carrying the batch's seed: in a DataLoader worker, the first time
    they are looked at (iterated, measured or indexed: a dataset's ``__getitems__`` may turn
    them into a tensor or an array, which only measures and indexes them), they first seed
    that worker's generators; looked at again, they do not seed them again, which would
    repeat the batch's first random numbers. In any other process they are a plain list."""

    def __init__(self, indices: Iterable[Any], seed: int | None) -> None:
        super().__init__(indices)
        self.seed = seed

    def _seed_once(self) -> None:
        if self.seed is not None and get_worker_info() is not None:
            seed, self.seed = self.seed, None
            _seed_worker(seed)

    def __iter__(self) -> Iterator[Any]:
        self._seed_once()
        return list.__iter__(self)

    def __len__(self) -> int:
        self._seed_once()
        return list.__len__(self)

    @overload
    def __getitem__(self, index: SupportsIndex) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> Any:
        self._seed_once()
        return list.__getitem__(self, index)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled to go to a worker: as the list's items (taken without iterating, which
        # would seed the process that pickles) and the seed.
        return (SeededIndices, (list.copy(self), self.seed))


class _SeededBatches:
    """A batch sampler whose batches (lists of indices) come as :class:`SeededIndices`."""

    def __init__(self, batch_sampler: Iterable[Any], generator: torch.Generator | None) -> None:
        self.batch_sampler = batch_sampler
        # The sampler the batches are drawn from, where the engine looks for a
        # DistributedSampler or a generator of its own.
        self.sampler = getattr(batch_sampler, "sampler", None)
        self._generator = generator

    def __iter__(self) -> Iterator[Any]:
        # A generator: the seed is drawn with the epoch's order, at the first batch asked for
        # (a resumed epoch draws both again before it skips the trained batches).
        draw = torch.empty((), dtype=torch.int64).random_(generator=self._generator)
        epoch_seed = int(draw.item())
        for number, indices in enumerate(self.batch_sampler):
            yield (
                SeededIndices(indices, batch_seed(epoch_seed, number))
                if isinstance(indices, list)
                else indices
            )

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


#: Each loader's copy that seeds its batches, with the settings it was built with.
_SEEDED: weakref.WeakKeyDictionary[DataLoader[Any], tuple[dict[str, Any], DataLoader[Any]]] = (
    weakref.WeakKeyDictionary()
)
_SEEDED_LOCK = threading.Lock()


def seeded_per_batch(data_loader: DataSource) -> DataSource:
    """``data_loader`` as the engine iterates it: a ``DataLoader`` whose workers read a
    map-style dataset in batches is rebuilt so that each batch's random numbers are seeded
    for that batch (see the module's text); anything else, a ``DataLoader`` subclass too, as
    it is. The copy is kept as long as the loader lives (its persistent workers with it),
    and built again if the loader's settings change (its ``collate_fn``, say)."""
    if (
        type(data_loader) is not DataLoader
        or data_loader.num_workers == 0
        or data_loader.batch_sampler is None
        or isinstance(data_loader.dataset, IterableDataset)
    ):
        return data_loader
    settings = loader_settings(data_loader)
    with _SEEDED_LOCK:
        built, seeded = _SEEDED.get(data_loader, (None, None))
        if seeded is None or built != settings:
            batches = _SeededBatches(data_loader.batch_sampler, data_loader.generator)
            seeded = DataLoader(data_loader.dataset, batch_sampler=batches, **settings)
            _SEEDED[data_loader] = (settings, seeded)
        return seeded
