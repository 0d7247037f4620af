"""The event loop keeps running other tasks while a model trains."""

from __future__ import annotations

import time

import anyio
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asynchat import Callback, LoopState, Trainer

pytestmark = pytest.mark.anyio


def heavy_trainer(num_epochs: int, callbacks: list[Callback]) -> Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(2048, 256), torch.randint(0, 10, (2048,)))
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    return Trainer(
        model,
        DataLoader(data, batch_size=64),
        lambda m: torch.optim.Adam(m.parameters()),
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=num_epochs,
        callbacks=callbacks,
    )


async def test_a_ticker_is_not_starved_while_training() -> None:
    gaps: list[float] = []
    steps_seen: list[int] = []

    class Count(Callback):
        def on_step_end(self, state: LoopState) -> None:
            steps_seen.append(state.global_step)

    trainer = heavy_trainer(num_epochs=3, callbacks=[Count()])

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        started = time.perf_counter()
        await trainer.fit()
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()

    assert steps_seen[-1] == 96
    # A loop blocked by training would tick about once in `elapsed`. Bounds are loose for a
    # noisy 2-core machine: at least a tick per 20 ms on average, and no stall of 1 s.
    assert len(gaps) >= elapsed / 0.020, (len(gaps), elapsed)
    assert max(gaps) < 1.0


async def test_async_hooks_can_await_other_tasks_while_the_compute_thread_waits() -> None:
    """An async hook awaiting another task's result: the loop runs that task meanwhile."""
    send, receive = anyio.create_memory_object_stream[int](1)
    got: list[int] = []

    class Ask(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            got.append(await receive.receive())

    async def producer() -> None:
        for i in range(2):
            await anyio.sleep(0.01)
            await send.send(i)

    async with send, receive, anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await heavy_trainer(num_epochs=2, callbacks=[Ask()]).fit()
    assert got == [0, 1]
