"""Train the digits CNN online, on batches that arrive from an async feed.

    python examples/digits_stream.py [--batches 400] [--every 2] [--out runs/digits-stream]
                                     [--resume]

A producer task stands in for a feed (a message queue, a socket, a stream of requests): it
sends shuffled batches of the training digits into an anyio memory object stream, one every
``--every`` milliseconds, and closes the stream after ``--batches`` of them. The Trainer
reads that stream itself, on the event loop, one batch when its step asks for it; the
stream's buffer of 8 holds the feed back when the model falls behind. It validates every 50
steps, keeps the most accurate weights in ``<out>/checkpoints``, and its one epoch ends when
the feed closes. Ctrl-C stops it after the step in progress: the batch it has taken from the
stream is trained first, and nothing more is taken from it, and the last step is saved.
``--resume`` goes on from there with a new feed: its steps count on from the saved ones, and
every batch of the new feed is trained (a stream is not replayed, so none is skipped).
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
import torchmetrics
from anyio.streams.memory import MemoryObjectSendStream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_loaders, make_model, positive_int  # the one-process demo's

from asynchat import AsynchatError, Callback, LoopState, Trainer, stop_on_signals
from asynchat.callbacks import Checkpoint, Progress, Validation, resumable

Batch = tuple[torch.Tensor, torch.Tensor]


async def feed(send: MemoryObjectSendStream[Batch], batches: int, every_ms: float) -> None:
    """Send ``batches`` training batches, cycling over the shuffled training set, one every
    ``every_ms`` milliseconds (waiting while the stream's buffer is full), then close."""
    train, _ = digits_loaders()
    async with send:
        sent = 0
        while sent < batches:
            for batch in train:
                if sent == batches:
                    break
                await anyio.sleep(every_ms / 1000)
                await send.send(batch)
                sent += 1


class StartingStep(Callback):
    """The global step the run starts from (a resumed run's saved one)."""

    step = 0

    def on_loop_begin(self, state: LoopState) -> None:
        self.step = state.global_step


async def train(
    batches: int = 400,
    every_ms: float = 2.0,
    out: Path = Path("runs/digits-stream"),
    resume: bool = False,
) -> tuple[int, int, float]:
    """Train on ``batches`` batches from the feed (``resume``: on from the newest checkpoint
    in ``out``, if any); return the global step the run started from, the one it reached
    and the last validation accuracy."""
    torch.manual_seed(0)
    _, val_loader = digits_loaders()
    send, receive = anyio.create_memory_object_stream[Batch](8)
    accuracy = torchmetrics.classification.MulticlassAccuracy(10, average="micro")
    start = StartingStep()
    trainer = Trainer(
        make_model(),
        receive,  # an async iterator: read once, so num_epochs=1
        lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
        loss_fn=torch.nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[
            Validation(
                val_loader, every_n_epochs=None, every_n_steps=50,
                metrics={"accuracy": accuracy}, loss_fn=torch.nn.CrossEntropyLoss(),
            ),
            Checkpoint(
                out / "checkpoints", every_n_steps=50, keep_last=1, monitor="val/accuracy",
                mode="max", overwrite=not resume,  # (a new run: the last run's give way)
            ),
            Progress(),
            start,
        ],
        resume_from=resumable(out / "checkpoints") if resume else None,
    )  # fmt: skip
    with receive:  # (the stream is ours: the trainer leaves it open)
        async with anyio.create_task_group() as group, stop_on_signals(trainer):
            group.start_soon(feed, send, batches, every_ms)
            state = await trainer.fit()
            group.cancel_scope.cancel()  # (a stopped run: the feed has nobody to send to)
    return start.step, state.global_step, float(state.metrics.get("val/accuracy", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=positive_int, default=400)
    parser.add_argument("--every", type=float, default=2.0, help="milliseconds between batches")
    parser.add_argument("--out", type=Path, default=Path("runs/digits-stream"))
    parser.add_argument("--resume", action="store_true", help="go on from the last checkpoint")
    args: Any = parser.parse_args()
    if not args.every >= 0:
        parser.error(f"argument --every: must be a number of milliseconds >= 0, got {args.every}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot create {args.out}: {exc.strerror}")
    try:
        start, steps, accuracy = anyio.run(train, args.batches, args.every, args.out, args.resume)
    except* AsynchatError as refused:  # (its --out in use by another run, say)
        parser.exit(1, f"{parser.prog}: error: {refused.exceptions[0]}\n")
    if args.resume and start == steps and start > 0:
        parser.exit(1, f"{parser.prog}: the run in {args.out} had finished (its feed closed "
                       f"at step {steps}): nothing to resume; run without --resume for a new "
                       "one\n")  # fmt: skip
    print(f"trained to step {steps} on the feed; validation accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
