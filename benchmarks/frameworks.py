"""Per-step cost of asynchat against a hand-written loop, PyTorch Ignite and Lightning (CPU).

The same MLP (256-512-10, Adam, batch 64, one torch thread) trains on the same in-memory
``DataLoader`` in each framework, with logging, checkpointing and progress bars off. Each
framework runs N1 and N2 steps and the cost per step is (t(N2) - t(N1)) / (N2 - N1), which
cancels start-up costs (Lightning's are large). Rounds are interleaved; medians are shown.

Needs the ``bench`` extra (lightning, pytorch-ignite).
Run: python benchmarks/frameworks.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import torch
from _common import machine, median, table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Trainer

N1, N2 = 100, 400


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(
        torch.randn(64 * N2, 256, generator=g), torch.randint(0, 10, (64 * N2,), generator=g)
    )
    return DataLoader(dataset, batch_size=64, shuffle=True, generator=g)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))


def hand_written(steps: int) -> float:
    net, loader = model(), data()
    optimizer = torch.optim.Adam(net.parameters())
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def asynchat(steps: int, prefetch: int) -> float:
    trainer = Trainer(
        model(),
        data(),
        lambda m: torch.optim.Adam(m.parameters()),
        loss_fn=nn.CrossEntropyLoss(),
        num_steps=steps,
        prefetch=prefetch,
    )
    start = time.perf_counter()
    anyio.run(trainer.fit, backend_options={"use_uvloop": True})
    return time.perf_counter() - start


def ignite(steps: int) -> float:
    from ignite.engine import create_supervised_trainer

    net = model()
    engine = create_supervised_trainer(
        net, torch.optim.Adam(net.parameters()), nn.CrossEntropyLoss()
    )
    start = time.perf_counter()
    engine.run(data(), max_epochs=1, epoch_length=steps)
    return time.perf_counter() - start


def lightning(steps: int) -> float:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model()
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return self.loss_fn(self.net(x), y)  # type: ignore[no-any-return]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters())

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(Module(), data())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.ERROR)
    frameworks: dict[str, Callable[[int], float]] = {
        "hand-written loop": hand_written,
        "asynchat (prefetch=2)": lambda n: asynchat(n, 2),
        "asynchat (prefetch=0)": lambda n: asynchat(n, 0),
        "PyTorch Ignite": ignite,
        "Lightning": lightning,
    }
    for run in frameworks.values():
        run(N1)  # warm-up
    per_step: dict[str, list[float]] = {name: [] for name in frameworks}
    for _ in range(args.rounds):
        for name, run in frameworks.items():
            per_step[name].append((run(N2) - run(N1)) / (N2 - N1))
    base = median(per_step["hand-written loop"])
    rows = [
        (name, f"{median(v) * 1e6:.0f}", f"{median(v) / base:.3f}x") for name, v in per_step.items()
    ]
    print(f"machine: {machine()}")
    print(
        f"MLP 256-512-10, Adam, batch 64, DataLoader, 1 torch thread; (t({N2}) - t({N1})) / "
        f"{N2 - N1} steps, {args.rounds} interleaved rounds, medians"
    )
    print(table(["framework", "us/step", "vs hand-written"], rows))


if __name__ == "__main__":
    main()
