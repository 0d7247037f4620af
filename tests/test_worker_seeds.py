"""Random numbers drawn in DataLoader workers are seeded batch by batch: a batch draws the
same noise whichever worker reads it, so a resumed run (which deals the rest of an epoch to
the workers from the first one) reads the batches the interrupted run would have read.

The end-to-end check, resumed runs bitwise equal to uninterrupted ones with augmentations in
workers (persistent ones too), is ``test_resume_in_a_new_process_is_bitwise_exact`` in
``tests/test_checkpoint.py`` and the resume soak's augmented trials with workers.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, get_worker_info

from asynchat import Callback, LoopState, Trainer
from asynchat._rng import capture_rng
from asynchat._worker_seeds import SeededIndices, batch_seed, seeded_per_batch


class Noise(Dataset[torch.Tensor]):
    """Each sample: its index and a draw from each of torch's, Python's and NumPy's global
    generators, made as it is read (a random augmentation)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(
            [float(index), torch.rand(()).item(), random.random(), float(np.random.rand())],
            dtype=torch.float64,
        )


def read_epochs(workers: int, epochs: int = 2, seed: int = 0, **options: Any) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    loader = DataLoader(Noise(), batch_size=4, shuffle=True, num_workers=workers, **options)
    seeded = seeded_per_batch(loader)
    return [batch for _ in range(epochs) for batch in seeded]


def test_a_batch_draws_the_same_noise_whichever_worker_reads_it() -> None:
    one, two = read_epochs(workers=1), read_epochs(workers=2)
    assert len(one) == len(two) == 12
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    persistent = [read_epochs(workers=n, persistent_workers=True) for n in (1, 2)]
    assert torch.equal(torch.cat(persistent[0]), torch.cat(persistent[1]))
    # Every batch, every epoch and every generator draws its own noise; another seed, other
    # noise.
    noise = torch.cat(one)[:, 1:]
    assert len(set(noise.flatten().tolist())) == noise.numel()
    assert not torch.equal(torch.cat(read_epochs(workers=1, seed=1)), torch.cat(one))


def test_without_the_seeds_the_noise_depends_on_the_worker() -> None:
    """What the seeding fixes: a plain DataLoader's batches draw from their worker's
    generators, so another number of workers (or a resumed epoch dealing its batches from
    the first worker on) reads other noise."""

    def plain(workers: int) -> torch.Tensor:
        torch.manual_seed(0)
        loader = DataLoader(Noise(), batch_size=4, shuffle=True, num_workers=workers)
        return torch.cat(list(loader))

    one, two = plain(1), plain(2)
    assert torch.equal(one[:, 0], two[:, 0])  # the same order
    assert not torch.equal(one, two)  # other noise


def test_indices_seed_only_a_worker_and_travel_without_seeding_the_sender() -> None:
    indices = SeededIndices([3, 1, 2], seed=batch_seed(5, 0))
    before = capture_rng()
    assert list(indices) == [3, 1, 2]  # iterated in the main process: a plain list
    copied = pickle.loads(pickle.dumps(indices))
    after = capture_rng()
    assert torch.equal(before["torch"], after["torch"])
    assert before["python"] == after["python"]
    assert type(copied) is SeededIndices and copied == [3, 1, 2]
    assert copied.seed == indices.seed
    assert len({batch_seed(5, n) for n in range(1000)} | {batch_seed(6, 0)}) == 1001
    assert all(0 <= batch_seed(2**63 - 1, n) < 2**63 for n in range(100))


class OpensInWorker(Dataset[torch.Tensor]):
    """Opens its "file" in ``worker_init_fn`` through ``get_worker_info().dataset`` (as an
    HDF5 dataset does) and reads samples in batches with ``__getitems__``."""

    def __init__(self) -> None:
        self.handle: str | None = None
        self.batches: list[str] = []

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        raise AssertionError("read in batches, through __getitems__")

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        assert self.handle == "opened" and type(indices) is list
        return [torch.tensor([float(i), torch.rand(()).item()]) for i in indices]


def open_handle(worker_id: int) -> None:
    info = get_worker_info()
    assert info is not None
    info.dataset.handle = "opened"  # type: ignore[union-attr]


