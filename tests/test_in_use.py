"""One model, several loops: which may run on it at once, and the train/eval modes they leave.

Two Trainers over one model at once crashed the process (a segmentation fault in the
optimizer's step, 3 runs of 3); two Predictors over one model left the second in train()
mode when the first ended; a Validation between steps put layers frozen in eval() back in
train() mode. Refusals are checked against a trainer paused before its first step, which
holds its model while doing nothing, so the old code fails these tests without crashing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import asynchat._in_use
from asynchat import (
    BasicBatchProcessor,
    Callback,
    InUseError,
    LoopBase,
    LoopState,
    LoopStatus,
    Predictor,
    Trainer,
)
from asynchat._in_use import claim
from asynchat.callbacks import FreezeModule, LossMonitor, LRSchedule, MetricUpdater, Validation

pytestmark = pytest.mark.anyio


class Net(nn.Module):
    def __init__(self, backbone: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = backbone or nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # type: ignore[no-any-return]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g) + 3, torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


def trainer(model: nn.Module, *callbacks: Callback, steps: int = 6, **kwargs: Any) -> Trainer:
    return Trainer(
        model, batches(steps), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), num_epochs=1, callbacks=list(callbacks), **kwargs,
    )  # fmt: skip


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


class Modes(Callback):
    """Records the modes of ``model``'s modules at every batch (on the compute thread)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: list[dict[str, bool]] = []

    def on_batch_begin(self, state: LoopState) -> None:
        self.seen.append(modes(self.model))


@asynccontextmanager
async def paused(loop: LoopBase) -> AsyncIterator[None]:
    """``loop`` running and held before its first step (it holds its model); then run out."""
    loop.pause()
    events = loop.events(progress_every=None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop.fit)
        with anyio.fail_after(10):
            async for event in events:
                if event.snapshot.status is LoopStatus.PAUSED:
                    break
        yield
        loop.resume()


async def test_a_second_trainer_on_a_model_in_training_is_refused_and_can_run_later() -> None:
    model = Net()
    first, second = trainer(model, name="first"), trainer(model, name="second")
    async with paused(first):
        with pytest.raises(InUseError, match="second cannot run: first is training its model"):
            await second.fit()
        assert second.status is LoopStatus.CREATED, "a refused loop has not started"
    assert first.state.global_step == 6
    assert (await second.fit()).global_step == 6, "it runs once the first is done"


async def test_models_sharing_a_submodule_or_a_weight_do_not_train_at_once() -> None:
    model = Net()
    sharing = Net(backbone=model.backbone)
    tied = nn.Linear(8, 3)
    tied.weight = model.head[1].weight
    async with paused(trainer(model, name="first")):
        with pytest.raises(InUseError, match="is training its model's submodule 'backbone'"):
            await trainer(sharing).fit()
        with pytest.raises(InUseError, match="is training its model's parameter 'weight'"):
            await Predictor(tied, [torch.randn(4, 8)]).fit()
        # A model of its own trains meanwhile.
        assert (await trainer(Net()).fit()).global_step == 6


async def test_a_compiled_model_is_named_as_the_model_it_compiles() -> None:
    # Its names are torch.compile's: the refusal said "its model's submodule ''" (the
    # wrapper's _orig_mod) of the very model in training.
    model = Net()
    compiled = torch.compile(model, backend="eager")
    async with paused(trainer(model, name="first")):
        with pytest.raises(InUseError, match="cannot run: first is training its model "):
            await trainer(compiled).fit()
        sharing = torch.compile(Net(backbone=model.backbone), backend="eager")
        with pytest.raises(InUseError, match="is training its model's submodule 'backbone'"):
            await trainer(sharing).fit()


