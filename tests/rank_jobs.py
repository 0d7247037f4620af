"""Rank functions for the launch tests (module-level: ranks are spawned processes)."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import torch
import torch.distributed as dist


async def all_reduce_rank(rank: int, world_size: int, out: str) -> None:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    await anyio.lowlevel.checkpoint()  # each rank runs an event loop of its own
    Path(out, f"rank{rank}.txt").write_text(f"{world_size} {value.item()}")


async def fail_on_rank_one(rank: int, world_size: int) -> None:
    dist.barrier()
    if rank == 1:
        raise ValueError("rank one gives up")
    dist.barrier()  # rank 0 would wait here forever without the launcher
    await anyio.sleep_forever()


async def sleep_forever(rank: int, world_size: int) -> None:
    await anyio.sleep_forever()
