"""Train a small network on scikit-learn's handwritten digits, inside an async program.

    python examples/digits.py [--epochs 15] [--out runs/digits]

The data ships inside scikit-learn (no download). Each epoch the model is validated on a
held-out split by a Predictor awaited from an ``async def`` hook, and progress is shown (a rich
bar on a terminal, plain lines otherwise). The best epoch's weights are copied to host memory
on the compute thread and written to disk at the end by a worker thread, atomically, so the
event loop never blocks on the file. The script ends by printing the best validation accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Callback, LoopState, Predictor, Trainer


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


class Accuracy(Callback):
    """Counts correct predictions on the compute thread: no host/device sync per batch."""

    def on_loop_begin(self, state: LoopState) -> None:
        self.correct = torch.zeros((), dtype=torch.long, device=state.device)
        self.total = 0

    def on_batch_end(self, state: LoopState) -> None:
        _, targets = state.batch
        self.correct += (state.outputs.argmax(dim=1) == targets).sum()
        self.total += len(targets)


class Validate(Callback):
    """After each epoch, runs a Predictor on the validation data and publishes its accuracy."""

    def __init__(self, data_loader: DataLoader[Any]) -> None:
        self.data_loader = data_loader

    async def on_epoch_end(self, state: LoopState) -> None:
        accuracy = Accuracy()
        await Predictor(state.model, self.data_loader, callbacks=[accuracy]).fit()
        correct = await state.loop.to_host(accuracy.correct)
        state.metrics["val/accuracy"] = int(correct) / accuracy.total


class SaveBest(Callback):
    """Keeps the weights of the best epoch and writes them to ``path`` at the end.

    The copy to host memory runs on the compute thread (it must not race the next step); the
    slow part, writing the file, runs on a worker thread so the event loop stays free.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.best = -1.0
        self.snapshot: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: LoopState) -> None:
        accuracy = state.metrics.get("val/accuracy", -1.0)
        if accuracy > self.best:
            self.best = accuracy
            self.snapshot = {
                k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()
            }

    async def on_loop_end(self, state: LoopState) -> None:
        if self.snapshot is not None:
            await anyio.to_thread.run_sync(save_atomically, self.snapshot, self.path)


def save_atomically(obj: object, path: Path) -> None:
    """Write to a temporary file, then rename: never a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class Progress(Callback):
    """A rich progress bar on a terminal, one plain line per epoch otherwise."""

    def __init__(self) -> None:
        self.rich = sys.stdout.isatty()

    def on_loop_begin(self, state: LoopState) -> None:
        self.started = time.perf_counter()
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task(
                "train", total=state.num_epochs * (state.steps_per_epoch or 0), epoch=0, info=""
            )
            self.bar.start()

    def on_epoch_begin(self, state: LoopState) -> None:
        self.loss_sum = torch.zeros((), device=state.device)

    def on_step_end(self, state: LoopState) -> None:
        self.loss_sum += state.loss.detach()  # stays on the device: no sync per step
        if self.rich:
            self.bar.update(self.task, advance=1, epoch=state.epoch + 1)

    async def on_epoch_end(self, state: LoopState) -> None:
        loss = float(await state.loop.to_host(self.loss_sum)) / (state.step + 1)
        info = f"loss {loss:.4f}  val acc {state.metrics.get('val/accuracy', float('nan')):.4f}"
        if self.rich:
            self.bar.update(self.task, info=info)
        else:
            elapsed = time.perf_counter() - self.started
            print(
                f"epoch {state.epoch + 1:3d}/{state.num_epochs}  {info}  ({elapsed:.1f} s)",
                flush=True,
            )

    def on_loop_end(self, state: LoopState) -> None:
        if self.rich:
            self.bar.stop()


async def train(epochs: int = 15, out: Path = Path("runs/digits")) -> float:
    """Train and return the best validation accuracy."""
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders()
    save = SaveBest(out / "best.pt")
    trainer = Trainer(
        make_model(),
        train_loader,
        lambda model: torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4),
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=epochs,
        callbacks=[Validate(val_loader), save, Progress()],
    )
    await trainer.fit()
    return save.best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    args = parser.parse_args()
    accuracy = anyio.run(train, args.epochs, args.out)
    print(f"best validation accuracy: {accuracy:.4f} (weights in {args.out / 'best.pt'})")


if __name__ == "__main__":
    main()
