"""What seeding each batch in its DataLoader worker costs a read.

The engine iterates a copy of a DataLoader with workers whose batches carry a seed each, and
each worker seeds torch's, Python's and NumPy's generators with it before it reads the batch
(``asynchat._worker_seeds``). This reads the same dataset through a plain DataLoader and
through that copy, both with ``--workers`` persistent workers, ``--rounds`` alternating
epochs each, and gives the median microseconds per batch and the ratio to the plain loader
measured in the same run. The dataset is in memory (a TensorDataset), so a batch costs
little besides the workers' hand-off: the worst case for the seeding's share.

Run: python benchmarks/worker_seeds.py [--batches 400] [--batch-size 64] [--workers 2]
                                       [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, median, table
from torch.utils.data import DataLoader, TensorDataset

from asynchat._worker_seeds import seeded_per_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    samples = args.batches * args.batch_size
    data = TensorDataset(torch.randn(samples, 32), torch.randint(0, 10, (samples,)))

    def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(
            data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            persistent_workers=True,
        )  # fmt: skip

    loaders = {"plain DataLoader": loader(), "seeded per batch": seeded_per_batch(loader())}
    for each in loaders.values():
        for _ in each:  # the workers started, their first epoch read
            pass
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for round_ in range(args.rounds):
        order = list(loaders) if round_ % 2 else list(reversed(loaders))
        for name in order:
            start = time.perf_counter()
            count = sum(1 for _ in loaders[name])
            times[name].append((time.perf_counter() - start) / count * 1e6)
    base = median(times["plain DataLoader"])
    print(f"# {machine()}")
    print(
        f"# {args.batches} batches of {args.batch_size} x 32 floats, {args.workers} persistent "
        f"workers, {args.rounds} alternating epochs each"
    )
    rows = [
        (name, f"{median(values):.1f}", f"{min(values):.1f}", f"{median(values) / base:.3f}x")
        for name, values in times.items()
    ]
    print(table(["loader", "median us/batch", "min us/batch", "ratio"], rows))


if __name__ == "__main__":
    main()
