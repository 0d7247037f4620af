"""Multinomial logistic regression on the digits, fitted by full-batch L-BFGS over several
processes: the model and objective of scikit-learn's ``LogisticRegression`` (its default
solver is L-BFGS too), and the same optimum.

    python examples/digits_lbfgs.py [--ranks 2] [--steps 8] [--out runs/digits-lbfgs]

``asynchat.launch`` starts one process per rank. Each rank holds its share of the training
set as one batch (the trainer re-shards the loader with a DistributedSampler), and each step
is one ``torch.optim.LBFGS`` step (up to 20 iterations, a strong-Wolfe line search) on the
cross-entropy plus the L2 penalty ``LogisticRegression(C=1.0)`` puts on the weights. DDP
averages the gradients over the ranks and the engine's closure averages each evaluation's
loss, so every rank's L-BFGS takes the same decisions (how many evaluations, which step
sizes) and the ranks fit what one process fits on the whole set. Validation after each step
(each rank its share of the validation set), checkpoints of the last two steps and of the
most accurate one (L-BFGS's history in them), progress on rank 0. At the end rank 0 fits
scikit-learn's ``LogisticRegression`` on the same data and prints both objectives and both
validation accuracies.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (see digits.py)

import argparse
import math
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import positive_int  # the one-process demo's
from digits_sharded import own_share  # each rank's share of the validation set

from asynchat import DistributedDataParallelTrainer, launch
from asynchat.callbacks import Checkpoint, Progress, Validation

C = 1.0  # LogisticRegression's inverse penalty: the objective is sum(CE) + |W|^2 / (2 C)


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels scaled to mean 0 and deviation 1 (over the training set), and labels:
    1440 samples to train on (a whole share on each of 1 to 6 ranks), 357 to validate."""
    pixels, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        pixels, labels, test_size=357, random_state=0, stratify=labels
    )
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val


class PenalisedCrossEntropy:
    """``LogisticRegression``'s objective, divided by the number of samples: the batch's mean
    cross-entropy plus ``|W|^2 / (2 C n)`` (the bias is not penalised). The ranks' mean of it,
    over equal shares, is the whole training set's."""

    def __init__(self, model: nn.Linear, samples: int) -> None:
        self.weight = model.weight
        self.scale = 1 / (2 * C * samples)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels) + self.scale * self.weight.square().sum()


def loaders(world_size: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The training set in batches of a share (one step an epoch); validation in one."""
    x_train, y_train, x_val, y_val = digits_arrays()

    def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    share = math.ceil(len(x_train) / world_size)
    return DataLoader(dataset(x_train, y_train), batch_size=share), DataLoader(
        dataset(x_val, y_val), batch_size=len(x_val)
    )


def scikit_learns(model: nn.Linear) -> tuple[float, float, float]:
    """The objective ``model`` reaches on the training set, scikit-learn's (both divided by
    the number of samples), and scikit-learn's validation accuracy."""
    x_train, y_train, x_val, y_val = digits_arrays()
    fitted = LogisticRegression(C=C, max_iter=5000).fit(x_train, y_train)
    n = len(x_train)

    def objective(weight: np.ndarray, bias: np.ndarray) -> float:
        logits = torch.tensor(x_train @ weight.T + bias, dtype=torch.float64)
        cross_entropy = F.cross_entropy(logits, torch.tensor(y_train)).item()
        return cross_entropy + float((weight**2).sum()) / (2 * C * n)

    ours = objective(model.weight.detach().double().numpy(), model.bias.detach().double().numpy())
    theirs = objective(fitted.coef_, fitted.intercept_)
    return ours, theirs, float(fitted.score(x_val, y_val))


async def train_rank(rank: int, world_size: int, steps: int, out: str) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Linear(64, 10)
    train_loader, val_loader = loaders(world_size)
    accuracy = torchmetrics.classification.MulticlassAccuracy(10, average="micro")
    trainer = DistributedDataParallelTrainer(
        model,
        train_loader,
        lambda m: torch.optim.LBFGS(
            m.parameters(), lr=1, max_iter=20, history_size=10, line_search_fn="strong_wolfe"
        ),
        loss_fn=PenalisedCrossEntropy(model, len(train_loader.dataset)),  # type: ignore[arg-type]
        num_epochs=steps,
        callbacks=[
            Validation(  # (over every rank's share: the figures are the whole set's)
                own_share(val_loader, rank, world_size), metrics={"accuracy": accuracy},
                loss_fn=nn.CrossEntropyLoss(),
            ),
            Checkpoint(
                Path(out, "checkpoints"), every_n_epochs=1, keep_last=2, keep_best=1,
                monitor="val/accuracy", mode="max",
                overwrite=True,  # (a new run each time: the last run's give way)
            ),
            Progress(),
        ],
    )  # fmt: skip
    state = await trainer.fit()
    if rank == 0:
        # (a fit of seconds: on a worker thread, not in the event loop)
        ours, theirs, their_accuracy = await anyio.to_thread.run_sync(scikit_learns, model)
        print(
            f"objective {ours:.6f} against scikit-learn's {theirs:.6f}; validation accuracy "
            f"{state.metrics['val/accuracy']:.4f} against scikit-learn's {their_accuracy:.4f} "
            f"({world_size} rank{'s' * (world_size > 1)}, {steps} L-BFGS steps)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/digits-lbfgs"))
    args = parser.parse_args()
    if 1440 % args.ranks:
        parser.error(f"argument --ranks: must divide the 1440 training samples, got {args.ranks}")
    launch(train_rank, nprocs=args.ranks, args=(args.steps, str(args.out)))


if __name__ == "__main__":
    main()
