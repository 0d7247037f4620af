"""loop.events() and loop.snapshot(): progress for services, never slowing the loop down."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import pytest
from conftest import make_loader, make_trainer

from asynchat import Callback, EventKind, LoopEvent, LoopState, LoopStatus

pytestmark = pytest.mark.anyio


class Metric(Callback):
    def on_epoch_end(self, state: LoopState) -> None:
        state.metrics["val/score"] = float(state.epoch)


async def collect(events: object) -> list[LoopEvent]:
    return [event async for event in events]  # type: ignore[attr-defined]


async def test_a_subscriber_sees_status_epochs_and_the_end() -> None:
    trainer = make_trainer(Metric(), num_epochs=2)
    events: list[LoopEvent] = []

    subscription = trainer.events(progress_every=None)  # subscribed from here on

    async def subscribe() -> None:
        events.extend(await collect(subscription))

    async with anyio.create_task_group() as tg:
        tg.start_soon(subscribe)
        await trainer.fit()
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.STATUS, EventKind.EPOCH_BEGIN, EventKind.EPOCH_END,
        EventKind.EPOCH_BEGIN, EventKind.EPOCH_END, EventKind.STATUS, EventKind.END,
    ]  # fmt: skip
    assert events[0].snapshot.status is LoopStatus.RUNNING
    assert events[2].snapshot.metrics == {"val/score": 0.0}
    assert events[-2].snapshot.status is LoopStatus.STOPPING  # on_loop_end is running
    end = events[-1].snapshot
    assert end.status is LoopStatus.FINISHED and end.global_step == 12
    assert end.steps_per_s > 0 and end.samples_per_s == pytest.approx(16 * end.steps_per_s)


async def test_a_slow_subscriber_drops_events_and_never_slows_the_loop() -> None:
    trainer = make_trainer(num_epochs=40, loader=make_loader(16, 16))  # 40 one-step epochs
    events: list[LoopEvent] = []
    finished_first = False

    subscription = trainer.events(buffer=3, progress_every=None)

    async def slow() -> None:
        nonlocal finished_first
        async for event in subscription:
            events.append(event)
            if event.kind is not EventKind.END:
                await anyio.sleep(0.05)
            finished_first = finished_first or trainer.status.done

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await trainer.fit()
    assert finished_first, "the loop ended while the subscriber was still reading"
    assert sum(e.dropped for e in events) > 0, "the oldest events were dropped"
    assert len(events) + sum(e.dropped for e in events) == 1 + 2 * 40 + 2  # running..end
    assert events[-1].kind is EventKind.END


async def test_several_subscribers_and_progress_events() -> None:
    class Slow(Callback):
        def on_step_end(self, state: LoopState) -> None:
            time.sleep(0.05)

    trainer = make_trainer(Slow(), num_epochs=1)
    results: list[list[LoopEvent]] = [[], []]

    subscriptions = [trainer.events(progress_every=0.02) for _ in range(2)]

    async def subscribe(i: int) -> None:
        async with subscriptions[i] as events:
            results[i] = await collect(events)

    async with anyio.create_task_group() as tg:
        tg.start_soon(subscribe, 0)
        tg.start_soon(subscribe, 1)
        await trainer.fit()
    for events in results:
        assert events[-1].kind is EventKind.END
        progress = [e for e in events if e.kind is EventKind.PROGRESS]
        assert len(progress) >= 3
        steps = [e.snapshot.global_step for e in progress]
        assert steps == sorted(steps) and steps[-1] > 0


async def test_subscribing_after_the_end_yields_the_end_at_once() -> None:
    trainer = make_trainer(num_steps=2)
    await trainer.fit()
    (event,) = await collect(trainer.events())
    assert event.kind is EventKind.END and event.snapshot.global_step == 2
    snapshot = trainer.snapshot()
    assert snapshot.status is LoopStatus.FINISHED and snapshot.name == trainer.name


@pytest.mark.anyio
async def test_a_debug_trace_shows_phases_status_hops_and_decisions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Hop(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            state.loop.stop("enough")

    trainer = make_trainer(Hop(), num_epochs=3)
    with caplog.at_level(logging.DEBUG, logger="asynchat"):
        await trainer.fit()
    mine = f"{trainer.name}: "
    lines = [
        r.getMessage()[len(mine) :]
        for r in caplog.records
        if r.name == "asynchat.loop" and r.getMessage().startswith(mine)
    ]
    assert "status running" in lines and lines[-1] == "status finished"
    assert any(line.startswith("on_step_end epoch=0 step=5 global_step=6") for line in lines)
    assert any("hop to the event loop" in line and "Hop.on_epoch_end" in line for line in lines)
    assert "decision at global_step=6: STOP" in lines
    # One logger for every loop: none is left in logging's registry per loop.
    assert not [name for name in logging.Logger.manager.loggerDict if trainer.name in name]


@pytest.mark.anyio
async def test_no_trace_is_recorded_unless_asked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="asynchat"):
        await make_trainer(num_epochs=1).fit()
    assert not [r for r in caplog.records if r.name.startswith("asynchat.")]


async def test_a_subscriber_that_leaves_early_unsubscribes() -> None:
    """``async for event in loop.events(): ... break`` without closing the stream: the
    subscription ends with the stream, not with the loop (a long job watched by many
    short-lived clients kept a mailbox for each, and put every event into each)."""
    entered, begin, end = anyio.Event(), anyio.Event(), anyio.Event()

    class Held(Callback):
        async def on_epoch_begin(self, state: LoopState) -> None:
            entered.set()
            await begin.wait()

        async def on_epoch_end(self, state: LoopState) -> None:
            await end.wait()

    trainer = make_trainer(Held(), num_epochs=1)
    hub = trainer._events

    async def watch_briefly(ready: anyio.Event) -> None:
        events = trainer.events(progress_every=None)
        ready.set()
        async for _ in events:
            break  # the first event (epoch_begin), then away, the stream left open

    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.fit)
        await entered.wait()
        async with anyio.create_task_group() as watchers:
            for _ in range(50):
                ready = anyio.Event()
                watchers.start_soon(watch_briefly, ready)
                await ready.wait()
            assert len(hub._subscribers) == 50
            begin.set()
        kept = len(hub._subscribers)
        end.set()
    assert kept == 0, f"{kept} subscriptions outlived their streams"


async def test_a_stream_collected_while_its_thread_publishes_does_not_deadlock_it() -> None:
    """A stream left open is unsubscribed by its finalizer, which the garbage collector runs
    at any allocation of whichever thread allocates: inside ``publish`` (the compute
    thread, at an epoch's end), holding the hub's lock, that finalizer waited for the lock
    forever. Here the stream is let go in that very place, on a thread of its own."""
    hub = make_trainer()._events
    streams = [hub.subscribe(buffer=8, progress_every=None) for _ in range(2)]
    finished = threading.Event()

    def collected_inside_the_lock() -> None:
        with hub._lock:  # (where publish holds it)
            streams.pop()  # the last reference: its finalizer runs now, on this thread
        finished.set()

    thread = threading.Thread(target=collected_inside_the_lock, daemon=True)
    thread.start()
    assert finished.wait(10), "the finalizer deadlocked the thread that held the lock"
    assert len(hub._subscribers) == 2  # marked, not yet removed: the lock was held
    streams.append(hub.subscribe(buffer=8, progress_every=None))  # (a change lets it go)
    assert hub._subscribers == [stream._mailbox for stream in streams]
