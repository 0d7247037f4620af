"""Samples/s of 2 ranks against 1 rank, DDP and FSDP2 (gloo, CPU), and the model state each
rank holds.

A compute-bound MLP (1024-2048-2048-10, batch 256 per rank, one torch thread per rank, Adam)
trains for ``--steps`` steps per rank under ``asynchat.launch`` with
DistributedDataParallelTrainer or FullyShardedDataParallelTrainer; each rank times its own
loop and rank 0 reports its samples/s, its peak RSS and the bytes of model state it holds
(parameters, gradients and Adam's two moments: its shards under FSDP). Ideal scaling is
2.0x; the collectives over gloo cost the rest.

Run: python benchmarks/distributed_scaling.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import anyio
import torch
from _common import machine, median, table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import (
    Callback,
    DistributedDataParallelTrainer,
    FullyShardedDataParallelTrainer,
    LoopState,
    launch,
)

BATCH = 256  # per rank: enough compute per step that the gradient all-reduce does not dominate


async def train(rank: int, world_size: int, steps: int, out: str, kind: str = "ddp") -> None:
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
    held = StateBytes()
    kind_of = FullyShardedDataParallelTrainer if kind == "fsdp" else DistributedDataParallelTrainer
    trainer = kind_of(
        model, loader, lambda m: torch.optim.Adam(m.parameters(), lr=1e-4),
        loss_fn=nn.CrossEntropyLoss(), num_steps=steps, device="cpu", callbacks=[held],
    )  # fmt: skip
    start = time.perf_counter()
    await trainer.fit()
    elapsed = time.perf_counter() - start
    if rank == 0:
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = f"{world_size * BATCH * steps / elapsed} {held.bytes / 2**20} {rss_mib}"
        await anyio.Path(out).write_text(result)


class StateBytes(Callback):
    """The model state this rank holds at its last update: parameters, gradients and the
    optimizer's state, counting only the local shard of a sharded tensor."""

    bytes = 0

    def on_before_update(self, state: LoopState) -> None:
        def local(t: torch.Tensor) -> int:
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = list(state.model.parameters())
        total = sum(local(p) for p in params) + sum(
            local(p.grad) for p in params if p.grad is not None
        )
        assert state.optimizer is not None
        for values in state.optimizer.state.values():
            total += sum(local(v) for v in values.values() if isinstance(v, torch.Tensor))
        self.bytes = total


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


def measure(nprocs: int, steps: int, kind: str) -> tuple[float, float, float]:
    """(samples/s, model state MiB on rank 0, peak RSS MiB of rank 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result")
        launch(train, nprocs=nprocs, args=(steps, str(out), kind))
        speed, state_mib, rss_mib = (float(x) for x in out.read_text().split())
        return speed, state_mib, rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = [(kind, n) for kind in ("ddp", "fsdp") for n in (1, 2)]
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for kind, nprocs in variants:
            results[(kind, nprocs)].append(measure(nprocs, args.steps, kind))
    one = median([r[0] for r in results[("ddp", 1)]])
    rows = [
        (kind.upper(), n, f"{median([r[0] for r in v]):,.0f}",
         f"{median([r[0] for r in v]) / one:.2f}x", f"{v[-1][1]:.1f}",
         f"{median([r[2] for r in v]):.0f}")
        for (kind, n), v in results.items()
    ]  # fmt: skip
    print(f"machine: {machine()}")
    print(f"MLP 1024-2048-2048-10, Adam, batch 256 per rank, 1 torch thread per rank, gloo; "
          f"{args.steps} steps, {args.rounds} interleaved rounds, medians")  # fmt: skip
    print(table(["trainer", "ranks", "samples/s", "vs 1 DDP rank", "model state MiB/rank",
                 "peak RSS MiB"], rows))  # fmt: skip
    print(f"machine ceiling (2 independent matmul processes vs 1): {machine_ceiling():.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