async def test_a_predictor_waits_for_a_trainer_unless_it_runs_from_the_trainers_hook() -> None:
    model = Net()
    model.train()
    model.backbone.eval()  # frozen by the user: stays in eval() mode while training
    inside: list[dict[str, bool]] = []

    class Tally(Callback):  # one instance in both loops, counting the batches of both
        shared_across_loops = True
        batches = 0

        def on_batch_end(self, state: LoopState) -> None:
            self.batches += 1

    tally = Tally()

    class PredictAtEpochEnd(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            recorder = Modes(model)
            await Predictor(model, [torch.randn(4, 8)], callbacks=[recorder, tally]).fit()
            inside.extend(recorder.seen)

    during = Modes(model)
    training = trainer(model, PredictAtEpochEnd(), during, tally, name="training")
    async with paused(training):
        with pytest.raises(InUseError, match="cannot run: training is training its model"):
            await Predictor(model, [torch.randn(4, 8)]).fit()
    evaluating = {name: False for name in modes(model)}
    assert inside == [evaluating], "the predictor in the trainer's hook ran, in eval() mode"
    assert tally.batches == 6 + 1
    frozen = {"": True, "backbone": False, "backbone.0": False, "backbone.1": False,
              "head": True, "head.0": True, "head.1": True}  # fmt: skip
    assert during.seen == [frozen] * 6
    assert modes(model) == frozen


async def test_a_loop_started_from_a_hook_in_a_group_the_hook_waits_for_runs_inside() -> None:
    model = Net()
    ran: list[int] = []

    class TrainsAgainInAGroup(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            async with anyio.create_task_group() as tasks:  # the hook waits for them
                tasks.start_soon(lambda: trainer(model, name="inner").fit())
            ran.append(1)

    await trainer(model, TrainsAgainInAGroup(), name="outer").fit()
    assert ran == [1]


async def test_a_loop_awaited_in_a_hook_of_a_validation_runs_inside_its_trainer_too() -> None:
    # The Validation's predictor runs inline in the trainer's step, so the trainer waits
    # for its hooks as for its own; a predictor awaited there was refused ("trainer-0 is
    # training its model ... run this one from its hooks"), which is where it ran.
    model = Net()
    ran: list[dict[str, bool]] = []

    class PredictsAgain(Callback):
        async def on_loop_end(self, state: LoopState) -> None:
            recorder = Modes(model)
            await Predictor(model, [torch.randn(4, 8)], callbacks=[recorder]).fit()
            ran.extend(recorder.seen)

    validation = Validation([(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))],
                            loss_fn=nn.CrossEntropyLoss(), callbacks=[PredictsAgain()])  # fmt: skip
    await trainer(model, validation, name="training").fit()
    assert ran == [{name: False for name in modes(model)}], "it ran, in eval() mode"


async def test_a_loop_started_by_a_task_a_hook_left_running_runs_beside_no_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A task that a hook started in a group that outlives it inherits the hook's context,
    # which let a loop started there run inside the hook's loop: a second trainer of the
    # model trained beside the first, from another compute thread (two trainers of one
    # model in two threads crash the process: see the README).
    model = Net()
    finished: list[str] = []
    failed: list[InUseError] = []
    stepping: list[str] = []  # which trainer stepped, in order

    class Slow(Callback):  # 30 steps: 0.6 s or more
        def __init__(self, name: str) -> None:
            self.name = name

        def on_step_end(self, state: LoopState) -> None:
            stepping.append(self.name)
            time.sleep(0.02)

    async def second(wait: float) -> None:
        await anyio.sleep(wait)
        other = trainer(model, Slow("second"), steps=30, name="second")
        try:
            await other.fit()
        except InUseError as refused:
            finished.append(f"refused: {refused}")
        else:
            finished.append("second")

    async def run(wait: float, hold: float) -> Trainer:
        class Starts(Callback):
            async def on_step_end(self, state: LoopState) -> None:
                if state.global_step == 2:
                    outer.start_soon(second, wait)
                    await anyio.sleep(hold)

        first = trainer(model, Starts(), Slow("first"), steps=30, name="first")
        async with anyio.create_task_group() as outer:
            with anyio.fail_after(60):
                try:
                    await first.fit()
                except InUseError as error:
                    failed.append(error)
        return first

    # Started once the hook has returned: the model is the first trainer's.
    first = await run(wait=0.3, hold=0.0)
    assert first.state.global_step == 30 and not failed
    assert len(finished) == 1 and finished[0].startswith("refused: second cannot run: first is")
    # Started while the hook runs, still running when it returns: the hook waits for it
    # (the first trainer's steps never interleave with the second's) ...
    finished.clear()
    stepping.clear()
    first = await run(wait=0.0, hold=0.3)
    assert first.state.global_step == 30 and not failed and finished == ["second"]
    assert stepping == ["first"] + ["second"] * 30 + ["first"] * 29  # (step 2's Slow: after)
    # ... for as long as NESTED_GRACE_S, then the first fails there, saying why.
    monkeypatch.setattr(asynchat._in_use, "NESTED_GRACE_S", 0.1)
    finished.clear()
    first = await run(wait=0.0, hold=0.3)
    assert first.status is LoopStatus.FAILED and first.state.global_step == 2
    assert str(failed[0]).startswith(
        "second, started in Starts.on_step_end (an async def hook of first), still runs 0.1 s "
        "after the hook returned: a loop started in a hook runs inside the hook's loop (on "
        "its model, with its callbacks and data) only while the hook waits for it. Await its "
        "fit() in the hook, or in a task group the hook opens"
    ), str(failed[0])
    assert finished == ["second"], "the second ran to its end, alone once the first failed"


@pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
async def test_a_stream_left_early_in_a_hook_ends_before_the_hooks_loop_goes_on() -> None:
    # Left without aclosing() (trio warns of it): its predictor, in eval() mode, ran on as
    # the trainer went on training the model (until the generator was collected and closed).
    model = Net()
    model.train()
    during = Modes(model)

    class Peeks(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            async for _ in Predictor(model, [torch.randn(4, 8)] * 500).stream(buffer=1):
                break

    training = Trainer(
        model, batches(3), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), num_epochs=3, callbacks=[Peeks(), during],
    )  # fmt: skip
    await training.fit()
    assert training.state.global_step == 9
    assert during.seen == [modes(model)] * 9 and all(modes(model).values())


async def test_a_stream_left_early_is_named_in_a_refusal_with_the_way_to_close_it() -> None:
    # Leaving `async for` does not close an async generator; the predictor runs on, holding
    # the model, until the garbage collector closes it: a Trainer started at once is
    # refused, and the refusal now says why and what to do.
    model = Net()
    predictor = Predictor(model, batches(8))
    stream = predictor.stream()
    async for _ in stream:
        break
    assert predictor.streaming
    with pytest.raises(InUseError, match=r"streams its outputs: .* contextlib.aclosing"):
        await trainer(model).fit()
    await stream.aclose()
    assert not predictor.streaming
    await trainer(model).fit()  # closed: the model is free


async def test_predictors_sharing_a_model_keep_it_in_eval_mode_until_the_last_ends() -> None:
    model = Net()  # in train() mode, with BatchNorm: a step in train() mode moves its stats
    stats = model.backbone[1].running_mean.clone()
    first_done, second_began = threading.Event(), threading.Event()
    first_began = anyio.Event()

    class At(Callback):
        def __init__(self, step: int, do: Callable[[], None]) -> None:
            self.step, self.do = step, do

        def on_batch_begin(self, state: LoopState) -> None:
            if state.step == self.step:
                self.do()

    def wait(event: threading.Event) -> Callable[[], None]:
        return lambda: event.wait(10) or pytest.fail("the other predictor did not get there")

    seen = Modes(model)

    class Began(Callback):
        async def on_loop_begin(self, state: LoopState) -> None:
            first_began.set()

    first = Predictor(
        model, [torch.randn(16, 8)] * 2, callbacks=[Began(), At(1, wait(second_began))]
    )
    second = Predictor(
        model, [torch.randn(16, 8)] * 4,
        callbacks=[At(0, second_began.set), At(1, wait(first_done)), seen],
    )  # fmt: skip

    async def run_first() -> None:
        await first.fit()
        first_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_first)
        await first_began.wait()  # the first holds the model before...
        tg.start_soon(second.fit)  # ...the second joins, and outlives it
    assert seen.seen == [{name: False for name in modes(model)}] * 4
    assert torch.equal(model.backbone[1].running_mean, stats), "no batch moved the BN stats"
    assert all(modes(model).values()), "back in train() mode once both are done"


