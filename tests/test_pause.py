"""pause() and resume(): the loop holds at a step boundary with its compute thread idle."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import anyio
import pytest
from conftest import make_trainer
from recorders import SyncRecorder

from asynchat import Callback, LoopState, LoopStatus
from asynchat import _hold as hold
from asynchat.callbacks import StatsMonitor

pytestmark = pytest.mark.anyio


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll: the status changes on the compute thread, where no anyio.Event can be set."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


class PauseAt(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at:
            state.loop.pause()


async def test_pause_holds_at_a_step_boundary_and_resume_goes_on() -> None:
    recorder = SyncRecorder()
    trainer = make_trainer(PauseAt(3), recorder, num_epochs=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.fit)
        await eventually(lambda: trainer.status is LoopStatus.PAUSED)
        held = len(recorder.events)
        await anyio.sleep(0.2)  # the event loop runs freely; the loop does no step
        assert trainer.state.global_step == 3
        assert len(recorder.events) == held, "no hook runs while paused"
        assert recorder.phases()[-1] == "on_step_end"
        trainer.resume()
        await eventually(lambda: trainer.status is not LoopStatus.PAUSED)
    assert trainer.status is LoopStatus.FINISHED
    assert trainer.state.global_step == 12


async def test_stop_and_cancel_end_a_paused_loop() -> None:
    stopped = make_trainer(PauseAt(2), num_epochs=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stopped.fit)
        await eventually(lambda: stopped.status is LoopStatus.PAUSED)
        stopped.stop("while paused")
    assert stopped.status is LoopStatus.FINISHED
    assert stopped.state.global_step == 2 and stopped.state.stop_reason == "while paused"

    recorder = SyncRecorder()
    cancelled = make_trainer(PauseAt(2), recorder, num_epochs=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled.fit)
        await eventually(lambda: cancelled.status is LoopStatus.PAUSED)
        tg.cancel_scope.cancel()
    assert cancelled.status is LoopStatus.CANCELLED
    assert cancelled.state.global_step == 2
    assert recorder.phases()[-1] == "on_loop_end"


async def test_pause_before_fit_holds_before_the_first_step() -> None:
    trainer = make_trainer(num_epochs=1)
    trainer.pause()
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.fit)
        await eventually(lambda: trainer.status is LoopStatus.PAUSED)
        assert trainer.state.global_step == 0
        trainer.resume()
    assert trainer.state.global_step == 6


@pytest.fixture
def holding_on_sigtstp() -> Iterator[None]:
    """A launched rank's SIGTSTP and SIGCONT handlers (``asynchat._hold``), put back after."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTSTP, signal.SIGCONT)}
    hold.hold_on_sigtstp()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.usefixtures("holding_on_sigtstp")
async def test_a_sigtstp_holds_a_ranks_running_loops_until_sigcont() -> None:
    """What a launched rank does when its launcher passes a Ctrl-Z on (``_launch``): before,
    the ranks trained on while their launcher was stopped. Its loops hold at a step
    boundary, and one started meanwhile starts held; SIGCONT lets them go, but not one its
    owner paused."""

    class Slow(Callback):
        def on_step_end(self, state: LoopState) -> None:
            time.sleep(0.005)

    running, owned, later = (
        make_trainer(Slow(), num_epochs=50),
        make_trainer(PauseAt(2)),
        make_trainer(),
    )
    assert signal.getsignal(signal.SIGTSTP) is not signal.SIG_DFL, "never stop the test run"
    async with anyio.create_task_group() as tg:
        tg.start_soon(running.fit)
        tg.start_soon(owned.fit)
        await eventually(
            lambda: owned.status is LoopStatus.PAUSED and running.state.global_step > 0
        )
        os.kill(os.getpid(), signal.SIGTSTP)
        await eventually(lambda: running.status is LoopStatus.PAUSED)
        tg.start_soon(later.fit)
        await eventually(lambda: later.status is LoopStatus.PAUSED)
        held_at = running.state.global_step
        await anyio.sleep(0.2)
        assert running.state.global_step == held_at and later.state.global_step == 0
        os.kill(os.getpid(), signal.SIGCONT)
        await eventually(lambda: later.status is LoopStatus.FINISHED)
        assert running.state.global_step > held_at
        assert owned.status is LoopStatus.PAUSED and owned.state.global_step == 2
        running.stop("enough")
        owned.resume()
    assert later.state.global_step == 18 and owned.state.global_step == 18


async def test_time_held_is_left_out_of_the_rates_and_the_step_times() -> None:
    """Regression: the snapshot's steps/s averaged over the run's wall time, hold included (a
    job paused for an hour after ten minutes reported a seventh of its speed for the rest
    of its run), StatsMonitor's interval reported a hold as step time, and after the run
    ended its rates went on decaying towards zero."""
    step_times: list[float] = []

    class Slow(Callback):
        def on_step_end(self, state: LoopState) -> None:
            time.sleep(0.002)

    class Read(Callback):  # listed after StatsMonitor, which publishes every 4 steps
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step % 4 == 0:
                step_times.append(float(state.metrics["stats/step_time"]))

    trainer = make_trainer(Slow(), PauseAt(2), StatsMonitor(every_n_steps=4), Read(), num_epochs=2)
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.fit)
        await eventually(lambda: trainer.status is LoopStatus.PAUSED)
        await anyio.sleep(1.0)
        assert trainer.snapshot().paused_s >= 1.0 and trainer.snapshot().steps_per_s > 0
        trainer.resume()
    wall = time.perf_counter() - started
    ended = trainer.snapshot()
    assert ended.global_step == 12 and ended.paused_s >= 1.0
    # The run's own clock lies within the wall clock measured around it: less the hold,
    # its rate is at least the steps over the wall time less the hold.
    assert ended.steps_per_s >= 12 / (wall - ended.paused_s)
    assert len(step_times) == 3 and max(step_times) < 0.1, step_times  # (a hold: 1 s / 4 steps)
    await anyio.sleep(0.2)
    assert trainer.snapshot().steps_per_s == ended.steps_per_s, "a finished run's rate stays"
