"""Many jobs in one event loop: each with its own compute thread, failures isolated, and any
mix of pause, resume, stop and cancellation from the loop's tasks ending every job once.

``chaos`` is also the trial of ``benchmarks/control_chaos.py``, which draws many seeds."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import anyio
import pytest
from conftest import AsyncBatches, engine_threads, make_loader, make_model, make_trainer
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


class Ends(Callback):
    """Counts how often its loop began and ended; its ``async`` step hook naps (0-2 ms), so
    that requests also meet a compute thread waiting for the event loop."""

    def __init__(self, rng: random.Random, nap: bool) -> None:
        self.rng, self.nap = rng, nap
        self.begins = self.ends = 0

    def on_loop_begin(self, state: LoopState) -> None:
        self.begins += 1

    def on_loop_end(self, state: LoopState) -> None:
        self.ends += 1

    async def on_step_begin(self, state: LoopState) -> None:
        if self.nap:
            await anyio.sleep(self.rng.random() * 0.002)


async def chaos(seed: int, *, seconds: float = 1.0, gap: float = 0.05) -> dict[str, int]:
    """Six trainers (each a long run: 50 epochs) in this event loop, and for ``seconds`` a
    random ``pause()``, ``resume()``, ``stop()`` or cancellation of a random one every
    0-``gap`` seconds; then every one still running is resumed and stopped. Every loop must
    have begun and ended once and end finished or cancelled, with no engine thread left at
    work. Returns how many ended each way."""
    rng = random.Random(seed)
    ends = [Ends(rng, nap=i % 2 == 1) for i in range(6)]
    # Two of them read async data, on the event loop (one waits 1 ms for each batch).
    loaders = [None] * 4 + [AsyncBatches(list(make_loader(96, 16)), nap=n) for n in (0, 0.001)]
    trainers = [
        make_trainer(ends[i], loader=loaders[i], num_epochs=50, prefetch=i % 3, name=f"chaos-{i}")
        for i in range(6)
    ]
    scopes = [anyio.CancelScope() for _ in trainers]

    async def run(i: int) -> None:
        with scopes[i]:
            await trainers[i].fit()

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(run, i)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await anyio.sleep(rng.random() * gap)
            i = rng.randrange(6)
            action = rng.choice(["pause", "resume", "pause", "resume", "stop", "cancel"])
            if action == "cancel":
                scopes[i].cancel()
            else:
                getattr(trainers[i], action)(*(["chaos"] if action == "stop" else []))
        for trainer in trainers:
            trainer.resume()
            trainer.stop("the trial's end")
    for trainer, end in zip(trainers, ends, strict=True):
        assert (end.begins, end.ends) == (1, 1), (seed, trainer.name, trainer.status)
        assert trainer.status in (LoopStatus.FINISHED, LoopStatus.CANCELLED), (seed, trainer.name)
    assert engine_threads() == [], seed
    return {
        status.value: sum(t.status is status for t in trainers)
        for status in (LoopStatus.FINISHED, LoopStatus.CANCELLED)
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_pauses_stops_and_cancellations_end_every_job_once(seed: int) -> None:
    # The short version of benchmarks/control_chaos.py (0-20 ms between the requests).
    ended = await chaos(seed, seconds=0.5, gap=0.02)
    assert sum(ended.values()) == 6