async def test_a_validation_between_steps_leaves_frozen_layers_frozen() -> None:
    model = Net()
    stats = model.backbone[1].running_mean.clone()
    seen = Modes(model)
    validation = Validation(
        batches(2), every_n_steps=2, every_n_epochs=None, loss_fn=nn.CrossEntropyLoss()
    )
    await trainer(model, FreezeModule(["backbone"]), validation, seen).fit()
    assert [step["backbone.1"] for step in seen.seen] == [False] * 6
    assert [step["head.0"] for step in seen.seen] == [True] * 6
    assert torch.equal(model.backbone[1].running_mean, stats), "frozen BatchNorm stats moved"
    assert all(modes(model).values()), "the modes before fit(), back"


async def test_a_trainer_puts_a_model_in_eval_mode_in_train_mode_and_back() -> None:
    model = Net().eval()  # e.g. just loaded from a pretrained checkpoint
    seen = Modes(model)
    await trainer(model, seen).fit()
    assert seen.seen == [{name: True for name in modes(model)}] * 6
    assert not any(modes(model).values())


async def test_a_callback_serves_one_running_loop_unless_it_says_it_may_serve_many() -> None:
    # One LRSchedule in two trainers at once: the second rebound it to its own optimizer,
    # so the first trainer's steps decayed the second's learning rate, and its own never.
    schedule = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))

    class Count(Callback):
        shared_across_loops = True  # keeps no per-run state worth guarding

        def __init__(self) -> None:
            self.steps = 0

        def on_step_end(self, state: LoopState) -> None:
            self.steps += 1

    count = Count()
    first = trainer(Net(), schedule, count, name="first")
    second = trainer(Net(), count, schedule, name="second")
    async with paused(first):
        with pytest.raises(InUseError, match=r"second cannot run: its callbacks\[1\] "
                           r"\(LRSchedule\) serves first, which is running"):  # fmt: skip
            await second.fit()
        assert (await trainer(Net(), count).fit()).global_step == 6, "Count serves both"
    assert count.steps == 12
    await second.fit()  # once the first is done
    for done in (first, second):
        assert done.state.optimizers["default"].param_groups[0]["lr"] == 0.1 * 0.5**6