class Batches(OpensInWorker):
    """Iterates its indices again for each sample: the first iteration seeds the worker,
    the others must not (each sample's noise would be the first sample's)."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        samples = []
        for n in range(len(indices)):
            samples += super().__getitems__([list(indices)[n]])
        return samples


def test_the_workers_read_the_users_own_dataset_its_getitems_too() -> None:
    def read(workers: int) -> torch.Tensor:
        torch.manual_seed(0)
        loader = DataLoader(
            Batches(), batch_size=4, num_workers=workers, worker_init_fn=open_handle
        )
        return torch.cat(list(seeded_per_batch(loader)))

    one = read(1)
    assert torch.equal(one, read(2))
    assert len(set(one[:, 1].tolist())) == len(one)  # every sample its own noise


class Converts(Dataset[torch.Tensor]):
    """Reads its samples in batches, indexing a table with the indices converted (to a
    tensor or an array, which measures and indexes them before iterating them; sliced, or
    taken by place, which never iterates them), then draws each sample's noise."""

    def __init__(self, convert: Any) -> None:
        self.convert = convert
        self.table = torch.arange(24, dtype=torch.float64)

    def __len__(self) -> int:
        return 24

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        rows = self.table[torch.as_tensor(self.convert(indices))]
        return list(torch.stack([rows, torch.rand(rows.shape, dtype=torch.float64)], dim=1))


def by_place(indices: list[int]) -> list[int]:
    return [indices[n] for n in range(len(indices))]


@pytest.mark.parametrize(
    "convert",
    [torch.as_tensor, np.asarray, lambda indices: indices[:], by_place],
    ids=["tensor", "array", "slice", "by-place"],
)
def test_indices_a_dataset_converts_without_iterating_them_seed_it_too(convert: Any) -> None:
    def read(workers: int) -> torch.Tensor:
        torch.manual_seed(0)
        loader = DataLoader(Converts(convert), batch_size=4, shuffle=True, num_workers=workers)
        return torch.cat(list(seeded_per_batch(loader)))

    one = read(1)
    assert torch.equal(one, read(2))
    assert len(set(one[:, 1].tolist())) == len(one)  # every sample its own noise


def test_loaders_left_as_they_are_and_the_rebuilt_one_kept() -> None:
    data = TensorDataset(torch.randn(8, 2))

    class MyLoader(DataLoader[Any]):
        pass

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Any:
            return iter(range(4))

    for loader in (
        DataLoader(data, batch_size=2),  # no workers: the main process's RNG, put back on resume
        DataLoader(data, batch_size=None, num_workers=1),  # no batches of indices to seed
        DataLoader(Stream(), batch_size=2, num_workers=1),  # a stream is read, not skipped
        MyLoader(data, batch_size=2, num_workers=1),  # a subclass may iterate its own way
        [torch.zeros(2)],
    ):
        assert seeded_per_batch(loader) is loader
    generator = torch.Generator()
    loader = DataLoader(
        data, batch_size=3, shuffle=True, drop_last=True, num_workers=2, generator=generator,
        persistent_workers=True, prefetch_factor=3, in_order=False,
    )  # fmt: skip
    seeded = seeded_per_batch(loader)
    assert isinstance(seeded, DataLoader) and seeded is not loader
    assert seeded_per_batch(loader) is seeded  # once: its persistent workers stay
    assert seeded.dataset is data and seeded.generator is generator and len(seeded) == 2
    assert (seeded.num_workers, seeded.prefetch_factor) == (2, 3)
    assert seeded.persistent_workers and not seeded.in_order
    assert seeded.batch_sampler.sampler is loader.sampler  # type: ignore[union-attr]
    loader.collate_fn = lambda samples: samples  # a setting changed: built again
    again = seeded_per_batch(loader)
    assert again is not seeded and again.collate_fn is loader.collate_fn  # type: ignore[attr-defined]


class Record(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_step_end(self, state: LoopState) -> None:
        self.batches.append(state.batch[0].clone())


class Labelled(Noise):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        return super().__getitem__(index)[1:].float(), index % 2


@pytest.mark.anyio
async def test_a_trainer_reads_a_workers_loader_seeded() -> None:
    """A trainer's epochs read the same noise with one worker as with two."""
    seen = []
    for workers in (1, 2):
        torch.manual_seed(0)
        loader = DataLoader(Labelled(), batch_size=4, shuffle=True, num_workers=workers)
        record = Record()
        trainer = Trainer(
            torch.nn.Linear(3, 2), loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=2, callbacks=[record],
        )  # fmt: skip
        await trainer.fit()
        seen.append(torch.cat(record.batches))
    assert len(seen[0]) == 48 and torch.equal(seen[0], seen[1])
