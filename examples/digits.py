"""Train a small CNN on scikit-learn's handwritten digits, inside an async program.

    python examples/digits.py [--epochs 15] [--out runs/digits] [--resume] [--profile]

The data ships inside scikit-learn (no download). The shipped callbacks do the rest:
validation accuracy after every epoch (a Predictor run between epochs), a cosine learning
rate schedule with warmup, progress (a bar on a terminal, plain lines otherwise), TensorBoard
logs in ``<out>/tb``, and checkpoints in ``<out>/checkpoints`` written in the background,
keeping the newest and the most accurate. ``--resume`` continues from the newest checkpoint
(give it the same ``--epochs``: the schedule keeps the length it was saved with, and says so);
without it a run starts over, and its checkpoints and TensorBoard curves replace the last
run's (``overwrite=True``: never those of a run still writing there, which is refused; and
only as it saves and logs its own, so a run that fails at its first step loses nothing).
``--profile`` records three steps of the run with ``torch.profiler`` into ``<out>/profile``
(a Chrome trace for https://ui.perfetto.dev, and a table of the ops that took longest).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning, so the engine's
# compute thread keeps the cores (on 2 CPU cores a step costs up to 20% less; see
# benchmarks/RESULTS.md). A value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio
import torch
import torchmetrics
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import AsynchatError, Trainer
from asynchat.callbacks import (
    Checkpoint,
    LRSchedule,
    Profiler,
    Progress,
    StatsMonitor,
    TensorBoardLogger,
    Validation,
    cosine,
    load_checkpoint,
    resumable,
)


def digits_loaders(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
    images, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    mean, std = x_train.mean(), x_train.std()

    def dataset(x: Any, y: Any) -> TensorDataset:
        inputs = torch.tensor((x - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(inputs, torch.tensor(y, dtype=torch.long))

    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(dataset(x_train, y_train), batch_size, shuffle=True, generator=generator)
    val = DataLoader(dataset(x_val, y_val), batch_size=256)
    return train, val


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 4 x 4
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def validation(loader: DataLoader[Any]) -> Validation:
    """Validation on ``loader`` after every epoch: accuracy and loss."""
    accuracy = torchmetrics.classification.MulticlassAccuracy(10, average="micro")
    return Validation(loader, metrics={"accuracy": accuracy}, loss_fn=nn.CrossEntropyLoss())


async def train(
    epochs: int = 15, out: Path = Path("runs/digits"), resume: bool = False, profile: bool = False
) -> float:
    """Train and return the best validation accuracy of the run (with ``resume``, of the
    runs before it too: their best checkpoint is kept); ``profile``: record steps 6-8."""
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders()
    checkpoints = out / "checkpoints"
    if not resume and resumable(checkpoints) is not None:
        print(f"starting over: this run's checkpoints and logs replace those in {out}")
    trainer = Trainer(
        make_model(),
        train_loader,
        lambda model: torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4),
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=epochs,
        resume_from=checkpoints if resume else None,
        callbacks=[
            validation(val_loader),
            LRSchedule(
                cosine(total_steps=epochs * len(train_loader)), warmup_steps=len(train_loader)
            ),
            StatsMonitor(every_n_steps=len(train_loader)),
            Checkpoint(
                checkpoints,
                every_n_epochs=1,
                keep_last=2,
                monitor="val/accuracy",
                mode="max",
                overwrite=not resume,
            ),
            TensorBoardLogger(out / "tb", every_n_steps=10, overwrite=not resume),
            Progress(),
            *([Profiler(out / "profile", wait=4, warmup=1, active=3)] if profile else []),
        ],
    )
    best = 0.0

    async def watch() -> None:  # another task on the same event loop, alive while training
        nonlocal best
        while True:
            best = max(best, trainer.state.metrics.get("val/accuracy", 0.0))
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        state = await trainer.fit()
        tg.cancel_scope.cancel()
    # The best checkpoint saved, read on a worker thread: file reads block, and this event
    # loop may serve other tasks (the example's own blocked it for 0.17 s under `-X dev`).
    kept, _ = await anyio.to_thread.run_sync(lambda: load_checkpoint(checkpoints, best=True))
    return max(best, state.metrics.get("val/accuracy", 0.0), kept["metrics"]["val/accuracy"])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=positive_int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--profile", action="store_true", help="profile 3 steps into OUT/profile")
    args = parser.parse_args()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot create {args.out}: {exc.strerror}")
    checkpoints = args.out / "checkpoints"
    try:
        if args.resume and resumable(checkpoints) is None:
            parser.error(f"argument --resume: no checkpoint in {checkpoints} to continue from")
        accuracy = anyio.run(train, args.epochs, args.out, args.resume, args.profile)
    except* AsynchatError as refused:  # (a directory in use, say): its message says why
        parser.exit(1, f"{parser.prog}: error: {refused.exceptions[0]}\n")
    try:
        print(f"best validation accuracy: {accuracy:.4f} (checkpoints in {checkpoints})")
    except BrokenPipeError:  # the reader left (`| head`): the run is done and saved all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (for the exit's flush)


if __name__ == "__main__":
    main()