async def test_a_callback_of_a_loop_is_refused_to_a_loop_run_inside_it() -> None:
    # One LossMonitor in a trainer and in a predictor awaited in the trainer's hook: the
    # predictor's start reset the monitor's sums in the middle of the trainer's run, whose
    # train/mean_loss was then the predictor's loss. The same for a Checkpoint, a logger
    # (refused as a second writer of its own directory or file) and Progress (its bar).
    monitor = LossMonitor()

    class PredictAtEpochEnd(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            refused = (
                r"predicting cannot run: its callbacks\[0\] \(LossMonitor\) serves training, "
                "which it runs inside"
            )
            with pytest.raises(InUseError, match=refused):
                await Predictor(
                    state.loop.model, batches(2), loss_fn=nn.CrossEntropyLoss(),
                    callbacks=[monitor], name="predicting",
                ).fit()  # fmt: skip

    done = await trainer(Net(), monitor, PredictAtEpochEnd(), name="training").fit()
    alone = await trainer(Net(), LossMonitor()).fit()
    assert done.metrics["train/mean_loss"] == alone.metrics["train/mean_loss"]


async def test_a_validation_given_a_callback_of_its_trainer_is_refused_before_training() -> None:
    # Refused at the first validation, the run would have trained an epoch for nothing.
    monitor = LossMonitor()
    validation = Validation(batches(2), loss_fn=nn.CrossEntropyLoss(), callbacks=[monitor])
    training = trainer(Net(), monitor, validation)
    refused = r"Validation's callbacks\[0\] \(LossMonitor\) is the trainer's callbacks\[0\] too"
    with pytest.raises(InUseError, match=refused):
        await training.fit()
    assert training.state.global_step == 0

    class Count(Callback):
        shared_across_loops = True  # counts the batches of both loops

        def __init__(self) -> None:
            self.batches = 0

        def on_batch_end(self, state: LoopState) -> None:
            self.batches += 1

    count = Count()
    validation = Validation(batches(2), loss_fn=nn.CrossEntropyLoss(), callbacks=[count])
    await trainer(Net(), count, validation).fit()
    assert count.batches == 6 + 2


async def test_a_metric_counts_for_one_running_loop() -> None:
    # One torchmetrics instance in a trainer's MetricUpdater and its Validation's metrics:
    # each validation reset the trainer's counts and added its own (train/acc 0.26 instead
    # of 0.36 in a probe). Refused before training; at once, for loops running side by side
    # or one awaited in the other's hook.
    accuracy = MulticlassAccuracy(3)
    validation = Validation(batches(2), metrics={"acc": accuracy}, every_n_steps=2)
    training = trainer(Net(), MetricUpdater({"acc": accuracy}), validation)
    refused = (
        r"Validation's metrics\['acc'\] is the trainer's callbacks\[0\]'s metrics\['acc'\] too"
    )
    with pytest.raises(InUseError, match=refused):
        await training.fit()
    assert training.state.global_step == 0

    class PredictAtEpochEnd(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            with pytest.raises(InUseError, match=inside):
                await Predictor(
                    state.loop.model, batches(2), callbacks=[MetricUpdater({"acc": accuracy})],
                    name="predicting",
                ).fit()  # fmt: skip

    inside = (
        r"predicting cannot run: its callbacks\[0\]'s metrics\['acc'\] \(MulticlassAccuracy\)"
        r" is first's callbacks\[0\]'s metrics\['acc'\] too, which it runs inside"
    )
    first = trainer(Net(), MetricUpdater({"acc": accuracy}), PredictAtEpochEnd(), name="first")
    async with paused(first):
        beside = r"second cannot run: its callbacks\[0\]'s metrics\['acc'\] .* which is running"
        with pytest.raises(InUseError, match=beside):
            await trainer(Net(), MetricUpdater({"acc": accuracy}), name="second").fit()
    assert first.state.global_step == 6 and "train/acc" in first.state.metrics


async def test_a_batch_processor_serves_one_training_run_at_a_time() -> None:
    # Two trainers given one processor: the second's setup reset which optimizers the first
    # steps, and each failed in turn with the other's names ("no optimizer named 'first'");
    # with fp16 the second's setup replaced the first's grad scaler in the middle of its run.
    processor = BasicBatchProcessor(nn.CrossEntropyLoss())

    def run(kind: type[LoopBase], name: str, **kwargs: Any) -> LoopBase:
        if kind is Predictor:
            return Predictor(Net(), [torch.randn(16, 8)] * 3, batch_processor=processor, name=name)
        return Trainer(
            Net(), batches(3), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            batch_processor=processor, num_epochs=1, name=name, **kwargs,
        )  # fmt: skip

    refused = (
        r"cannot run: its batch_processor \(BasicBatchProcessor\) serves first, which is running"
    )
    async with paused(run(Trainer, "first")):
        with pytest.raises(InUseError, match="second " + refused):
            await run(Trainer, "second").fit()
        with pytest.raises(InUseError, match="predicting " + refused):
            await run(Predictor, "predicting").fit()
    async with paused(run(Predictor, "first")):
        with pytest.raises(InUseError, match="training " + refused):
            await run(Trainer, "training").fit()
        assert (await run(Predictor, "second").fit()).global_step == 3, "predictors share it"
    # A Validation given its trainer's processor runs inside the trainer.
    validation = Validation(batches(2), batch_processor=processor)
    done = await run(Trainer, "validated", callbacks=[validation]).fit()
    assert done.global_step == 3 and "val/loss" in done.metrics


async def test_data_read_from_one_position_serves_one_running_loop() -> None:
    # A DataLoader with persistent workers hands every iter() the same iterator, reset to
    # its start: a second loop over it restarted the first one's epoch and took its batches.
    dataset = TensorDataset(*batches(1)[0])
    persistent = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True)
    plain = DataLoader(dataset, batch_size=4)
    stream = iter(batches(3))
    first = Trainer(
        Net(), persistent, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), num_epochs=1, name="first",
    )  # fmt: skip
    reading = Predictor(Net(), stream, name="reading")
    async with paused(first), paused(reading):
        refused = "its data_loader is the one first reads, which is running, and it is a "
        with pytest.raises(InUseError, match=refused + "DataLoader with persistent workers"):
            await Predictor(Net(), persistent).fit()
        with pytest.raises(InUseError, match=r"the one reading reads, .* an iterator"):
            await Predictor(Net(), stream).fit()
        predicted = await Predictor(Net(), plain).fit()  # a loader without them is shared
        assert predicted.global_step == 4
    assert first.state.global_step == 4 and reading.state.global_step == 3


