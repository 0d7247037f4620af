"""Train the digits CNN wrapped as a model that computes its own loss, as a Hugging Face
model does (``labels`` in, a dict with ``"loss"`` and ``"logits"`` out).

    python examples/digits_own_loss.py [--epochs 8] [--out runs/digits-own-loss]

The batches are dicts (``{"pixels": ..., "labels": ...}``) and go to the model whole, labels
included, with ``loss_fn=model_loss``: the engine trains on the loss the model returns. The
validation loss comes from the model too; its accuracy reads the logits out of the model's
dict (``select=``). Checkpoints of the most accurate epochs go to ``<out>/checkpoints``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # (see digits.py)

import argparse
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_loaders, make_model, positive_int  # the one-process demo's

from asynchat import AsynchatError, LoopState, Trainer, model_loss
from asynchat.callbacks import Checkpoint, Progress, Validation


class DigitClassifier(nn.Module):
    """The demo's CNN behind Hugging Face's contract: ``forward(pixels, labels=None)``
    returns ``{"logits": ...}``, with ``"loss"`` (cross-entropy) when given the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.net(pixels)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


class AsDicts(Dataset[dict[str, torch.Tensor]]):
    """A dataset of ``(pixels, label)`` pairs, as the dicts a tokenizer's pipeline yields."""

    def __init__(self, pairs: Dataset[Any]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels, label = self.pairs[index]
        return {"pixels": pixels, "labels": label}


def logits_and_labels(state: LoopState) -> tuple[torch.Tensor, torch.Tensor]:
    return state.outputs["logits"], state.batch["labels"]


async def train(epochs: int = 8, out: Path = Path("runs/digits-own-loss")) -> float:
    """Train from scratch and return the last validation accuracy."""
    torch.manual_seed(0)
    pairs, val_pairs = digits_loaders()
    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(AsDicts(pairs.dataset), 32, shuffle=True, generator=generator)
    val_loader = DataLoader(AsDicts(val_pairs.dataset), batch_size=256)
    checkpoints = out / "checkpoints"
    accuracy = torchmetrics.classification.MulticlassAccuracy(10, average="micro")
    trainer = Trainer(
        DigitClassifier(),
        train_loader,
        lambda model: torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4),
        loss_fn=model_loss,
        num_epochs=epochs,
        callbacks=[
            Validation(
                val_loader, metrics={"accuracy": accuracy}, select=logits_and_labels,
                loss_fn=model_loss,
            ),
            Checkpoint(
                checkpoints, every_n_epochs=1, keep_last=2, monitor="val/accuracy", mode="max",
                overwrite=True,  # (a new run each time: the last run's checkpoints give way)
            ),
            Progress(),
        ],
    )  # fmt: skip
    state = await trainer.fit()
    return float(state.metrics["val/accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=positive_int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/digits-own-loss"))
    args = parser.parse_args()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot create {args.out}: {exc.strerror}")
    try:
        accuracy = anyio.run(train, args.epochs, args.out)
    except* AsynchatError as refused:  # (its --out in use by another run, say)
        parser.exit(1, f"{parser.prog}: error: {refused.exceptions[0]}\n")
    print(f"validation accuracy: {accuracy:.4f} (checkpoints in {args.out / 'checkpoints'})")


if __name__ == "__main__":
    main()
