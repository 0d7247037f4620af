"""The engine's own cost per step, and the event loop's lateness while it trains (CPU).

(a) A tiny model (``nn.Linear(32, 32)``, batch 32, Adam, one torch thread) trained by a
    hand-written loop and by the engine with no hook, a ``def`` hook and an ``async def`` hook
    at ``on_step_end`` (every step, and ``@every(steps=10)``); once from a list of ready
    batches (the engine's own cost) and once from a ``DataLoader`` (what users run); and
    from an async generator over the ready batches (read on the event loop: one round trip
    to it a batch), against a hand-written ``async for`` loop training on the event loop
    (which blocks it: the engine does not). Short
    runs of every variant are interleaved and repeated, so a noisy machine slows all of them
    alike; the table shows the median time per step and its ratio to the hand-written loop
    over the same data, measured in the same run.
(b) A coroutine sleeping 1 ms in a loop while the engine trains (from ready batches, with an
    ``async def`` hook, from an async generator), on asyncio and uvloop: how late each
    wake-up is (p50/p99/max) against the same coroutine on an idle loop.

Run: python benchmarks/step_overhead.py [--steps 500] [--rounds 15] [--seconds 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import torch
from _common import machine, median, percentile, table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Callback, LoopState, Trainer, every

UVLOOP = {"use_uvloop": True}


class DefHook(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_step_end(self, state: LoopState) -> None:
        self.calls += 1


class AsyncHook(Callback):
    def __init__(self) -> None:
        self.calls = 0

    async def on_step_end(self, state: LoopState) -> None:
        self.calls += 1


class AsyncHookEvery10(Callback):
    def __init__(self) -> None:
        self.calls = 0

    @every(steps=10)
    async def on_step_end(self, state: LoopState) -> None:
        self.calls += 1


HOOKS: dict[str, Callable[[], list[Callback]]] = {
    "no hook": list,
    "def hook": lambda: [DefHook()],
    "async hook": lambda: [AsyncHook()],
    "async hook @every(steps=10)": lambda: [AsyncHookEvery10()],
}


def ready_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)) for _ in range(steps)
    ]


def data_loader(steps: int) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32 * steps, 32, generator=g), torch.randn(32 * steps, 32, generator=g)
    )
    return DataLoader(data, batch_size=32, shuffle=True, generator=g)


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def hand_written(data: Iterable[Any], steps: int) -> float:
    model, optimizer = model_and_optimizer()
    loss_fn = nn.MSELoss()
    start = time.perf_counter()
    for inputs, targets in data:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


class AsyncBatches:
    """``batches`` as an async iterable: an async generator each ``aiter()``."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    async def _items(self) -> AsyncIterator[Any]:
        for batch in self.batches:
            yield batch

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()


def hand_written_async(data: AsyncBatches, steps: int) -> float:
    model, optimizer = model_and_optimizer()
    loss_fn = nn.MSELoss()

    async def run() -> float:
        start = time.perf_counter()
        async for inputs, targets in data:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return anyio.run(run, backend="asyncio", backend_options=UVLOOP) / steps


def engine(data: Any, steps: int, callbacks: list[Callback], prefetch: int = 2) -> float:
    model, optimizer = model_and_optimizer()
    trainer = Trainer(
        model,
        data,
        optimizer,
        loss_fn=nn.MSELoss(),
        num_epochs=1,
        callbacks=callbacks,
        prefetch=prefetch,
        device="cpu",
    )
    start = time.perf_counter()
    state = anyio.run(trainer.fit, backend="asyncio", backend_options=UVLOOP)
    elapsed = time.perf_counter() - start
    assert state.global_step == steps
    return elapsed / steps


def cost_per_step(steps: int, rounds: int) -> str:
    sources = {"ready batches": ready_batches(steps), "DataLoader": data_loader(steps)}
    variants: dict[tuple[str, str], Callable[[], float]] = {}
    for source, data in sources.items():
        variants[(source, "hand-written loop")] = lambda data=data: hand_written(data, steps)
        for label, hooks in HOOKS.items():
            variants[(source, f"engine, {label}")] = lambda data=data, hooks=hooks: engine(
                data, steps, hooks()
            )
        variants[(source, "engine, no hook, prefetch=0")] = lambda data=data: engine(
            data, steps, [], prefetch=0
        )
    source = AsyncBatches(ready_batches(steps))
    variants[("async generator", "hand-written loop")] = lambda: hand_written_async(source, steps)
    variants[("async generator", "engine, no hook")] = lambda: engine(source, steps, [])
    for run in variants.values():  # warm-up: allocator, autograd, thread machinery
        run()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    for _ in range(rounds):
        for key, run in variants.items():
            times[key].append(run())
    rows = []
    for (source, label), values in times.items():
        base = median(times[(source, "hand-written loop")])
        rows.append(
            (
                source,
                label,
                f"{median(values) * 1e6:.1f}",
                f"{min(values) * 1e6:.1f}",
                f"{median(values) / base:.3f}x",
            )
        )
    return table(["data", "loop", "median us/step", "min us/step", "ratio (medians)"], rows)


async def _lateness(seconds: float, train: Callable[[], Any] | None) -> list[float]:
    late: list[float] = []
    stop = anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await anyio.sleep(0.001)
            late.append(time.perf_counter() - before - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        if train is None:
            await anyio.sleep(seconds)
        else:
            await train()
        stop.set()
    return late


def lateness(seconds: float) -> str:
    steps = 20_000

    def trainer(hooks: list[Callback], data: Any = None) -> Callable[[], Any]:
        model, optimizer = model_and_optimizer()
        data = ready_batches(200) if data is None else data
        t = Trainer(model, data, optimizer, loss_fn=nn.MSELoss(), num_steps=steps, callbacks=hooks)

        async def run() -> None:
            with anyio.move_on_after(seconds):
                await t.fit()

        return run

    rows = []
    for backend, options in (("asyncio", {}), ("uvloop", UVLOOP)):
        cases = {
            "idle loop": None,
            "training, no hook": trainer([]),
            "training, async hook per step": trainer([AsyncHook()]),
            "training, async generator data": trainer([], AsyncBatches(ready_batches(200))),
        }
        for label, train in cases.items():
            late = anyio.run(_lateness, seconds, train, backend="asyncio", backend_options=options)
            rows.append(
                (
                    backend,
                    label,
                    len(late),
                    f"{percentile(late, 50) * 1e3:.3f}",
                    f"{percentile(late, 99) * 1e3:.3f}",
                    f"{max(late) * 1e3:.3f}",
                )
            )
    return table(
        ["backend", "while", "wake-ups", "p50 ms late", "p99 ms late", "max ms late"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=500, help="steps per run")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved runs per variant")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each lateness run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print(
        f"\n(a) cost per step: nn.Linear(32, 32), batch 32, Adam, 1 torch thread, uvloop; "
        f"{args.rounds} interleaved runs of {args.steps} steps per variant"
    )
    print(cost_per_step(args.steps, args.rounds))
    print("\n(b) event-loop lateness of `await anyio.sleep(0.001)` in a loop, same model")
    print(lateness(args.seconds))


if __name__ == "__main__":
    main()