async def test_a_validation_reads_the_training_data_between_epochs_only() -> None:
    """Validating on the training data in the middle of an epoch, where its readers share one
    position, would take the epoch's batches (or restart it); at the epoch's end nothing
    reads it any more. (The mid-epoch case reads a generator: a DataLoader with persistent
    workers left mid-epoch by the failure takes seconds to shut its workers down.)"""

    def with_validation(loader: Any, num_epochs: int, **every: Any) -> Trainer:
        validation = Validation(loader, loss_fn=nn.CrossEntropyLoss(), **every)
        return Trainer(
            Net(), loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(), num_epochs=num_epochs, callbacks=[validation],
        )  # fmt: skip

    class ThreeBatches:  # an iterator that says its length: validated once, at step 2
        def __init__(self) -> None:
            self.batches = iter(batches(3))

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> Any:
            return next(self.batches)

        def __len__(self) -> int:
            return 3

    mid_epoch = with_validation(ThreeBatches(), 1, every_n_steps=2, every_n_epochs=None)
    with pytest.raises(InUseError, match=r"its data_loader is the one trainer-.* reads"):
        await mid_epoch.fit()
    assert mid_epoch.state.global_step == 2
    dataset = TensorDataset(*batches(1)[0])
    persistent = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True)
    at_epoch_end = await with_validation(persistent, 2, every_n_epochs=1).fit()
    assert at_epoch_end.global_step == 8 and "val/loss" in at_epoch_end.metrics


