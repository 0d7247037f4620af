"""Many jobs in one event loop: each with its own compute thread, failures isolated."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
from conftest import make_loader, make_model, make_trainer
from torch import nn

from asynchat import Callback, LoopState, LoopStatus, Predictor

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


class FailAt(Callback):
    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == 5:
            raise Boom(state.loop.name)


class Threads(Callback):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def on_step_end(self, state: LoopState) -> None:
        self.names.add(threading.current_thread().name)


async def test_jobs_run_concurrently_with_one_failing_and_one_cancelled() -> None:
    threads = [Threads() for _ in range(3)]
    healthy = [make_trainer(threads[i], num_epochs=3, name=f"healthy-{i}") for i in range(2)]
    predictor = Predictor(make_model(), make_loader(96, 8), callbacks=[threads[2]], name="predict")
    failing = make_trainer(FailAt(), num_epochs=3, name="failing")
    doomed = make_trainer(num_epochs=10_000, name="doomed")
    results: dict[str, Any] = {}
    ticks = 0
    others_done, doomed_done = anyio.Event(), anyio.Event()
    pending = 4
    doomed_scope = anyio.CancelScope()

    async def run(loop: Any) -> None:
        nonlocal pending
        try:
            results[loop.name] = await loop.fit()
        except Boom as exc:
            results[loop.name] = exc
        finally:
            pending -= 1
            if pending == 0:
                others_done.set()

    async def run_doomed() -> None:
        with doomed_scope:
            await doomed.fit()
        doomed_done.set()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(run_doomed)
        started = time.perf_counter()
        for loop in (*healthy, predictor, failing):
            tg.start_soon(run, loop)
        await others_done.wait()
        elapsed = time.perf_counter() - started
        doomed_scope.cancel()
        await doomed_done.wait()
        tg.cancel_scope.cancel()

    assert [results[t.name].global_step for t in healthy] == [18, 18]
    assert results["predict"].global_step == 12
    assert isinstance(results["failing"], Boom) and str(results["failing"]) == "failing"
    assert failing.status is LoopStatus.FAILED
    assert doomed.status is LoopStatus.CANCELLED and "doomed" not in results
    assert all(len(t.names) == 1 for t in threads), "each job keeps one compute thread"
    assert len(set.union(*(t.names for t in threads))) == 3, "and no two share one"
    assert ticks >= elapsed / 0.05, "the event loop stayed responsive throughout"


async def test_two_trainers_train_the_same_way_concurrently_as_alone() -> None:
    alone = make_trainer(num_epochs=2)
    await alone.fit()
    pair = [make_trainer(num_epochs=2), make_trainer(num_epochs=2)]
    async with anyio.create_task_group() as tg:
        for trainer in pair:
            tg.start_soon(trainer.fit)
    for trainer in pair:
        for a, b in zip(alone.model.parameters(), trainer.model.parameters(), strict=True):
            assert (a == b).all()
    assert isinstance(pair[0].model, nn.Module)
