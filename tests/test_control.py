"""stop(), cancellation and errors: what runs on each way out, and that nothing is left behind.

The autouse fixture in conftest.py checks after every test that no engine thread is alive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
from conftest import StuckUntilReported, make_loader, make_model, make_trainer, sgd
from recorders import AsyncRecorder, SyncRecorder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import asynchat._compute
from asynchat import Callback, LoopState, LoopStatus, Phase, Trainer
from asynchat.callbacks import Validation

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


class SlowLoader:
    """Yields `fast` batches at once, then takes `delay` seconds for each further batch."""

    def __init__(self, fast: int, delay: float) -> None:
        self.fast, self.delay = fast, delay

    def __len__(self) -> int:  # a known length: the engine does not read ahead for is_last_step
        return 10

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(make_loader(160, 16)):
            if i >= self.fast:
                time.sleep(self.delay)
            yield batch


# -- stop() ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hook_kind", ["def", "async"])
async def test_stop_from_a_hook_ends_after_that_step(hook_kind: str) -> None:
    class StopAt(Callback):
        def stop_if_due(self, state: LoopState) -> None:
            if state.global_step == 8:
                state.loop.stop("reached 8")

    if hook_kind == "def":
        StopAt.on_step_end = StopAt.stop_if_due  # type: ignore[method-assign,assignment]
    else:

        async def on_step_end(self: StopAt, state: LoopState) -> None:
            self.stop_if_due(state)

        StopAt.on_step_end = on_step_end  # type: ignore[method-assign,assignment]

    recorder = SyncRecorder()
    trainer = make_trainer(StopAt(), recorder)
    state = await trainer.fit()
    assert trainer.status is LoopStatus.FINISHED
    assert state.stop_reason == "reached 8"
    assert state.global_step == 8
    phases = recorder.phases()
    assert phases.count("on_step_end") == 8
    assert phases.count("on_epoch_end") == 2, "the epoch cut short by stop() still ends"
    assert phases[-2:] == ["on_epoch_end", "on_loop_end"]


async def test_stop_from_another_task() -> None:
    reached = anyio.Event()

    class Signal(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                reached.set()
                await anyio.sleep(0.01)

    recorder = SyncRecorder()
    trainer = make_trainer(Signal(), recorder, num_epochs=1000)

    async def stopper() -> None:
        await reached.wait()
        assert trainer.status is LoopStatus.RUNNING
        trainer.stop("from a task")
        assert trainer.status is LoopStatus.STOPPING

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopper)
        state = await trainer.fit()
    assert state.stop_reason == "from a task"
    assert state.global_step == 3
    assert recorder.count("on_loop_end") == 1


async def test_stop_before_fit_runs_no_step() -> None:
    recorder = AsyncRecorder()
    trainer = make_trainer(recorder)
    trainer.stop()
    state = await trainer.fit()
    assert recorder.phases() == ["on_loop_begin", "on_loop_end"]
    assert state.global_step == 0 and state.stop_reason == "stop() called"


async def test_stop_in_on_epoch_begin_runs_no_step_of_that_epoch() -> None:
    class StopSecondEpoch(Callback):
        def on_epoch_begin(self, state: LoopState) -> None:
            if state.epoch == 1:
                state.loop.stop()

    recorder = SyncRecorder()
    state = await make_trainer(StopSecondEpoch(), recorder).fit()
    assert state.global_step == 6
    assert recorder.phases()[-3:] == ["on_epoch_begin", "on_epoch_end", "on_loop_end"]


async def test_stop_while_waiting_for_data_waits_only_for_the_batch_being_read() -> None:
    first_steps = anyio.Event()

    class Signal(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 2:
                first_steps.set()

    trainer = make_trainer(Signal(), loader=SlowLoader(fast=2, delay=3.0), num_epochs=1)

    async def stopper() -> float:
        await first_steps.wait()
        trainer.stop()
        return time.monotonic()

    started = 0.0
    async with anyio.create_task_group() as tg:

        async def run_stopper() -> None:
            nonlocal started
            started = await stopper()

        tg.start_soon(run_stopper)
        state = await trainer.fit()
    # The loop ends at once; joining the data thread waits only for the batch being read.
    assert state.global_step == 2
    assert time.monotonic() - started < 3.0 + 2.0


async def test_fit_twice_is_an_error() -> None:
    trainer = make_trainer(num_steps=1, num_epochs=None)
    await trainer.fit()
    with pytest.raises(RuntimeError, match=r"already run \(status finished\); a loop runs once"):
        await trainer.fit()


async def test_a_second_fit_while_the_first_runs_is_told_to_await_it() -> None:
    started, release = anyio.Event(), anyio.Event()

    class Held(Callback):
        async def on_loop_begin(self, state: LoopState) -> None:
            started.set()
            await release.wait()

    trainer = make_trainer(Held())
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.fit)
        await started.wait()
        with pytest.raises(RuntimeError, match=r"is running now \(status running\); await"):
            await trainer.fit()
        release.set()
    assert trainer.snapshot().status is LoopStatus.FINISHED  # the first ran to its end


async def test_data_that_yields_no_batch_is_named() -> None:
    # An empty dataset trained on nothing and reported success; a Validation over one said
    # its batch processor set no loss.
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.warns(RuntimeWarning, match=r"trainer-\d+: data_loader yielded no batch in "
                      r"epoch 0: nothing was trained on \(is its dataset empty"):  # fmt: skip
        state = await make_trainer(loader=empty).fit()
    assert (state.global_step, state.epoch) == (0, 2)  # each epoch ran, and said it once
    validation = Validation(empty, loss_fn=nn.CrossEntropyLoss())
    with (
        pytest.warns(RuntimeWarning, match="validation: data_loader yielded no batch"),
        pytest.raises(ValueError, match=r"Validation's data_loader yielded no batch, so there "
                      "is nothing to publish"),
    ):  # fmt: skip
        await make_trainer(validation).fit()


# -- cancellation ---------------------------------------------------------------------------


class CancelAfter(Callback):
    """Cancels the given scope from an async on_step_end once `global_step` reaches `at`."""

    def __init__(self, scope: anyio.CancelScope, at: int) -> None:
        self.scope, self.at = scope, at

    async def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at:
            self.scope.cancel()
            # The cancellation is delivered at the next await, where it interrupts this hook;
            # the loop then ends before another step. (Returning without an await would let
            # the compute thread start the next step first.)
            await anyio.lowlevel.checkpoint()


async def test_cancellation_runs_on_loop_end_and_reraises() -> None:
    recorder = SyncRecorder()
    loop_end_statuses: list[LoopStatus] = []

    class SeeStatus(Callback):
        async def on_loop_end(self, state: LoopState) -> None:
            await anyio.sleep(0.01)  # shielded: this await must not be cancelled
            loop_end_statuses.append(state.loop.status)

    with anyio.CancelScope() as scope:
        trainer = make_trainer(recorder, CancelAfter(scope, 4), SeeStatus(), num_epochs=100)
        await trainer.fit()
        pytest.fail("fit() returned although it was cancelled")  # pragma: no cover
    assert scope.cancelled_caught
    assert trainer.status is LoopStatus.CANCELLED
    assert trainer.state.stop_reason == "cancelled"
    assert trainer.state.global_step == 4
    phases = recorder.phases()
    assert phases.count("on_step_end") == 4
    assert phases.count("on_epoch_end") == 0, "a cancelled loop skips on_epoch_end"
    assert phases[-1] == "on_loop_end"
    assert loop_end_statuses == [LoopStatus.STOPPING]


async def test_move_on_after_cancels_a_running_loop() -> None:
    recorder = SyncRecorder()

    class Slow(Callback):
        def on_step_end(self, state: LoopState) -> None:
            time.sleep(0.01)

    trainer = make_trainer(Slow(), recorder, num_epochs=10_000)
    with anyio.move_on_after(0.3) as scope:
        await trainer.fit()
    assert scope.cancelled_caught
    assert trainer.status is LoopStatus.CANCELLED
    phases = recorder.phases()
    assert phases[-1] == "on_loop_end"
    # Every step that began also finished: the processor and the def hooks ran to its end.
    assert phases.count("on_step_begin") == phases.count("on_step_end") > 0


async def cancel_when(event: threading.Event, scope: anyio.CancelScope) -> None:
    await anyio.to_thread.run_sync(event.wait)
    scope.cancel()


async def test_a_cancelled_job_that_runs_on_is_reported_with_where_its_thread_is(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation waits for the step in progress; one that never ends (a hook stuck on
    a lock, a collective that hangs) used to leave fit() waiting without a word."""
    monkeypatch.setattr(asynchat._compute, "SLOW_END_S", 0.3)
    hold = StuckUntilReported()

    class Stuck(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 2:
                hold.block()

    trainer = make_trainer(Stuck(), num_epochs=10, name="stuck")
    with hold.releasing(), caplog.at_level("WARNING", logger="asynchat.loop"):
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:
                group.start_soon(cancel_when, hold.stuck, scope)
                await trainer.fit()
        assert scope.cancelled_caught and trainer.state.global_step == 2
        assert len(caplog.records) == 1, caplog.text
        report = caplog.records[0].getMessage()
        assert report.startswith("asynchat-stuck: cancelled 0.3 s ago, the job still runs")
        assert "in on_step_end\n    hold.block()\n" in report  # (then its wait)

        # A cancellation that ends in time says nothing (its report is called off).
        trainer = make_trainer(num_epochs=10_000)
        with anyio.move_on_after(0.2):
            await trainer.fit()
        await anyio.sleep(0.6)
        assert len(caplog.records) == 1, caplog.text


async def test_cancelling_a_running_async_hook_completes_the_step_and_skips_the_rest() -> None:
    hook_cancelled = threading.Event()
    skipped_hook_ran: list[int] = []
    def_hook_ran: list[int] = []

    class Hang(Callback):
        async def on_batch_end(self, state: LoopState) -> None:
            if state.global_step == 2:
                try:
                    await anyio.sleep_forever()
                finally:
                    hook_cancelled.set()

        def on_step_end(self, state: LoopState) -> None:
            def_hook_ran.append(state.global_step)

    class Later(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            skipped_hook_ran.append(state.global_step)

    trainer = make_trainer(Hang(), Later(), num_epochs=10)
    with anyio.move_on_after(0.5) as scope:
        await trainer.fit()
    assert scope.cancelled_caught and hook_cancelled.is_set()
    assert trainer.state.global_step == 3, "the step whose hook was cancelled still completed"
    assert def_hook_ran == [1, 2, 3]
    assert skipped_hook_ran == [1, 2], "async hooks are skipped once cancellation is requested"


async def test_cancellation_while_waiting_for_data_waits_only_for_the_batch_being_read() -> None:
    trainer = make_trainer(loader=SlowLoader(fast=2, delay=2.0), num_epochs=1)
    started = time.monotonic()
    with anyio.move_on_after(0.5) as scope:
        await trainer.fit()
    assert scope.cancelled_caught
    assert trainer.state.global_step == 2
    assert time.monotonic() - started < 0.5 + 2.0 + 1.0


async def test_an_error_in_on_loop_end_during_cancellation_propagates() -> None:
    class FailAtEnd(Callback):
        def on_loop_end(self, state: LoopState) -> None:
            raise Boom("cleanup failed")

    with anyio.CancelScope() as scope:
        trainer = make_trainer(CancelAfter(scope, 2), FailAtEnd(), num_epochs=100)
        with pytest.raises(Boom, match="cleanup failed"):
            await trainer.fit()
    assert trainer.status is LoopStatus.FAILED


@pytest.mark.parametrize(
    "anyio_backend", [("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)
async def test_native_asyncio_cancellation_with_wait_for() -> None:
    recorder = SyncRecorder()
    trainer = make_trainer(recorder, num_epochs=100_000)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(trainer.fit(), timeout=0.3)
    assert trainer.status is LoopStatus.CANCELLED
    assert recorder.phases()[-1] == "on_loop_end"


# -- errors ---------------------------------------------------------------------------------


def failing_callback(phase: Phase, kind: str, error: BaseException) -> Callback:
    def fail(self: Callback, state: LoopState) -> None:
        if state.global_step >= 2 or phase in (
            Phase.ON_LOOP_BEGIN,
            Phase.ON_LOOP_END,
            Phase.ON_EPOCH_BEGIN,
            Phase.ON_EPOCH_END,
        ):
            raise error

    if kind == "def":
        hook: Any = fail
    else:

        async def hook(self: Callback, state: LoopState) -> None:
            await anyio.lowlevel.checkpoint()
            fail(self, state)

    return type(f"Fail_{phase.value}", (Callback,), {phase.value: hook})()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["def", "async"])
@pytest.mark.parametrize("phase", list(Phase), ids=[p.value for p in Phase])
async def test_an_error_in_any_hook_propagates_as_itself_after_on_loop_end(
    phase: Phase, kind: str
) -> None:
    error = Boom(f"{kind} {phase}")
    recorder = SyncRecorder()
    seen_exception: list[BaseException | None] = []

    class SeeError(Callback):
        def on_loop_end(self, state: LoopState) -> None:
            seen_exception.append(state.exception)

    trainer = make_trainer(recorder, SeeError(), failing_callback(phase, kind, error))
    with pytest.raises(Boom) as info:
        await trainer.fit()
    assert info.value is error
    assert trainer.status is LoopStatus.FAILED
    assert recorder.count("on_loop_end") == 1
    if phase is not Phase.ON_LOOP_END:
        assert seen_exception == [error]
        assert recorder.count("on_epoch_end") == (1 if phase is Phase.ON_EPOCH_END else 0)


async def test_an_error_in_the_model_propagates_as_itself() -> None:
    error = Boom("forward failed")

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                raise error
            return self.linear(x)  # type: ignore[no-any-return]

    recorder = AsyncRecorder()
    trainer = Trainer(
        Broken(),
        make_loader(),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[recorder],
    )
    with pytest.raises(Boom) as info:
        await trainer.fit()
    assert info.value is error
    phases = recorder.phases()
    assert phases[-2:] == ["on_batch_begin", "on_loop_end"]
    assert phases.count("on_step_end") == 2


@pytest.mark.parametrize("prefetch", [0, 2])
async def test_an_error_in_the_data_loader_propagates_as_itself(prefetch: int) -> None:
    error = Boom("bad record")

    class BadData:
        def __iter__(self) -> Iterator[Any]:
            for i, batch in enumerate(make_loader()):
                if i == 4:
                    raise error
                yield batch

    recorder = SyncRecorder()
    trainer = make_trainer(recorder, loader=BadData(), prefetch=prefetch)
    with pytest.raises(Boom) as info:
        await trainer.fit()
    assert info.value is error
    assert recorder.count("on_step_end") == 4, "the batches before the error were all trained on"
    assert recorder.phases()[-1] == "on_loop_end"


async def test_an_error_in_on_loop_end_after_an_error_is_chained() -> None:
    first, second = Boom("first"), Boom("second")

    class Both(Callback):
        def on_step_end(self, state: LoopState) -> None:
            raise first

        def on_loop_end(self, state: LoopState) -> None:
            raise second

    with pytest.raises(Boom) as info:
        await make_trainer(Both()).fit()
    assert info.value is second
    assert info.value.__context__ is first


async def test_an_optimizer_factory_error_runs_no_hook() -> None:
    recorder = SyncRecorder()

    def factory(model: nn.Module) -> torch.optim.Optimizer:
        raise Boom("no optimizer")

    trainer = Trainer(
        make_model(),
        make_loader(),
        factory,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[recorder],
    )
    with pytest.raises(Boom, match="no optimizer"):
        await trainer.fit()
    assert recorder.events == []


async def test_errors_in_one_loop_do_not_affect_another() -> None:
    failing = make_trainer(failing_callback(Phase.ON_STEP_END, "async", Boom("one")))
    healthy = make_trainer(num_epochs=2)
    results: dict[str, Any] = {}

    async def run(name: str, trainer: Trainer) -> None:
        try:
            results[name] = await trainer.fit()
        except Boom as exc:
            results[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "failing", failing)
        tg.start_soon(run, "healthy", healthy)
    assert isinstance(results["failing"], Boom)
    assert results["healthy"].global_step == 12


def test_a_boundary_is_skipped_only_while_a_loop_alone_is_asked_nothing() -> None:
    """The step loop skips the boundary's decision while ``idle``: every request, from any
    thread, must clear it, and only resume() of a loop asked nothing else may set it again."""
    from asynchat._control import LoopControl

    control = LoopControl(lambda status: None)
    assert control.idle
    control.pause()
    assert not control.idle
    control.resume()
    assert control.idle

    def toggle(first: Any, second: Any) -> None:
        for _ in range(3000):
            first()
            second()

    racers = [
        threading.Thread(target=toggle, args=(control.pause, control.resume)),
        threading.Thread(target=toggle, args=(control.resume, control.pause)),
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    paused = not control._unpaused.is_set()
    assert control.idle is not paused, "idle must say what the last pause or resume left"

    control.resume()
    control.agree = lambda flags: flags
    assert not control.idle
    control.agree = None
    control.parent = LoopControl(lambda status: None)
    assert not control.idle
    control.parent = None
    assert control.idle
    control.request_stop("asked")
    control.resume()
    assert not control.idle
    cancelled = LoopControl(lambda status: None)
    cancelled.request_cancel()
    cancelled.resume()
    assert not cancelled.idle


def test_a_cancellation_during_a_resume_is_never_taken_for_idle() -> None:
    """Regression: request_cancel cleared ``idle`` without the lock, so a resume() that had
    read the flags before the cancellation wrote ``idle = True`` after it, and the step loop
    skipped every boundary of a cancelled loop."""
    from asynchat._control import LoopControl

    control = LoopControl(lambda status: None)
    control.pause()

    class CancelWhileRefreshing(threading.Event):
        """The resume's check of the pause, with the cancellation let in right there."""

        def is_set(self) -> bool:
            canceller = threading.Thread(target=control.request_cancel)
            canceller.start()
            canceller.join(timeout=0.3)  # with the lock taken by resume(), it waits for it
            return super().is_set()

    unpaused = CancelWhileRefreshing()
    control._unpaused = unpaused
    control.resume()
    control._unpaused = threading.Event()  # (the canceller sets this one, as resume did)
    control._unpaused.set()
    deadline = time.monotonic() + 10
    while not control.cancel_requested:
        assert time.monotonic() < deadline, "the cancellation never happened"
        time.sleep(0.01)
    assert not control.idle, "a cancelled loop must decide at its next boundary"