def _train_in_child(model: nn.Module) -> None:
    try:
        anyio.run(trainer(model, name="child").fit)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)


def test_a_forked_child_trains_its_copy_of_a_model_the_parent_is_training() -> None:
    """The parent's claims are not the child's: its model is a copy (before, the child was
    refused, 'parent is training its model', by a loop that does not run in it)."""
    model = Net()
    parent = trainer(model, name="parent")
    parent.pause()
    thread = threading.Thread(target=anyio.run, args=(parent.fit,))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while parent.status is not LoopStatus.PAUSED and time.monotonic() < deadline:
            time.sleep(0.005)
        assert parent.status is LoopStatus.PAUSED
        with warnings.catch_warnings():  # Python 3.12+ warns about fork() with threads alive
            warnings.simplefilter("ignore", DeprecationWarning)
            child = multiprocessing.get_context("fork").Process(
                target=_train_in_child, args=(model,)
            )
            child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
    finally:
        parent.resume()
        thread.join(60)
    assert child.exitcode == 0
    assert parent.state.global_step == 6


class Loop:
    """What a claim needs of a loop, for the registry's pure-logic tests."""

    def __init__(self, name: str) -> None:
        self.name = name


def test_predictors_share_a_model_only_in_eval_mode_on_one_device() -> None:
    model = Net()
    cpu = torch.device("cpu")
    evaluating = claim(Loop("a"), model, cpu, trains=False, updates=False)
    try:
        with pytest.raises(InUseError, match="b cannot run: a is predicting with its model"):
            claim(Loop("b"), model, torch.device("cuda", 0), trains=False, updates=False)
        with pytest.raises(InUseError, match="c cannot run: a is predicting with its model"):
            claim(Loop("c"), model, cpu, trains=True, updates=False)
        claim(Loop("d"), model, cpu, trains=False, updates=False).release()
    finally:
        evaluating.release()
    sampling = claim(Loop("e"), model, cpu, trains=True, updates=False)
    try:
        with pytest.raises(InUseError, match=r"e is predicting with, in train\(\) mode, its"):
            claim(Loop("f"), model, cpu, trains=False, updates=False)
    finally:
        sampling.release()
    assert all(modes(model).values())


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)])
def test_modes_come_back_whatever_order_the_runs_end_in(order: tuple[int, ...]) -> None:
    model = Net()
    model.backbone.eval()
    before = modes(model)
    device = torch.device("cpu")
    outer = claim(Loop("t"), model, device, trains=True, updates=True)
    # Two predictors inside the trainer (as from its async hook), sharing with each other.
    inner = [
        claim(Loop(f"p{i}"), model, device, trains=False, updates=False, inside=outer)
        for i in range(2)
    ]
    runs = []
    for each in (outer, *inner):
        run = contextlib.ExitStack()
        run.enter_context(each.modes())
        run.callback(each.release)
        runs.append(run)
    evaluating = dict.fromkeys(before, False)
    assert modes(model) == evaluating
    open_runs = {0, 1, 2}
    for i in order:
        runs[i].close()
        open_runs.remove(i)
        # While a predictor runs, the model is in eval() mode; the trainer alone (which
        # keeps the user's frozen backbone) or nobody: the modes from before.
        assert modes(model) == (evaluating if open_runs & {1, 2} else before)


class Agreement(Callback):
    """A callback of a user's own that keeps a run's counts in a torchmetrics metric."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def held_objects(self) -> dict[str, Any]:
        return {"metric": self.metric}

    def on_batch_end(self, state: LoopState) -> None:
        self.metric.update(state.outputs.argmax(1), state.batch[1])


async def test_a_callback_of_ones_own_naming_its_metric_is_guarded_like_metric_updater() -> None:
    # A metric given to a callback of one's own and to a MetricUpdater counted every batch
    # twice (each reset the other's counts): the engine could not see it in a callback of
    # the user's; one that names it in held_objects() is refused, naming both places.
    accuracy = MulticlassAccuracy(3)
    with pytest.raises(ValueError, match=r"callbacks\[0\]'s metric and callbacks\[1\]'s metrics"):
        Trainer(
            Net(), batches(4), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(), num_epochs=1,
            callbacks=[Agreement(accuracy), MetricUpdater({"acc": accuracy})],
        )  # fmt: skip
