"""What the ranks' agreements cost a DDP step: each step's boundary, and each epoch's end
when the data has no ``len()``.

Two gloo ranks train a small MLP (16-32-4, batch 8, one torch thread each) for ``--steps``
steps of one epoch, under ``asynchat.launch``, on the same batches given several ways: a
list (its length is known: the ranks agree the epoch's length once, at its start), a
DataLoader over a map-style dataset (``loader``: its length known, each batch collated as
it is read, the trainer shards it with a DistributedSampler), a DataLoader over an
``IterableDataset`` (no length: before each step the ranks agree whether the epoch ends
there, in the all-reduce that agrees the step's boundary), and the same with rank 1
holding more batches than rank 0 (every rank stops with rank 0); the list again with
``control_lag=1`` (``known-lag1``: the boundary agreement pipelined); and, as the floor, a
hand-written DDP loop over the list (``hand``: no agreement at all). Each rank times
``fit()`` (or its loop); rank 0 reports ms per step. Rounds alternate the kinds; the table
gives medians and the ratio to the known-length baseline measured in the same run.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/uneven_data.py [--steps 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import torch
from _common import machine, median, table
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from asynchat import DistributedDataParallelTrainer, launch

BATCH = 8
KINDS = ("known", "known-lag1", "loader", "no-len", "no-len-uneven", "hand")


class Stream(IterableDataset[Any]):
    """``samples`` one by one, without a length."""

    def __init__(self, samples: TensorDataset) -> None:
        self.samples = samples

    def __iter__(self) -> Any:
        return iter(self.samples)


async def train(rank: int, world_size: int, kind: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    count = steps + (steps // 4 if kind == "no-len-uneven" and rank == 1 else 0)
    count *= world_size if kind == "loader" else 1  # (a DistributedSampler shares it out)
    samples = TensorDataset(torch.randn(BATCH * count, 16), torch.randint(0, 4, (BATCH * count,)))
    data: Any = DataLoader(samples if kind == "loader" else Stream(samples), BATCH)
    if kind in ("known", "known-lag1", "hand"):
        data = list(DataLoader(samples, BATCH))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    if kind == "hand":
        elapsed = hand_written(model, data)
        if rank == 0:
            await anyio.Path(out).write_text(str(elapsed / steps * 1e3))
        return
    trainer = DistributedDataParallelTrainer(
        model, data, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), num_epochs=1, device="cpu",
        control_lag=1 if kind == "known-lag1" else 0,
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uneven kind's "rank 1's data had more batches"
        await trainer.fit()
    elapsed = time.perf_counter() - start
    assert trainer.state.global_step == steps
    if rank == 0:
        await anyio.Path(out).write_text(str(elapsed / steps * 1e3))


def hand_written(model: nn.Module, batches: list[Any]) -> float:
    """A plain DDP loop over ``batches``: the seconds it took."""
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for x, y in batches:
        loss = loss_fn(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(options.rounds):
            for kind in KINDS:
                out = str(Path(directory, kind))
                launch(train, nprocs=2, args=(kind, options.steps, out))
                results[kind].append(float(Path(out).read_text()))
    base = median(results["known"])
    print(f"machine: {machine()}")
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"2 gloo ranks, MLP 16-32-4, batch {BATCH}, {options.steps} steps, "
          f"{options.rounds} rounds, medians; OMP_WAIT_POLICY={policy}")  # fmt: skip
    rows = [
        (kind, f"{median(values):.2f}", f"{median(values) / base:.2f}x",
         " ".join(f"{v:.2f}" for v in values))
        for kind, values in results.items()
    ]  # fmt: skip
    print(table(["data", "ms/step", "vs known", "each round"], rows))


if __name__ == "__main__":
    sys.exit(main())
