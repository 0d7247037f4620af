"""A DCGAN on scikit-learn's handwritten digits, upscaled to 32x32: two networks, two
optimizers, one custom step.

    python examples/dcgan.py [--epochs 20] [--out runs/dcgan] [--resume]

The step follows the original DCGAN recipe (pytorch/examples' dcgan): per batch, one update
of the discriminator on real and generated images, then one update of the generator. It is
written on asynchat's step API (``BatchProcessor.autocast/backward/update``), so mixed
precision (bf16 on a GPU), ``on_before_update`` (clipping, per optimizer) and checkpoints of
both optimizers come from the engine. Every epoch a grid of 64 samples from a fixed noise is
written to ``<out>/samples/epoch-NNN.png``; ``LossMonitor`` publishes the mean ``d`` and
``g`` losses, which the progress lines show. Checkpoints go to ``<out>/checkpoints``;
``--resume`` continues from the newest, exactly where it stopped (stop it with Ctrl-C).
Without it a run starts over, and removes the last run's checkpoints first.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning, so the engine's
# compute thread keeps the cores (on 2 CPU cores a step costs up to 20% less; see
# benchmarks/RESULTS.md). A value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import struct
import zlib
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import (
    AsynchatError,
    BatchProcessor,
    Callback,
    LoopState,
    Phase,
    Predictor,
    RunPhase,
    Trainer,
)
from asynchat.callbacks import Checkpoint, GradClip, LossMonitor, Progress

LATENT = 32  # size of the generator's input noise
SIZE = 32  # image side


def digits_loader(batch_size: int = 64, seed: int = 0) -> DataLoader[Any]:
    """The 1797 digits (8x8, 0..16) as 1x32x32 images in [-1, 1], shuffled each epoch."""
    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(images), batch_size, shuffle=True, generator=generator)


class GAN(nn.Module):
    """DCGAN's two networks in one module, so one checkpoint holds both."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.generator = nn.Sequential(  # LATENT x 1 x 1 -> 1 x 32 x 32
            nn.ConvTranspose2d(LATENT, w * 4, 4, bias=False), nn.BatchNorm2d(w * 4), nn.ReLU(),
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 2), nn.ReLU(),
            nn.ConvTranspose2d(w * 2, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.ConvTranspose2d(w, 1, 4, 2, 1, bias=False), nn.Tanh(),
        )  # fmt: skip
        self.discriminator = nn.Sequential(  # 1 x 32 x 32 -> one logit
            nn.Conv2d(1, w, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
            nn.Conv2d(w, w * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(w * 2, w * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(w * 4, 1, 4, 1, 0, bias=False), nn.Flatten(0),
        )  # fmt: skip
        for module in self.modules():  # DCGAN's initialisation
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)


def optimizers() -> dict[str, Any]:
    """One Adam per network, built once the model is on its device."""

    def adam(part: str) -> Any:
        return lambda gan: torch.optim.Adam(
            getattr(gan, part).parameters(), lr=2e-4, betas=(0.5, 0.999)
        )

    return {"d": adam("discriminator"), "g": adam("generator")}


class GanStep(BatchProcessor):
    """One batch: update the discriminator, then the generator (two updates, one step).

    ``state.losses`` gets both losses, ``state.loss`` their sum, ``state.outputs`` the
    generated images. ``on_before_update`` runs before each update, with
    ``state.optimizer_name`` saying which.
    """

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        gan: Any = state.model
        (real,) = state.batch
        run_phase(Phase.ON_BATCH_BEGIN)
        noise = torch.randn(real.shape[0], LATENT, 1, 1, device=real.device)
        # The discriminator: real images are 1, generated ones 0. Its gradients from the
        # generator's last backward are cleared first (update() clears only its own).
        state.optimizers["d"].zero_grad(set_to_none=True)
        with self.autocast():
            fake = gan.generator(noise)
            real_logits = gan.discriminator(real)
            fake_logits = gan.discriminator(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(
                real_logits, torch.ones_like(real_logits)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        self.backward(state, loss_d)
        self.update(state, run_phase, "d")
        # The generator: make the (just updated) discriminator call its images real.
        with self.autocast():
            logits = gan.discriminator(fake)
            loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        self.backward(state, loss_g)
        self.update(state, run_phase, "g")
        state.outputs = fake.detach()
        state.losses = {"d": loss_d.detach(), "g": loss_g.detach()}
        state.loss = state.losses["d"] + state.losses["g"]
        run_phase(Phase.ON_BATCH_END)


class SampleGrid(Callback):
    """At each complete epoch's end, samples 64 images from a fixed noise (a Predictor run
    inline, in train mode as DCGAN samples) and writes them as an 8x8 PNG grid."""

    def __init__(self, directory: Path, seed: int = 1) -> None:
        self.directory = directory
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(64, LATENT, 1, 1, generator=generator)
        self.written: list[Path] = []

    def on_epoch_end(self, state: LoopState) -> None:
        if not state.epoch_complete or not state.loop.is_rank_zero:
            return
        gan: Any = state.loop.model
        sampler = Predictor(gan.generator, [self.noise], train_mode=True, prefetch=0)
        images = sampler.run_inline(state.loop).outputs.float().cpu()  # once an epoch
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"epoch-{state.epoch + 1:03d}.png"
        write_png(path, image_grid(images))
        self.written.append(path)


def image_grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> torch.Tensor:
    """``N x 1 x H x W`` images in [-1, 1] as one uint8 ``rows x columns`` grid."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    grid = torch.zeros(rows * (height + pad) + pad, columns * (width + pad) + pad)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top : top + height, left : left + width] = image[0]
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_png(path: Path, gray: torch.Tensor) -> None:
    """A grayscale 8-bit PNG, written with the standard library alone."""
    height, width = gray.shape
    rows = b"".join(b"\x00" + bytes(row.tolist()) for row in gray)  # filter 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def make_trainer(
    out: Path,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    resume: bool = False,
    extra: tuple[Callback, ...] = (),
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Trainer:
    torch.manual_seed(0)
    checkpoints = out / "checkpoints"
    on_gpu = (
        torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    )
    amp = "bf16" if on_gpu else None
    return Trainer(
        GAN(),
        digits_loader(),
        optimizers(),
        batch_processor=GanStep(amp=amp),
        device=device,
        num_epochs=epochs,
        num_steps=steps,
        resume_from=checkpoints if resume and checkpoints.is_dir() else None,
        callbacks=[
            *extra,
            GradClip(10.0, optimizer="d"),  # only the discriminator's updates are clipped
            LossMonitor(every_n_steps=10),
            SampleGrid(out / "samples"),
            Checkpoint(checkpoints, every_n_epochs=1, keep_last=2, overwrite=not resume),
            *((Progress(every_n_steps=100),) if progress else ()),
        ],
    )


async def train(
    epochs: int = 20, out: Path = Path("runs/dcgan"), resume: bool = False
) -> LoopState:
    return await make_trainer(out, epochs=epochs, resume=resume).fit()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/dcgan"))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"argument --epochs: must be a positive integer, got {args.epochs}")
    try:
        state = anyio.run(train, args.epochs, args.out, args.resume)
    except* AsynchatError as refused:  # (its --out in use by another run, say)
        parser.exit(1, f"{parser.prog}: error: {refused.exceptions[0]}\n")
    metrics = {k: round(v, 3) for k, v in state.metrics.items() if k.startswith("train/")}
    print(f"done at step {state.global_step}: {metrics}; samples in {args.out / 'samples'}")


if __name__ == "__main__":
    main()
