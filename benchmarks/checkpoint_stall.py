"""How long a checkpoint pauses training: the async Checkpoint callback vs torch.save in the loop.

A model of about 100 MB (six 2048x2048 linear layers, plain SGD so the checkpoint is the
model) trains on the CPU; every ``--every`` steps a checkpoint is saved, either by
``asynchat.callbacks.Checkpoint`` (snapshot on the compute thread, write on a background
thread) or by a ``def`` hook calling ``torch.save`` + fsync (what a hand-written loop does).
For each save, the stall is that step's time minus the median time of steps without a save;
the extra time of the following steps (the writer competing for the 2 cores) is shown too.

Run: python benchmarks/checkpoint_stall.py [--saves 4] [--every 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import anyio
import torch
from _common import machine, median, table
from torch import nn

from asynchat import Callback, LoopState, Trainer
from asynchat.callbacks import Checkpoint


class StepTimes(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_begin(self, state: LoopState) -> None:
        self.starts.append(time.perf_counter())

    def on_loop_end(self, state: LoopState) -> None:
        self.starts.append(time.perf_counter())


class SyncSave(Callback):
    """What a hand-written loop does: torch.save at the step, then fsync."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory, self.every = directory, every

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step % self.every == 0:
            path = self.directory / f"step-{state.global_step}.pt"
            with path.open("wb") as f:
                torch.save(state.model.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])


def run(kind: str, saves: int, every: int, directory: Path) -> list[float]:
    steps = every * saves + every // 2
    data = [(torch.randn(16, 2048), torch.randn(16, 2048)) for _ in range(8)]
    times = StepTimes()
    saver: Callback = (
        Checkpoint(directory, every_n_steps=every, keep_last=2, save_on_end=False)
        if kind == "async"
        else SyncSave(directory, every)
    )
    trainer = Trainer(
        model(), data, lambda m: torch.optim.SGD(m.parameters(), lr=1e-4), loss_fn=nn.MSELoss(),
        num_steps=steps, callbacks=[times, saver], device="cpu",
    )  # fmt: skip
    anyio.run(trainer.fit)
    return [b - a for a, b in zip(times.starts, times.starts[1:], strict=False)]


def snapshot_seconds() -> float:
    m = model()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        {k: v.detach().clone() for k, v in m.state_dict().items()}
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--every", type=int, default=8)
    args = parser.parse_args()
    size_mb = sum(p.numel() * p.element_size() for p in model().parameters()) / 2**20
    print(f"machine: {machine()}")
    print(
        f"model: {size_mb:.0f} MiB of parameters; {args.saves} saves, one every {args.every} steps"
    )
    rows = []
    results = {}
    for kind in ("sync", "async"):
        with tempfile.TemporaryDirectory() as tmp:
            durations = run(kind, args.saves, args.every, Path(tmp))
        save_steps = [i for i in range(len(durations)) if (i + 1) % args.every == 0]
        plain = [
            d for i, d in enumerate(durations) if i not in save_steps and i - 1 not in save_steps
        ]
        base = median(plain)
        stalls = [durations[i] - base for i in save_steps]
        after = [
            sum(durations[i + 1 : i + args.every]) - (args.every - 1) * base for i in save_steps
        ]
        results[kind] = median(stalls)
        rows.append((
            "torch.save in the loop" if kind == "sync" else "asynchat Checkpoint",
            f"{base * 1e3:.1f}", f"{median(stalls) * 1e3:.1f}", f"{max(stalls) * 1e3:.1f}",
            f"{median(after) * 1e3:.1f}",
        ))  # fmt: skip
    snapshot = snapshot_seconds()
    print(table(["saving", "step ms", "stall ms (median)", "stall ms (max)",
                 "extra ms over the next steps (median)"], rows))  # fmt: skip
    print(f"snapshot alone (state_dict copy to host memory): {snapshot * 1e3:.1f} ms")
    print(
        f"async stall / sync stall: {results['async'] / results['sync']:.3f}; "
        f"async stall / snapshot: {results['async'] / snapshot:.2f}"
    )


if __name__ == "__main__":
    main()
