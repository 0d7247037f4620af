"""How long a launch of two ranks takes, start to end, for a job that takes one SGD step over
an all-reduced gradient (what every training rank does first: torch imports ``torch._dynamo``
the first time an optimizer is built).

The baseline is the hand-written way: ``torch.multiprocessing.spawn`` of a function that
initialises a gloo process group (env rendezvous) and takes that step. Against it:
``asynchat.launch`` as it starts ranks by default (forked from a server that imported
torch, on Linux: the first launch of a process starts the server), and ``asynchat.launch``
with its ranks spawned (the start method before the fork server; patched in here). The
variants are interleaved round by round; the table shows the median seconds per launch and
the ratio to the baseline measured in the same run.

Run: python benchmarks/launch_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import machine, median, table

import asynchat._launch
from asynchat import launch
from asynchat._launch import free_port


def _plain(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    _step()
    dist.destroy_process_group()


async def _job(rank: int, world_size: int) -> None:
    _step()


def _step() -> None:
    """One SGD step over a gradient all-reduced across the ranks."""
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = torch.ones(1)
    dist.all_reduce(weight.grad)
    optimizer.step()


def _timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    default_context = asynchat._launch.rank_context
    first = _timed(lambda: launch(_job, nprocs=2))  # starts the fork server

    def spawned() -> None:
        asynchat._launch.rank_context = lambda: mp.get_context("spawn")  # type: ignore[assignment]
        try:
            launch(_job, nprocs=2)
        finally:
            asynchat._launch.rank_context = default_context  # type: ignore[assignment]

    variants: dict[str, Callable[[], None]] = {
        "torch.multiprocessing.spawn (baseline)": lambda: mp.spawn(
            _plain, args=(2, free_port()), nprocs=2
        ),
        "asynchat.launch, ranks spawned": spawned,
        "asynchat.launch, later launches (default)": lambda: launch(_job, nprocs=2),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, run in variants.items():
            times[name].append(_timed(run))
    base = median(times["torch.multiprocessing.spawn (baseline)"])
    rows = [(name, f"{median(t):.2f}", f"{median(t) / base:.2f}x") for name, t in times.items()]
    rows.append(("asynchat.launch, first launch (starts the server)", f"{first:.2f}",
                 f"{first / base:.2f}x"))  # fmt: skip
    print(machine())
    print(f"two ranks, one SGD step over an all-reduced gradient; median of {options.rounds} "
          "launches each\n")  # fmt: skip
    print(table(["variant", "s/launch", "vs baseline"], rows))


if __name__ == "__main__":
    main()
