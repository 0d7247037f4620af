"""A DDP (or FSDP) job for the elastic-restart test, run by torchrun with restarts allowed.

    torchrun --nproc-per-node=2 --max-restarts=1 ... elastic_job.py DIR OUT TOTAL KILL_AT KIND

Trains TOTAL steps with a checkpoint every step in DIR/ckpt. With KILL_AT > 0, rank 1
SIGKILLs itself once, at the end of step KILL_AT (the marker DIR/killed says it has), and the
agent restarts both workers; they find the checkpoint through ``resumable`` and go on by
themselves. Rank 0 saves the final weights to OUT (the optimizer's too for DDP), with how
many times this job was started (DIR/starts) and the checkpoint it resumed from. KIND is
"ddp" or "fsdp" (sharded checkpoints, written by both ranks).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import rank_jobs
import torch

from asynchat import (
    Callback,
    DistributedDataParallelTrainer,
    FullyShardedDataParallelTrainer,
    LoopState,
    launch,
)
from asynchat.callbacks import Checkpoint, resumable


class KillOnce(Callback):
    def __init__(self, rank: int, at: int, marker: Path) -> None:
        self.rank, self.at, self.marker = rank, at, marker

    def on_step_end(self, state: LoopState) -> None:
        if self.rank == 1 and state.global_step == self.at and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


async def job(
    rank: int, world_size: int, directory: str, out: str, total: int, at: int, kind: str
) -> None:
    base = Path(directory)
    checkpoints = base / "ckpt"
    trainer_class = (
        FullyShardedDataParallelTrainer if kind == "fsdp" else DistributedDataParallelTrainer
    )
    trainer = trainer_class(
        rank_jobs.ddp_model(),
        torch.utils.data.DataLoader(rank_jobs.ddp_data(), batch_size=8, shuffle=True),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.CrossEntropyLoss(),
        num_steps=total,
        device="cpu",
        resume_from=resumable(checkpoints),
        callbacks=[
            KillOnce(rank, at, base / "killed"),
            Checkpoint(checkpoints, every_n_steps=1, keep_last=2),
        ],
    )
    state = await trainer.fit()
    result = {"global_step": state.global_step, "resumed_from": str(trainer.resumed_from)}
    if kind == "fsdp":  # gathered from the shards (a collective: every rank)
        result["model"] = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}
    else:
        result["model"] = trainer.model.state_dict()
        result["optimizer"] = trainer.optimizers["default"].state_dict()
    if rank == 0:
        torch.save(result, out)


if __name__ == "__main__":
    directory, out, total, at, kind = sys.argv[1:]
    if os.environ.get("RANK") == "0":  # one line per start of the job
        with open(Path(directory) / "starts", "a") as starts:
            starts.write(f"{os.getpid()}\n")
    launch(job, nprocs=2, args=(directory, out, int(total), int(at), kind))
