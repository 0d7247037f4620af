"""The DCGAN example against a hand-written loop doing the same work (CPU or one GPU).

Both train ``examples/dcgan.py``'s GAN on the same digits, with the same two Adams, the same
noise and the discriminator's gradients clipped at 10: the hand-written loop as the original
DCGAN script would (``zero_grad``, ``backward``, ``step`` per network), the engine through
the example's ``GanStep`` and ``GradClip(optimizer="d")``. Runs of each are interleaved and
repeated; the table shows the median time per step and its ratio to the hand-written loop
measured in the same run, and whether the final weights are bitwise equal. A third row runs
the example as shipped (LossMonitor, a sample grid and a checkpoint per epoch, bf16 on a GPU):
its sampling runs the generator in train mode, which moves BatchNorm's running statistics,
so its weights are not expected to equal the loop's.

Run: python benchmarks/dcgan.py [--steps 87] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import torch
import torch.nn.functional as F
from _common import load_example, machine, median, table

from asynchat import Trainer
from asynchat.callbacks import GradClip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written(dcgan: ModuleType, steps: int, device: torch.device) -> tuple[float, Any]:
    torch.manual_seed(0)
    gan = dcgan.GAN().to(device)
    loader = dcgan.digits_loader()
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    done = 0
    start = time.perf_counter()
    while done < steps:
        for (real,) in loader:
            real = real.to(device, non_blocking=True)
            noise = torch.randn(real.shape[0], dcgan.LATENT, 1, 1, device=device)
            opt_d.zero_grad(set_to_none=True)
            fake = gan.generator(noise)
            real_logits = gan.discriminator(real)
            fake_logits = gan.discriminator(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(
                real_logits, torch.ones_like(real_logits)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            loss_d.backward()
            torch.nn.utils.clip_grad_norm_(list(gan.discriminator.parameters()), 10.0)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logits = gan.discriminator(fake)
            loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            loss_g.backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    sync(device)
    return (time.perf_counter() - start) / steps, gan.state_dict()


def engine(dcgan: ModuleType, steps: int, device: torch.device, *, full: bool) -> tuple[float, Any]:
    if full:  # the example as shipped, writing into a scratch directory
        with tempfile.TemporaryDirectory() as scratch:
            trainer = dcgan.make_trainer(Path(scratch), steps=steps, progress=False, device=device)
            start = time.perf_counter()
            state = anyio.run(trainer.fit)
            sync(device)
            return (time.perf_counter() - start) / steps, state.model.state_dict()
    torch.manual_seed(0)
    trainer = Trainer(
        dcgan.GAN(),
        dcgan.digits_loader(),
        dcgan.optimizers(),
        batch_processor=dcgan.GanStep(),
        num_steps=steps,
        device=device,
        callbacks=[GradClip(10.0, optimizer="d")],
    )
    start = time.perf_counter()
    state = anyio.run(trainer.fit)
    sync(device)
    return (time.perf_counter() - start) / steps, state.model.state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=87, help="steps per run (29 per epoch)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dcgan = load_example("dcgan.py")
    variants = {
        "hand-written loop": lambda: hand_written(dcgan, args.steps, device),
        "engine, GanStep + GradClip": lambda: engine(dcgan, args.steps, device, full=False),
        "engine, the example as shipped": lambda: engine(dcgan, args.steps, device, full=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    weights: dict[str, Any] = {}
    for run in variants.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in variants.items():
            seconds, weights[name] = run()
            times[name].append(seconds)
    base = median(times["hand-written loop"])
    rows = [
        (
            name,
            f"{median(values) * 1e3:.2f}",
            f"{min(values) * 1e3:.2f}",
            f"{median(values) / base:.3f}x",
            "yes" if same(weights[name], weights["hand-written loop"]) else "no",
        )
        for name, values in times.items()
    ]
    print(machine())
    print(f"\nDCGAN on digits 32x32, batch 64, {args.steps} steps, {args.rounds} rounds, {device}")
    print(table(["loop", "median ms/step", "min ms/step", "ratio", "bitwise equal"], rows))


if __name__ == "__main__":
    main()
