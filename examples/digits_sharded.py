"""Train the digits CNN on several processes with its model sharded over them (FSDP), then
predict with the sharded model.

    python examples/digits_sharded.py [--ranks 2] [--epochs 8] [--out runs/digits-sharded]
        [--resume]

``asynchat.launch`` starts one process per rank (gloo on the CPU; NCCL with a GPU a rank),
and each runs ``train_rank``. A FullyShardedDataParallelTrainer shards the parameters,
gradients and optimizer state over the ranks and re-shards the training DataLoader with a
DistributedSampler; Validation runs after each epoch on every rank's share of the validation
set (its accuracy and loss are over all of it); Checkpoint writes a sharded checkpoint (a
directory of every rank's shards) after each epoch in the background, and ``--resume`` goes
on from the newest, on any number of ranks. Progress prints on rank 0 only.

Once trained, a Predictor over the sharded model scores the validation set again: each rank
predicts its own share, the ranks step together (every forward gathers the parameters from
all of them), and the counts of correct answers are summed over the ranks. It prints the
same accuracy as the last validation.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (see digits.py)

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_loaders, make_model, positive_int, validation  # the one-process demo's

from asynchat import Callback, FullyShardedDataParallelTrainer, LoopState, Predictor, launch
from asynchat.callbacks import Checkpoint, Progress


def own_share(loader: DataLoader[Any], rank: int, world_size: int) -> DataLoader[Any]:
    """Every ``world_size``-th sample of ``loader``'s dataset from ``rank`` on, in order: the
    ranks' shares cover it once (a DistributedSampler would pad them to equal lengths with
    repeated samples, counted twice in a score)."""
    samples = Subset(loader.dataset, range(rank, len(loader.dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(samples, batch_size=loader.batch_size)


class CountCorrect(Callback):
    """Counts the batches' correct predictions and samples (on this rank)."""

    def __init__(self) -> None:
        self.correct = self.samples = 0

    def on_batch_end(self, state: LoopState) -> None:
        _, targets = state.batch
        self.correct += int((state.outputs.argmax(dim=1) == targets).sum())
        self.samples += len(targets)


async def train_rank(rank: int, world_size: int, epochs: int, out: str, resume: bool) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    train_loader, val_loader = digits_loaders()
    checkpoints = Path(out, "checkpoints")
    trainer = FullyShardedDataParallelTrainer(
        make_model(),
        train_loader,  # re-sharded by the trainer: each rank trains on its share
        lambda model: torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4),
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=epochs,
        resume_from=checkpoints if resume else None,
        callbacks=[
            validation(own_share(val_loader, rank, world_size)),
            Checkpoint(checkpoints, every_n_epochs=1, keep_last=2, overwrite=not resume),
            Progress(),
        ],
    )
    state = await trainer.fit()

    counts = CountCorrect()
    await Predictor(
        trainer.model, own_share(val_loader, rank, world_size), callbacks=[counts]
    ).fit()
    correct, samples = trainer.sum_over_ranks([counts.correct, counts.samples])
    if rank == 0:
        print(
            f"validation accuracy {state.metrics['val/accuracy']:.4f}; the sharded model's "
            f"predictions over {world_size} rank{'s' * (world_size > 1)}: {correct / samples:.4f} "
            f"({correct:.0f} of {samples:.0f}; checkpoints in {checkpoints})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--epochs", type=positive_int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/digits-sharded"))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args()
    launch(train_rank, nprocs=args.ranks, args=(args.epochs, str(args.out), args.resume))


if __name__ == "__main__":
    main()
