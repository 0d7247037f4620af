"""The engine's own cost per step, and the event loop's lateness while it trains (CPU).

(a) A tiny model (``nn.Linear(32, 32)``, batch 32, one torch thread) trained by a hand-written
    loop and by the engine with no hook, a ``def`` hook and an ``async def`` hook at
    ``on_step_end``. Runs are interleaved and repeated; the table shows the median time per
    step and its ratio to the hand-written loop measured in the same run.
(b) A coroutine sleeping 1 ms in a loop while the engine trains: how late each wake-up is
    (p50/p99), against the same coroutine on an idle loop.

Run: python benchmarks/step_overhead.py [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import torch
from _common import machine, median, percentile, table
from torch import nn

from asynchat import Callback, LoopState, Trainer


class SyncHook(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_step_end(self, state: LoopState) -> None:
        self.calls += 1


class AsyncHook(Callback):
    def __init__(self) -> None:
        self.calls = 0

    async def on_step_end(self, state: LoopState) -> None:
        self.calls += 1


def make_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)) for _ in range(steps)]


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def hand_written(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model, optimizer = make_model()
    loss_fn = nn.MSELoss()
    start = time.perf_counter()
    for inputs, targets in batches:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


async def engine(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    callbacks: list[Callback],
    prefetch: int,
) -> float:
    model, optimizer = make_model()
    trainer = Trainer(
        model,
        batches,
        optimizer,
        loss_fn=nn.MSELoss(),
        num_epochs=1,
        callbacks=callbacks,
        prefetch=prefetch,
        device="cpu",
    )
    start = time.perf_counter()
    await trainer.fit()
    return (time.perf_counter() - start) / len(batches)


async def lateness(train: Callable[[], Coroutine[Any, Any, object]] | None, seconds: float) -> list[float]:
    late: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and not (train is not None and done.is_set()):
            before = time.perf_counter()
            await anyio.sleep(0.001)
            late.append(time.perf_counter() - before - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        if train is not None:
            await train()
            done.set()
    return late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = make_batches(args.steps)
    for _ in range(2):  # warm up allocator, autograd and the thread machinery
        hand_written(batches[:200])
        anyio.run(engine, batches[:200], [AsyncHook()], 2, backend_options={"use_uvloop": True})

    configs: dict[str, Callable[[], float]] = {
        "hand-written loop": lambda: hand_written(batches),
    }
    for prefetch in (2, 0):
        for label, make in (("no hook", list), ("def hook", lambda: [SyncHook()]),
                            ("async hook", lambda: [AsyncHook()])):
            configs[f"engine, {label}, prefetch={prefetch}"] = (
                lambda make=make, prefetch=prefetch: anyio.run(
                    engine, batches, make(), prefetch, backend_options={"use_uvloop": True}
                )
            )
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, run in configs.items():
            times[name].append(run())
    base = median(times["hand-written loop"])
    rows = [
        (name, f"{median(ts) * 1e6:.1f}", f"{median(ts) / base:.3f}x")
        for name, ts in times.items()
    ]
    print(f"machine: {machine()}")
    print(f"(a) cost per step, nn.Linear(32, 32), batch 32, Adam, 1 torch thread, "
          f"{args.steps} steps x {args.repeats} interleaved repeats (median), uvloop")
    print(table(["loop", "us/step", "vs hand-written"], rows))

    train_steps = make_batches(args.steps * 3)

    async def train() -> None:
        await engine(train_steps, [AsyncHook()], 2)

    async def train_sync() -> None:
        await engine(train_steps, [], 2)

    rows = []
    for backend, options in (("asyncio", {}), ("uvloop", {"use_uvloop": True})):
        idle = anyio.run(lateness, None, 2.0, backend="asyncio", backend_options=options)
        busy = anyio.run(lateness, train_sync, 30.0, backend="asyncio", backend_options=options)
        busy_async = anyio.run(lateness, train, 30.0, backend="asyncio", backend_options=options)
        for label, late in (("idle", idle), ("training, no hook", busy),
                            ("training, async hook per step", busy_async)):
            rows.append((backend, label, len(late), f"{percentile(late, 50) * 1e3:.3f}",
                         f"{percentile(late, 99) * 1e3:.3f}", f"{max(late) * 1e3:.3f}"))
    print()
    print("(b) event-loop lateness of `await anyio.sleep(0.001)` in a loop (ms late)")
    print(table(["backend", "while", "wake-ups", "p50 ms", "p99 ms", "max ms"], rows))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
