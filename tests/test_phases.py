"""Phase order and counts, hook threads, and hook order within a phase."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import Unsized, make_loader, make_model, make_trainer, sgd
from recorders import AsyncRecorder, Recorder, SyncRecorder, expected_phases
from torch import nn

from asynchat import (
    BatchProcessor,
    Callback,
    LoopState,
    MultiBatchProcessor,
    Phase,
    Predictor,
    RunPhase,
    Trainer,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("recorder_type", [SyncRecorder, AsyncRecorder], ids=["def", "async"])
async def test_epoch_bounded_phase_order_and_counts(recorder_type: type[Recorder]) -> None:
    recorder = recorder_type()
    trainer = make_trainer(recorder, num_epochs=3)
    state = await trainer.fit()
    assert recorder.phases() == expected_phases([6, 6, 6])
    assert state.global_step == 18
    assert state.epoch == 2
    step_ends = [e for e in recorder.events if e[0] == "on_step_end"]
    assert [(e[1], e[2], e[3]) for e in step_ends] == [
        (epoch, step, epoch * 6 + step + 1) for epoch in range(3) for step in range(6)
    ]


@pytest.mark.parametrize("recorder_type", [SyncRecorder, AsyncRecorder], ids=["def", "async"])
async def test_step_bounded_loop_ends_in_a_partial_epoch(recorder_type: type[Recorder]) -> None:
    recorder = recorder_type()
    trainer = make_trainer(recorder, num_steps=14)
    state = await trainer.fit()
    assert recorder.phases() == expected_phases([6, 6, 2])
    assert state.global_step == 14
    last_steps = [e for e in recorder.events if e[0] == "on_step_end"][-2:]
    assert [(e[1], e[2]) for e in last_steps] == [(2, 0), (2, 1)]


async def test_step_bound_inside_the_first_epoch() -> None:
    recorder = SyncRecorder()
    trainer = make_trainer(recorder, num_steps=3)
    await trainer.fit()
    assert recorder.phases() == expected_phases([3])


async def test_async_hooks_run_on_the_event_loop_and_def_hooks_on_the_compute_thread() -> None:
    loop_thread = threading.current_thread().name
    sync, async_ = SyncRecorder(), AsyncRecorder()
    trainer = Trainer(
        make_model(),
        make_loader(32, 16),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[sync, async_],
    )
    await trainer.fit()
    async_threads = {e[4] for e in async_.events}
    sync_threads = {e[4] for e in sync.events}
    assert async_threads == {loop_thread}
    assert len(sync_threads) == 1
    (compute,) = sync_threads
    assert compute != loop_thread and compute.startswith("asynchat-")


async def test_hooks_run_in_the_order_given_across_threads() -> None:
    order: list[str] = []

    class A(Callback):
        def on_step_end(self, state: LoopState) -> None:
            order.append("A")

    class B(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            order.append("B")

    class C(Callback):
        def on_step_end(self, state: LoopState) -> None:
            order.append("C")

    trainer = Trainer(
        make_model(),
        make_loader(32, 16),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[A(), B(), C(), B()],
    )
    await trainer.fit()
    assert order == ["A", "B", "C", "B"] * 2


async def test_state_phase_and_values_seen_by_hooks() -> None:
    seen: list[tuple[Phase | None, bool, bool]] = []

    class Look(Callback):
        async def on_batch_end(self, state: LoopState) -> None:
            loss = await state.loop.to_host(state.loss)
            scalar = loss is not None and loss.ndim == 0
            seen.append((state.phase, scalar, state.outputs is not None))

        def on_step_begin(self, state: LoopState) -> None:
            assert state.batch is not None and state.phase is Phase.ON_STEP_BEGIN

    trainer = Trainer(
        make_model(),
        make_loader(32, 16),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[Look()],
    )
    await trainer.fit()
    assert seen == [(Phase.ON_BATCH_END, True, True)] * 2


async def test_multi_batch_processor_runs_batch_phases_per_sub_batch() -> None:
    recorder = SyncRecorder()
    loader_a, loader_b = make_loader(48, 16, seed=1), make_loader(48, 16, seed=2)
    items = list(zip(loader_a, loader_b, strict=True))  # each step: (task-a batch, task-b batch)
    trainer = Trainer(
        make_model(),
        items,
        sgd,
        batch_processor=MultiBatchProcessor(nn.CrossEntropyLoss()),
        num_epochs=2,
        callbacks=[recorder],
    )
    await trainer.fit()
    assert recorder.phases() == expected_phases([3, 3], batches_per_step=2)


async def test_predictor_runs_one_epoch_of_phases() -> None:
    recorder = AsyncRecorder()
    predictor = Predictor(make_model(), make_loader(40, 16), callbacks=[recorder])
    state = await predictor.fit()
    assert recorder.phases() == expected_phases([3], training=False)
    assert state.global_step == 3


async def test_unknown_length_loader_gets_the_same_phases() -> None:
    """A data loader without len() (a generator-backed iterable) is read one item ahead."""
    last_flags: list[bool] = []

    class Last(Callback):
        def on_step_end(self, state: LoopState) -> None:
            last_flags.append(state.is_last_step)

    recorder = SyncRecorder()
    trainer = Trainer(
        make_model(),
        Unsized(make_loader(64, 16)),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_steps=6,
        callbacks=[recorder, Last()],
    )
    await trainer.fit()
    assert recorder.phases() == expected_phases([4, 2])
    assert last_flags == [False, False, False, True, False, True]


class Step(BatchProcessor):
    """A custom step that runs the batch phases and updates, or leaves either out."""

    def __init__(self, *, phases: bool = True, updates: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.phases, self.updates = phases, updates

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        inputs, targets = state.batch
        if self.phases:
            run_phase(Phase.ON_BATCH_BEGIN)
        state.outputs = state.model(inputs)
        state.loss = nn.functional.cross_entropy(state.outputs, targets)
        if state.training:
            self.backward(state, state.loss)
        if self.phases:
            run_phase(Phase.ON_BATCH_END)
        if self.updates and state.training:
            self.update(state, run_phase)


class Batches(Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_batch_end(self, state: LoopState) -> None:
        self.seen += 1


async def test_a_custom_step_that_breaks_its_contract_is_warned_of_once() -> None:
    # Before, both trained on without a word: the callbacks' batch hooks never ran (a
    # MetricUpdater published nothing), or the model never changed.
    def trainer(step: Step, *callbacks: Callback) -> Trainer:
        return Trainer(make_model(), make_loader(96, 16), sgd, batch_processor=step,
                       num_epochs=2, callbacks=list(callbacks))  # fmt: skip

    batches = Batches()
    with pytest.warns(RuntimeWarning, match=r"Step\.step ran no on_batch_end phase") as seen:
        await trainer(Step(phases=False), batches).fit()
    assert batches.seen == 0 and len(seen) == 1, "once, not at each of the 12 steps"
    model_before = make_model().state_dict()
    untrained = trainer(Step(updates=False), Batches())
    with pytest.warns(RuntimeWarning, match=r"Step\.step made no update .* at global step 0, "
                      "where one was due: the model does not train") as seen:  # fmt: skip
        await untrained.fit()
    assert len(seen) == 1
    assert all(v.equal(model_before[k]) for k, v in untrained.model.state_dict().items())
    # Kept: no warning, also with the update due only at an accumulation window's end, and
    # none for batch phases left out where no callback has batch hooks (nothing is lost).
    await trainer(Step(grad_accumulation_steps=2), Batches()).fit()
    await trainer(Step(phases=False)).fit()
    await Predictor(make_model(), make_loader(32, 16), batch_processor=Step(updates=False),
                    callbacks=[Batches()]).fit()  # fmt: skip
