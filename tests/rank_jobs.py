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


def ddp_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    )


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


async def ddp_train(rank: int, world_size: int, out: str, stop_at: int) -> None:
    from asynchat import Callback, DistributedDataParallelTrainer, LoopState

    class StopOnRankZero(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if rank == 0 and state.global_step == stop_at:
                state.loop.stop("rank 0 had enough")

    loader = torch.utils.data.DataLoader(ddp_data(), batch_size=8)  # 8 per rank: 16 in all
    trainer = DistributedDataParallelTrainer(
        ddp_model(),
        loader,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        num_epochs=2,
        device="cpu",
        callbacks=[StopOnRankZero()],
    )
    state = await trainer.fit()
    torch.save(
        {"model": trainer.model.state_dict(), "global_step": state.global_step,
         "stop_reason": state.stop_reason},
        Path(out, f"rank{rank}.pt"),
    )  # fmt: skip
