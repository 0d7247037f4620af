"""Throughput on a CUDA device: the engine against a naive and a tuned hand-written loop.

Three workloads with data starting on the CPU (an MLP on 1024 features at batch 256, and
ResNet-18 on 3x32x32 images at batch 256 in fp32 and in bf16 autocast), each trained by:

- naive loop: pageable ``.to(device)`` per batch and ``loss.item()`` every step (a host sync);
- tuned loop: pinned DataLoader, the next batch copied on a side stream while the current one
  computes, no per-step sync;
- the engine with no hook, and with an ``async def`` hook that brings the loss to the host
  every step with ``await state.loop.to_host(...)``.

Prints ms/step, samples/s, and each variant's time relative to the tuned loop, measured in one
run. Run: python benchmarks/gpu.py [--steps 300] [--rounds 3]   (needs a CUDA device;
``--device cpu --steps 3 --rounds 1`` smoke-tests the code paths on a CPU)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import torch
from _common import device_arguments, machine, median, table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import BasicBatchProcessor, Callback, LoopState, Trainer

DEVICE = torch.device("cuda")


class LogLoss(Callback):
    def __init__(self) -> None:
        self.last = 0.0

    async def on_step_end(self, state: LoopState) -> None:
        self.last = float(await state.loop.to_host(state.loss))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10)
    )


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18() -> nn.Module:
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool), as for CIFAR-10."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    width = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
        width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


# name: (model, input shape, batch, autocast dtype)
WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str | None]] = {
    "MLP 1024-4096-4096-10, batch 256": (mlp, (1024,), 256, None),
    "ResNet-18 3x32x32, batch 256, fp32": (resnet18, (3, 32, 32), 256, None),
    "ResNet-18 3x32x32, batch 256, bf16": (resnet18, (3, 32, 32), 256, "bf16"),
}


def autocast(amp: str | None) -> Any:
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def dataset(shape: tuple[int, ...], batch: int, steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(batch * steps, *shape, generator=g),
        torch.randint(0, 10, (batch * steps,), generator=g),
    )


def setup(make: Callable[[], nn.Module]) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make().to(DEVICE)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def naive(make: Callable[[], nn.Module], data: TensorDataset, batch: int, amp: str | None) -> float:
    model, optimizer = setup(make)
    loss_fn = nn.CrossEntropyLoss()
    synchronize()
    start = time.perf_counter()
    for inputs, targets in DataLoader(data, batch_size=batch):
        inputs, targets = inputs.to(DEVICE), targets.to(DEVICE)
        with autocast(amp):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # host sync every step, as most hand-written loops log
    synchronize()
    return time.perf_counter() - start


def tuned(make: Callable[[], nn.Module], data: TensorDataset, batch: int, amp: str | None) -> float:
    if DEVICE.type != "cuda":  # no streams to overlap on the CPU: the naive loop, minus .item()
        return naive(make, data, batch, amp)
    model, optimizer = setup(make)
    loss_fn = nn.CrossEntropyLoss()
    copy_stream = torch.cuda.Stream()

    def stage(item: Any) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(copy_stream):
            x, y = (t.to(DEVICE, non_blocking=True) for t in item)
            ready = torch.cuda.Event()
            ready.record()
        return x, y, ready

    torch.cuda.synchronize()
    start = time.perf_counter()
    batches = iter(DataLoader(data, batch_size=batch, pin_memory=True))
    following = stage(next(batches))
    while following is not None:
        inputs, targets, ready = following
        torch.cuda.current_stream().wait_event(ready)
        inputs.record_stream(torch.cuda.current_stream())
        targets.record_stream(torch.cuda.current_stream())
        item = next(batches, None)
        following = stage(item) if item is not None else None
        with autocast(amp):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def engine(
    make: Callable[[], nn.Module], data: TensorDataset, batch: int, amp: str | None, log: bool
) -> float:
    model, optimizer = setup(make)
    trainer = Trainer(
        model,
        DataLoader(data, batch_size=batch),
        optimizer,
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), amp=amp),  # type: ignore[arg-type]
        num_epochs=1,
        device=DEVICE,
        callbacks=[LogLoss()] if log else [],
    )
    synchronize()
    start = time.perf_counter()
    anyio.run(trainer.fit, backend="asyncio", backend_options={"use_uvloop": True})
    synchronize()
    return time.perf_counter() - start


def measure(
    make: Callable[[], nn.Module],
    shape: tuple[int, ...],
    batch: int,
    amp: str | None,
    steps: int,
    rounds: int,
) -> dict[str, float]:
    """Median seconds per variant for one workload."""
    data = dataset(shape, batch, steps)
    variants: dict[str, Callable[[], float]] = {
        "naive loop (.to + .item per step)": lambda: naive(make, data, batch, amp),
        TUNED: lambda: tuned(make, data, batch, amp),
        "engine, no hook": lambda: engine(make, data, batch, amp, log=False),
        "engine, async to_host(loss) every step": lambda: engine(make, data, batch, amp, log=True),
    }
    for run in variants.values():
        run()  # warm-up: cudnn autotuning, allocator, CUDA context
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(rounds):
        for key, run in variants.items():
            times[key].append(run())
    return {key: median(values) for key, values in times.items()}


TUNED = "tuned loop (pinned, copy stream, no sync)"


def main() -> None:
    parser = device_arguments(__doc__)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"machine: {machine()}")
    print(f"{args.rounds} interleaved rounds of {args.steps} steps; medians", flush=True)
    for name, (make, shape, batch, amp) in WORKLOADS.items():
        seconds = measure(make, shape, batch, amp, args.steps, args.rounds)
        rows = [
            (key, f"{1000 * value / args.steps:.3f}", f"{batch * args.steps / value:,.0f}",
             f"{value / seconds[TUNED]:.3f}x")
            for key, value in seconds.items()
        ]  # fmt: skip
        # A table per workload, printed as it is done: a run cut short still shows these.
        print(f"\n{name}")
        print(table(["loop", "ms/step", "samples/s", "time vs tuned"], rows), flush=True)


if __name__ == "__main__":
    main()
