"""Samples/s of 2 ranks against 1 rank (DistributedDataParallelTrainer, gloo, CPU).

A compute-bound MLP (1024-2048-2048-10, batch 256 per rank, one torch thread per rank) trains
for ``--steps`` steps per rank under ``asynchat.launch``; each rank times its own loop and
rank 0 reports. Ideal scaling is 2.0x; gradient all-reduce over gloo costs the rest.

Run: python benchmarks/distributed_scaling.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import torch
from _common import machine, median, table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import DistributedDataParallelTrainer, launch

BATCH = 256  # per rank: enough compute per step that the gradient all-reduce does not dominate


async def train(rank: int, world_size: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    data = TensorDataset(
        torch.randn(BATCH * steps, 1024, generator=g),
        torch.randint(0, 10, (BATCH * steps,), generator=g),
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )
    # The batch size is per rank (the trainer shards the data): the global batch is
    # BATCH x world_size, so each rank does the same work per step as a single rank does.
    loader = DataLoader(data, batch_size=BATCH)
    trainer = DistributedDataParallelTrainer(
        model, loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
        loss_fn=nn.CrossEntropyLoss(), num_steps=steps, device="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    await trainer.fit()
    elapsed = time.perf_counter() - start
    if rank == 0:
        await anyio.Path(out).write_text(str(world_size * BATCH * steps / elapsed))


def _matmuls(seconds: list[float]) -> None:
    torch.set_num_threads(1)
    a = torch.randn(2048, 2048)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    seconds.append(time.perf_counter() - start)


def machine_ceiling() -> float:
    """Throughput of 2 independent single-threaded matmul processes vs 1: what 2 ranks can
    gain at best on this machine, with no communication at all."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        one = manager.list()
        process = ctx.Process(target=_matmuls, args=(one,))
        process.start()
        process.join()
        two = manager.list()
        processes = [ctx.Process(target=_matmuls, args=(two,)) for _ in range(2)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        return 2 * one[0] / max(two)


def samples_per_s(nprocs: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result")
        launch(train, nprocs=nprocs, args=(steps, str(out)))
        return float(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for nprocs in (1, 2):
            results[nprocs].append(samples_per_s(nprocs, args.steps))
    one = median(results[1])
    rows = [(n, f"{median(v):,.0f}", f"{median(v) / one:.2f}x") for n, v in results.items()]
    print(f"machine: {machine()}")
    print(f"MLP 1024-2048-2048-10, batch 256 per rank, 1 torch thread per rank, gloo; "
          f"{args.steps} steps, {args.rounds} interleaved rounds, medians")  # fmt: skip
    print(table(["ranks", "samples/s", "vs 1 rank"], rows))
    print(f"machine ceiling (2 independent matmul processes vs 1): {machine_ceiling():.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
