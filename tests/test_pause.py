"""pause() and resume(): the loop holds at a step boundary with its compute thread idle."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from conftest import make_trainer
from recorders import SyncRecorder

from asynchat import Callback, LoopState, LoopStatus

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
