"""Samples/s of 2 ranks against 1 rank, DDP and FSDP2 (gloo, CPU), and the model state each
rank holds.

A compute-bound MLP (1024-2048-2048-10, batch 256 per rank, one torch thread per rank, Adam)
trains for ``--steps`` steps per rank under ``asynchat.launch`` with
DistributedDataParallelTrainer or FullyShardedDataParallelTrainer; each rank times its own
loop and rank 0 reports its samples/s, its peak RSS and the bytes of model state it holds
(parameters, gradients and Adam's two moments: its shards under FSDP). Ideal scaling is
2.0x; the collectives over gloo cost the rest.

Then the checkpoint stall of sharded saves: the FSDP trainer on 2 ranks saving every 5
steps, with asynchat's Checkpoint (DCP ``async_save``: each rank stages its shards and a
thread writes them) against a hand-written callback calling DCP's synchronous ``save``;
the pause each save puts in training (median, on rank 0) and samples/s with the saves.

Run: python benchmarks/distributed_scaling.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed.checkpoint as dcp
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
from asynchat.callbacks import Checkpoint

BATCH = 256  # per rank: enough compute per step that the gradient all-reduce does not dominate


def setup(rank: int, steps: int) -> tuple[nn.Module, DataLoader[Any]]:
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
    return model, DataLoader(data, batch_size=BATCH)


async def train(rank: int, world_size: int, steps: int, out: str, kind: str = "ddp") -> None:
    model, loader = setup(rank, steps)
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


class TimedCheckpoint(Checkpoint):
    """asynchat's Checkpoint, timing the pause each save puts in training."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalls: list[float] = []

    def save(self, state: LoopState) -> None:
        start = time.perf_counter()
        super().save(state)
        self.stalls.append(time.perf_counter() - start)


class SyncSave(Callback):
    """What one writes by hand: DCP's synchronous save of the sharded state, every n steps."""

    def __init__(self, directory: str, every: int) -> None:
        self.directory, self.every = directory, every
        self.stalls: list[float] = []

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step % self.every == 0 or state.is_last_step:
            start = time.perf_counter()
            dcp.save(
                state.loop.sharded_state_dict(),  # type: ignore[attr-defined]
                checkpoint_id=f"{self.directory}/step-{state.global_step}",
            )
            self.stalls.append(time.perf_counter() - start)


async def train_saving(
    rank: int, world_size: int, steps: int, out: str, directory: str, mode: str
) -> None:
    """The FSDP trainer saving every 5 steps and at the end: ``mode`` "async" (Checkpoint),
    "sync" (DCP's save by hand) or "none"."""
    model, loader = setup(rank, steps)
    saver: TimedCheckpoint | SyncSave | None = None
    if mode == "async":
        saver = TimedCheckpoint(directory, every_n_steps=5, keep_last=None, save_on_end=False)
    elif mode == "sync":
        saver = SyncSave(directory, every=5)
    trainer = FullyShardedDataParallelTrainer(
        model, loader, lambda m: torch.optim.Adam(m.parameters(), lr=1e-4),
        loss_fn=nn.CrossEntropyLoss(), num_steps=steps, device="cpu",
        callbacks=[saver] if saver is not None else [],
    )  # fmt: skip
    start = time.perf_counter()
    await trainer.fit()  # returns once the last write is on disk, in every mode
    elapsed = time.perf_counter() - start
    if rank == 0:
        stall = median(saver.stalls) if saver is not None else 0.0
        await anyio.Path(out).write_text(f"{world_size * BATCH * steps / elapsed} {stall}")


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


def measure_saving(steps: int, mode: str) -> tuple[float, float]:
    """(samples/s, median stall per save in seconds) of 2 FSDP ranks saving in ``mode``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result")
        launch(train_saving, nprocs=2, args=(steps, str(out), str(Path(tmp, "ckpt")), mode))
        speed, stall = (float(x) for x in out.read_text().split())
        return speed, stall


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

    modes = ["none", "sync", "async"]
    saving: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            saving[mode].append(measure_saving(args.steps, mode))
    base = median([r[0] for r in saving["none"]])
    labels = {"none": "no checkpoint", "sync": "dcp.save by hand (sync)",
              "async": "Checkpoint (DCP async_save)"}  # fmt: skip
    rows = [
        (labels[m], f"{median([r[1] for r in v]) * 1e3:.1f}" if m != "none" else "-",
         f"{median([r[0] for r in v]):,.0f}", f"{median([r[0] for r in v]) / base:.2f}x")
        for m, v in saving.items()
    ]  # fmt: skip
    print(f"\nFSDP, 2 ranks, a save every 5 steps of {args.steps}, the pause "
          "per save on rank 0")  # fmt: skip
    print(table(["saving", "pause per save ms", "samples/s", "vs no checkpoint"], rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
