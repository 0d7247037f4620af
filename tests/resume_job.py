"""A training job for the resume tests, run as a subprocess.

    python resume_job.py straight OUT TOTAL K DIR SHUFFLE   # TOTAL steps in one go
    python resume_job.py first    OUT TOTAL K DIR SHUFFLE   # K steps, checkpoint, stop()
    python resume_job.py resume   OUT TOTAL K DIR SHUFFLE   # resume from DIR up to TOTAL
    python resume_job.py killable OUT TOTAL K DIR SHUFFLE   # a checkpoint every step, each
                                                            # step announced: made to be
                                                            # SIGKILLed at any moment

SHUFFLE is "global" (the DataLoader's order comes from torch's global RNG), "generator"
(from a generator of its own) or "augmented" ("global", and each sample gets noise from
torch's, Python's and NumPy's global RNGs as it is read, as a random augmentation in the
dataset does); "augmented-workers" and "augmented-persistent" read the augmented data in
two DataLoader workers (persistent ones in the latter). The model has dropout, so the RNG
state matters every step.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from conftest import StopAt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Callback, LoopState, Trainer
from asynchat.callbacks import Checkpoint


class CountSteps(Callback):
    """A callback with state: resumed, it must go on counting from where it was."""

    def __init__(self) -> None:
        self.steps = 0
        self.noise = 0.0

    def on_step_end(self, state: LoopState) -> None:
        self.steps += 1
        self.noise += random.random() + float(np.random.rand())  # python and numpy RNGs

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "noise": self.noise}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.noise = state_dict["steps"], state_dict["noise"]


class Augmented(TensorDataset):
    """Samples with noise from the three global RNGs, drawn as each is read."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(index)
        noise = torch.rand(x.shape) + random.random() + float(np.random.rand())
        return x + 0.1 * noise, y


class Announce(Callback):
    """Prints each step and slows the job down a little, for a killer to aim at."""

    def on_step_end(self, state: LoopState) -> None:
        print(f"step {state.global_step}", flush=True)
        time.sleep(0.01)


def job(mode: str, total: int, k: int, directory: Path, shuffle: str) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    g = torch.Generator().manual_seed(123)
    kind = Augmented if shuffle.startswith("augmented") else TensorDataset
    data = kind(torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    generator = torch.Generator().manual_seed(7) if shuffle == "generator" else None
    workers = 2 if shuffle in ("augmented-workers", "augmented-persistent") else 0
    loader = DataLoader(
        data, batch_size=16, shuffle=True, generator=generator, num_workers=workers,
        persistent_workers=shuffle == "augmented-persistent",
    )  # fmt: skip
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    counter = CountSteps()
    callbacks: list[Callback] = [counter]
    if mode == "first":
        callbacks += [
            Checkpoint(directory, every_n_steps=k, save_on_end=False),
            StopAt(k, "pause here"),
        ]
    if mode == "killable":
        callbacks += [Checkpoint(directory, every_n_steps=1, keep_last=2), Announce()]
    trainer = Trainer(
        model,
        loader,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        loss_fn=nn.CrossEntropyLoss(),
        num_steps=total,
        callbacks=callbacks,
        resume_from=directory if mode == "resume" else None,
    )
    state = anyio.run(trainer.fit)
    assert state.optimizer is not None
    return {
        "model": model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "global_step": state.global_step,
        "counter": counter.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


if __name__ == "__main__":
    mode, out, total, k, directory, shuffle = sys.argv[1:]
    for each in mode.split("+"):
        result = job(each, int(total), int(k), Path(directory), shuffle)
        torch.save(result, f"{out}.{each}")
