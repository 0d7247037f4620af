"""The shipped callbacks, each against real training (and real files where they write)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torchmetrics
from conftest import StopAt, make_loader, make_model, make_trainer, sgd
from torch import nn

from asynchat import BasicBatchProcessor, Callback, LoopState, Trainer
from asynchat._checkpoint_io import serialize
from asynchat._state import Metrics
from asynchat.callbacks import (
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    EarlyStopping,
    ExponentialMovingAverage,
    FreezeModule,
    GradClip,
    JSONLinesLogger,
    LossMonitor,
    LRSchedule,
    MetricUpdater,
    NonFiniteLossError,
    Progress,
    StatsMonitor,
    TensorBoardLogger,
    TerminateOnNaN,
    Validation,
    cosine,
    load_checkpoint,
    one_cycle,
    step_decay,
)

pytestmark = pytest.mark.anyio


def accuracy() -> torchmetrics.Metric:
    return torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")


def manual_accuracy(model: nn.Module, loader: Any) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
        model.train(was)
    return correct / sum(len(y) for _, y in loader)


class Record(Callback):
    """Copies chosen values of state.metrics at each epoch end."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_epoch_end(self, state: LoopState) -> None:
        self.epochs.append(dict(state.metrics))


async def test_metric_updater_publishes_epoch_values_and_resets() -> None:
    seen: list[float] = []

    class Check(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            seen.append(state.metrics["train/accuracy"])

    updater = MetricUpdater({"accuracy": accuracy()}, log_every_n_steps=2)
    await make_trainer(updater, Check(), num_epochs=2).fit()
    assert len(seen) == 2 and all(0.0 <= v <= 1.0 for v in seen)
    # Reset per epoch: the epoch-2 value covers epoch 2's batches only (6 batches x 16).
    assert updater.metrics["accuracy"].tp.sum() + updater.metrics["accuracy"].fn.sum() == 96


async def test_validation_publishes_metrics_inline_on_the_compute_thread() -> None:
    val_loader = make_loader(48, 16, seed=3)
    threads: list[str] = []

    class WhereAmI(Callback):
        def on_batch_end(self, state: LoopState) -> None:
            threads.append(threading.current_thread().name)
            assert not state.model.training and not torch.is_grad_enabled()

    record = Record()
    validation = Validation(
        val_loader, metrics={"accuracy": accuracy()}, loss_fn=nn.CrossEntropyLoss(),
        callbacks=[WhereAmI()],
    )  # fmt: skip
    trainer = make_trainer(validation, record, num_epochs=2)
    await trainer.fit()
    assert [sorted(e) for e in record.epochs] == [["val/accuracy", "val/loss"]] * 2
    assert record.epochs[-1]["val/accuracy"] == pytest.approx(
        manual_accuracy(trainer.model, val_loader)
    )
    assert set(threads) == {f"asynchat-{trainer.name}"}, "no thread of its own"
    assert trainer.model.training


async def test_a_validation_and_a_test_set_publish_under_their_own_prefixes() -> None:
    def validation(**kwargs: Any) -> Validation:
        return Validation(make_loader(48, 16, seed=3), loss_fn=nn.CrossEntropyLoss(), **kwargs)

    record = Record()
    trainer = make_trainer(validation(), validation(prefix="test/"), record, num_epochs=1)
    await trainer.fit()
    assert sorted(record.epochs[-1]) == ["test/loss", "val/loss"]
    # With one prefix the second overwrote the first's values: refused before training.
    twins = make_trainer(validation(), validation(), num_epochs=1)
    with pytest.raises(ValueError, match=r"two Validation callbacks publish under prefix='val/'"):
        await twins.fit()
    assert twins.state.global_step == 0


async def test_metric_states_that_grow_with_the_data_stay_out_of_checkpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Exact AUROC keeps every prediction of the epoch: kept in checkpoints, every save would
    # copy the epoch's predictions to the host. Past the limit it is left out, once said.
    from asynchat.callbacks import _metrics

    monkeypatch.setattr(_metrics, "MAX_SAVED_STATE", 100)
    updater = MetricUpdater(
        {
            "accuracy": torchmetrics.classification.MulticlassAccuracy(3, average="micro"),
            "auroc": torchmetrics.classification.MulticlassAUROC(3, thresholds=None),
        }
    )
    saved: list[dict[str, Any]] = []

    class Save(Callback):
        def on_step_end(self, state: LoopState) -> None:
            saved.append(updater.state_dict())

    with pytest.warns(RuntimeWarning, match=r"metrics\['auroc'\] holds \d+ values") as warned:
        await make_trainer(updater, Save(), num_steps=4).fit()
    assert len(warned) == 1
    assert [sorted(s) for s in saved] == [["accuracy", "auroc"]] + [["accuracy"]] * 3


def errors(state: LoopState) -> tuple[torch.Tensor, torch.Tensor]:
    return state.outputs[:, 0], state.batch[1].float()


def labels(state: LoopState) -> tuple[torch.Tensor, torch.Tensor]:
    return state.outputs.argmax(1), state.batch[1]


def macro_accuracy(classes: int) -> torchmetrics.Metric:
    return torchmetrics.classification.MulticlassAccuracy(classes, average="macro")


@pytest.mark.parametrize(
    ("before", "after", "select", "states"),
    [
        (torchmetrics.MeanSquaredError, torchmetrics.MeanAbsoluteError, errors,
         "['sum_squared_error', 'total']"),
        (lambda: macro_accuracy(3), lambda: macro_accuracy(4), labels, "['fn', 'fp', 'tn', 'tp']"),
    ],
    ids=["another-class", "another-shape"],
)  # fmt: skip
async def test_a_metric_resumed_as_another_kind_counts_the_epoch_from_where_it_resumed(
    tmp_path: Path, before: Any, after: Any, select: Any, states: str
) -> None:
    """Regression: resumed inside an epoch with a MeanAbsoluteError named as the
    MeanSquaredError was, a MetricUpdater set the MSE's states on it as they were: its
    count of the 48 values before the stop beside no sum of its own, half the error for
    the rest of the epoch (counted over 96 values, summed over 48). A state that is not the
    metric's kind (another class, another shape: 3 classes' counts for 4) is left, with a
    warning."""

    def trainer(metric: torchmetrics.Metric, *extra: Callback, **kwargs: Any) -> Trainer:
        updater = MetricUpdater({"error": metric}, select=select)
        return make_trainer(updater, *extra, Checkpoint(tmp_path), num_epochs=2, **kwargs)

    await trainer(before(), StopAt(9)).fit()  # in epoch 1, after 3 of its 6 batches
    metric = after()
    kind = f"{type(before()).__module__}.{type(before()).__qualname__}"
    with pytest.warns(CheckpointWarning, match=re.escape(
        f"MetricUpdater: the checkpoint's state of metric 'error' is a {kind}'s (states "
        f"{states}), which this {type(metric).__module__}.{type(metric).__qualname__} cannot "
        "go on from: it counts the resumed epoch from here"
    )):  # fmt: skip
        await trainer(metric, resume_from=tmp_path).fit()
    counted = metric.total if hasattr(metric, "total") else (metric.tp + metric.fn).sum()
    assert int(counted) == 3 * 16, "the epoch's last 3 batches of 16, no more"


async def test_a_metric_collection_is_taken_as_its_metrics() -> None:
    # torchmetrics' usual bundle was refused: "metrics must be a mapping of names to ...".
    def collection() -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.classification.MulticlassAccuracy(3),
            "f1": torchmetrics.classification.MulticlassF1Score(3),
        })  # fmt: skip

    def separate() -> dict[str, torchmetrics.Metric]:
        return dict(collection().items())

    validation = Validation(make_loader(32, 16), metrics=collection())
    bundled = await make_trainer(MetricUpdater(collection()), validation, num_epochs=1).fit()
    validation = Validation(make_loader(32, 16), metrics=separate())
    apart = await make_trainer(MetricUpdater(separate()), validation, num_epochs=1).fit()
    assert set(bundled.metrics) == {"train/acc", "train/f1", "val/acc", "val/f1"}
    assert bundled.metrics == apart.metrics
    with pytest.raises(TypeError, match=r"metrics\['all'\] is a MetricCollection: pass the"):
        MetricUpdater({"all": collection()})


async def test_a_metric_of_several_numbers_is_refused_naming_it() -> None:
    """Regression: a metric per class (average=None) failed at the epoch's end with
    float()'s "only one element tensors can be converted to Python scalars", naming no
    metric."""
    per_class = torchmetrics.classification.MulticlassAccuracy(3, average=None)
    updater = MetricUpdater({"accuracy": per_class}, select=labels)
    with pytest.raises(ValueError, match=re.escape(
        "MetricUpdater: metrics['accuracy'] computed a tensor of shape (3,), not one number"
    )):  # fmt: skip
        await make_trainer(updater, num_epochs=1).fit()


@pytest.mark.parametrize(
    ("select", "what"),
    [
        (lambda s: s.outputs, "a tensor of shape (16, 3)"),
        (lambda s: (*labels(s), 1), "a tuple of 3"),
    ],
)
async def test_a_select_that_returns_no_pair_is_named(select: Any, what: str) -> None:
    # Unpacked as it was: "too many values to unpack (expected 2)", naming no callback.
    updater = MetricUpdater({"accuracy": torchmetrics.classification.MulticlassAccuracy(3)},
                            select=select)  # fmt: skip
    with pytest.raises(TypeError, match=re.escape(
        f"MetricUpdater: select(state) must return (preds, target) for the metrics' "
        f"update(preds, target), got {what}"
    )):  # fmt: skip
        await make_trainer(updater, num_epochs=1).fit()


async def test_a_mode_against_the_way_the_metric_is_better_is_refused(tmp_path: Path) -> None:
    # Checkpoint(monitor="val/accuracy") left at mode="min" kept the worst checkpoint (0.67
    # at step 4, in a probe) as the best and pruned the better ones, silently.
    def validation() -> Validation:
        accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        return Validation(make_loader(32, 16), metrics={"accuracy": accuracy},
                          loss_fn=nn.CrossEntropyLoss())  # fmt: skip

    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # noqa: E731 ("min")
    refused = [
        (Checkpoint(tmp_path, monitor="val/accuracy"), "Checkpoint", "keep the worst"),
        (EarlyStopping("val/accuracy"), "EarlyStopping", "stop the run while it improves"),
        (EarlyStopping("val/loss", mode="max"), "EarlyStopping", "stop the run"),
        (LRSchedule(plateau, monitor="val/accuracy"), "LRSchedule", "lower the learning"),
    ]
    for reader, owner, does in refused:
        trainer = make_trainer(validation(), reader)
        with pytest.raises(ValueError, match=rf"{owner}\(monitor='val/(accuracy|loss)'\): .* "
                           rf"is better (higher|lower) .* {does}.*; pass mode="):  # fmt: skip
            await trainer.fit()
        assert trainer.state.global_step == 0, "refused before training"
    assert not list(tmp_path.glob("*.ckpt"))
    # Listed before the Validation that publishes it: refused at its first value (epoch 0's,
    # which it reads at epoch 1's end, having run before the Validation at epoch 0's).
    trainer = make_trainer(EarlyStopping("val/accuracy"), validation())
    with pytest.raises(ValueError, match=r"is better higher .* pass mode='max'"):
        await trainer.fit()
    assert trainer.state.global_step == 12
    await make_trainer(validation(), EarlyStopping("val/accuracy", mode="max")).fit()


async def test_two_callbacks_publishing_one_name_are_refused_before_training() -> None:
    # A trainer's MetricUpdater given prefix="val/" beside its Validation: one "val/acc",
    # the training accuracy overwriting the validation's, silently.
    def accuracy() -> torchmetrics.Metric:
        return torchmetrics.classification.MulticlassAccuracy(3)

    validation = Validation(make_loader(32, 16), metrics={"acc": accuracy()})
    trainer = make_trainer(validation, MetricUpdater({"acc": accuracy()}, prefix="val/"))
    with pytest.raises(ValueError, match=re.escape(
        "two callbacks publish 'val/acc': Validation(prefix='val/') and "
        "MetricUpdater(prefix='val/'); the later one's values would overwrite"
    )):  # fmt: skip
        await trainer.fit()
    assert trainer.state.global_step == 0
    validation = Validation(make_loader(32, 16), metrics={"acc": accuracy()})
    state = await make_trainer(validation, MetricUpdater({"acc": accuracy()})).fit()
    assert {"val/acc", "train/acc"} <= set(state.metrics)
    with pytest.raises(ValueError, match=r"better must be 'max', 'min' or None, got 'higher'"):
        Metrics().declare("val/bleu", validation, better="higher")


async def test_validation_of_the_average_without_one_is_refused_before_training() -> None:
    # It failed at the first validation, after an epoch of training.
    validation = Validation(make_loader(32, 16), loss_fn=nn.CrossEntropyLoss(), use_ema=True)
    trainer = make_trainer(validation)
    with pytest.raises(LookupError, match=r"has no ExponentialMovingAverage callback; add one"):
        await trainer.fit()
    assert trainer.state.global_step == 0


async def test_validation_every_n_steps_and_with_ema_weights() -> None:
    ema = ExponentialMovingAverage(decay=0.5, warmup=False)
    seen_weights: list[torch.Tensor] = []

    class Weights(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            seen_weights.append(next(state.model.parameters()).detach().clone())

    validation = Validation(
        make_loader(32, 16), every_n_epochs=None, every_n_steps=4, loss_fn=nn.CrossEntropyLoss(),
        use_ema=True, callbacks=[Weights()],
    )  # fmt: skip
    trainer = make_trainer(ema, validation, num_epochs=1)
    await trainer.fit()
    assert len(seen_weights) == 1  # step 4 of 6
    first_weight = next(trainer.model.parameters())
    assert not torch.equal(seen_weights[0], first_weight.detach()), "validated the EMA weights"
    assert "val/loss" in trainer.state.metrics


async def test_an_ema_reused_by_a_new_run_averages_the_new_model() -> None:
    # Before, it went on from the last model's average: another model's weights (or, for
    # another shape, a RuntimeError in the first update).
    ema = ExponentialMovingAverage(decay=0.5, warmup=False)
    await make_trainer(ema, num_steps=3).fit()
    wider = make_model(seed=1, classes=5)
    before = [t.detach().clone() for t in wider.state_dict().values()]
    await make_trainer(ema, model=wider, num_steps=1).fit()
    after = list(wider.state_dict().values())
    assert all(
        torch.allclose(s, 0.5 * b + 0.5 * a)
        for s, b, a in zip(ema.shadow, before, after, strict=True)
    )


async def test_early_stopping_stops_after_patience() -> None:
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.7])

    class FakeValidation(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            state.metrics["val/accuracy"] = next(scores)

    stopper = EarlyStopping("val/accuracy", patience=3, mode="max")
    state = await make_trainer(FakeValidation(), stopper, num_epochs=6).fit()
    assert state.epoch == 4  # epochs 2, 3, 4 (0-based) brought no improvement over 0.6
    assert state.stop_reason is not None and "val/accuracy did not improve" in state.stop_reason
    assert stopper.state_dict() == {
        "best": 0.6, "bad_checks": 3, "acted_at": 30, "monitor": "val/accuracy", "mode": "max",
    }  # fmt: skip


class EveryOtherEpoch(Callback):
    """A stand-in for Validation(every_n_epochs=2): publishes ``val/loss`` (the same value,
    or ``values`` in turn) at the end of epochs 0, 2, 4, ..."""

    def __init__(self, *values: float) -> None:
        self.values = list(values) or [1.0]

    def on_epoch_end(self, state: LoopState) -> None:
        if state.epoch % 2 == 0:
            state.metrics["val/loss"] = self.values[(state.epoch // 2) % len(self.values)]


async def test_early_stopping_counts_validations_not_the_epochs_between() -> None:
    # Before, an epoch without a validation failed (KeyError at the end of epoch 0), or,
    # once a value existed, counted it again as a check without improvement.
    stopper = EarlyStopping("val/loss", patience=2)
    state = await make_trainer(EveryOtherEpoch(), stopper, num_epochs=10).fit()
    assert state.epoch == 4, "stopped at the third validation: the second without improvement"
    assert state.stop_reason == "early stopping: val/loss did not improve on 1 for 2 check(s)"


async def test_a_resumed_early_stopping_does_not_count_a_validation_twice(tmp_path: Path) -> None:
    def run(directory: Path, *extra: Callback, resume: bool = False) -> Trainer:
        return make_trainer(
            EveryOtherEpoch(), EarlyStopping("val/loss", patience=100), *extra,
            Checkpoint(directory, save_on_end=True), num_epochs=4,
            resume_from=directory if resume else None,
        )  # fmt: skip

    whole = run(tmp_path / "whole")
    await whole.fit()
    cut = await run(tmp_path / "cut", StopAt(9)).fit()  # checked epoch 0's value (of step 6)
    assert cut.global_step == 9
    resumed = run(tmp_path / "cut", resume=True)
    await resumed.fit()  # epoch 1 ends without a validation: nothing to count
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-000000009.ckpt"
    stoppers = [
        next(c for c in t.callbacks if isinstance(c, EarlyStopping)) for t in (whole, resumed)
    ]
    expected = {  # checks at epochs 0 and 2
        "best": 1.0, "bad_checks": 1, "acted_at": 18, "monitor": "val/loss", "mode": "min",
    }  # fmt: skip
    assert stoppers[1].state_dict() == stoppers[0].state_dict() == expected


class Validated(Callback):
    """Publishes at each epoch's end a falling loss (1.0, 0.9, ...) and a rising accuracy
    (0.10, 0.11, ...): both improve at every check."""

    def on_epoch_end(self, state: LoopState) -> None:
        state.metrics["val/loss"] = 1.0 - 0.1 * state.epoch
        state.metrics["val/accuracy"] = 0.10 + 0.01 * state.epoch


@pytest.mark.parametrize(
    "before", [{"monitor": "val/loss"}, {"monitor": "val/accuracy", "mode": "min"}]
)
async def test_an_early_stopping_resumed_on_another_metric_starts_afresh(
    tmp_path: Path, before: dict[str, Any]
) -> None:
    """Regression: resumed with EarlyStopping("val/accuracy", mode="max") after one on
    val/loss (best 0.8, a loss), the run took it for the best accuracy; no accuracy of this
    run (0.13, 0.14) beat it, and the run stopped after patience=2 checks although every
    value improved. So with the mode changed. The saved state is dropped, with a warning."""

    def run(epochs: int, stopper: EarlyStopping, **kwargs: Any) -> Trainer:
        return make_trainer(Validated(), stopper, Checkpoint(tmp_path), num_epochs=epochs, **kwargs)

    await run(3, EarlyStopping(patience=2, **before)).fit()
    stopper = EarlyStopping("val/accuracy", patience=2, mode="max")
    told = (
        r"EarlyStopping\(monitor='val/accuracy'\): the checkpoint's state of it was made "
        r"with monitor='val/.*', mode='min': what it holds is no value of this metric, so it "
        r"starts afresh"
    )
    with pytest.warns(CheckpointWarning, match=told):
        state = await run(6, stopper, resume_from=tmp_path).fit()
    assert state.stop_reason is None and state.epoch == 5
    assert (stopper.best, stopper.bad_checks) == (pytest.approx(0.15), 0)


async def test_a_plateau_schedule_resumed_on_another_metric_starts_afresh(tmp_path: Path) -> None:
    """Regression: resumed with monitor="val/accuracy" (mode="max") after "val/loss", a
    ReduceLROnPlateau took back the loss's best and mode ("min"): the rate was halved though
    the accuracy improved at every check. Built afresh instead, with a warning, at the rate
    the run had."""

    def run(epochs: int, monitor: str, mode: str, **kwargs: Any) -> Trainer:
        schedule = LRSchedule(
            lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode, 0.5, patience=0),
            monitor=monitor,
        )
        return make_trainer(
            Validated(), schedule, Checkpoint(tmp_path), num_epochs=epochs, **kwargs
        )

    first = await run(3, "val/loss", "min").fit()
    assert first.optimizers["default"].param_groups[0]["lr"] == 0.1
    with pytest.warns(CheckpointWarning, match=r"LRSchedule\(monitor='val/accuracy'\): the "
                      r"checkpoint's state of it was made with monitor='val/loss'"):  # fmt: skip
        state = await run(6, "val/accuracy", "max", resume_from=tmp_path).fit()
    assert state.optimizers["default"].param_groups[0]["lr"] == 0.1, "never halved"


def plateau() -> LRSchedule:
    return LRSchedule(
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
        monitor="val/loss",
    )


@pytest.mark.parametrize(
    ("before", "after", "told"),
    [
        (lambda: LRSchedule(cosine(100)), lambda: LRSchedule(step_decay(5)),
         "a CosineAnnealingLR, which this schedule's StepLR"),
        (plateau, lambda: LRSchedule(cosine(100)),
         "a ReduceLROnPlateau, which this schedule's CosineAnnealingLR"),
        (lambda: LRSchedule(cosine(100)), lambda: LRSchedule(cosine(100), warmup_steps=4),
         "a CosineAnnealingLR, which this schedule's SequentialLR(LinearLR, CosineAnnealingLR)"),
    ],
    ids=["cosine-then-step", "plateau-then-cosine", "warmup-added"],
)  # fmt: skip
async def test_a_schedule_resumed_with_another_scheduler_is_refused(
    tmp_path: Path, before: Any, after: Any, told: str
) -> None:
    """Regression: a scheduler's state went into a scheduler of another class unchecked
    (torch's update their __dict__ with it): a StepLR(5) resumed at step 12 where a cosine
    had run cut the rate from 0.096 to 0.00096 at once; a cosine after a plateau schedule
    started over at step 0. Refused before the resumed run's first step."""
    await make_trainer(Validated(), before(), Checkpoint(tmp_path), num_epochs=2).fit()
    resumed = make_trainer(
        Validated(), after(), Checkpoint(tmp_path), num_epochs=4, resume_from=tmp_path
    )
    with pytest.raises(CheckpointError, match=re.escape(
        f"LRSchedule: the checkpoint holds the state of {told} cannot go on from: resume "
        "with the same scheduler (and warmup)"
    )):  # fmt: skip
        await resumed.fit()
    assert resumed.state.global_step == 12, "refused before a step"


@pytest.mark.parametrize("monitored", [False, True], ids=["cosine", "plateau"])
async def test_a_schedule_resumes_from_the_state_older_checkpoints_hold(
    tmp_path: Path, monitored: bool
) -> None:
    """Checkpoints written before the class was recorded held the scheduler's own state (a
    monitored one's: with ``acted_at``): they resume as before."""

    def schedule() -> LRSchedule:
        return plateau() if monitored else LRSchedule(cosine(100))

    def run(epochs: int, directory: Path, **kwargs: Any) -> Trainer:
        return make_trainer(
            Worsening(), schedule(), Checkpoint(directory), num_epochs=epochs, **kwargs
        )

    straight = await run(5, tmp_path / "straight").fit()
    await run(2, tmp_path / "cut").fit()
    path = tmp_path / "cut" / "step-000000012.ckpt"
    checkpoint, _ = load_checkpoint(path)
    state = checkpoint["callbacks"]["LRSchedule"]
    older = {k: state[k] for k in ("scheduler", "acted_at")} if monitored else state["scheduler"]
    checkpoint["callbacks"]["LRSchedule"] = older
    (tmp_path / "cut" / "manifest.json").unlink()  # (its checksum is the file's before)
    path.write_bytes(serialize(checkpoint)[0])
    if monitored:  # (a cosine given it is refused: it was a plateau schedule's)
        cosine_instead = make_trainer(
            LRSchedule(cosine(100)), num_epochs=5, resume_from=tmp_path / "cut"
        )
        with pytest.raises(CheckpointError, match="the state of a ReduceLROnPlateau, which"):
            await cosine_instead.fit()
    resumed = await run(5, tmp_path / "cut", resume_from=tmp_path / "cut").fit()
    lrs = [s.optimizers["default"].param_groups[0]["lr"] for s in (straight, resumed)]
    assert lrs[0] == lrs[1] and lrs[0] < 0.1, lrs


async def test_schedules_listed_in_another_order_on_resume_are_refused(tmp_path: Path) -> None:
    """Regression: a run's LRSchedules take the checkpoint's states by their place among
    them; resumed with the two listed the other way round, each LambdaLR took the other's
    base rates, and optimizer "a" went on at 0.00079 where it had 0.079 ("b" the reverse)."""

    def trainer(epochs: int, order: str, **kwargs: Any) -> Trainer:
        model = make_model()
        schedules = [
            LRSchedule(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.99**s),
                       optimizer=name)
            for name in order
        ]  # fmt: skip
        optimizers = {
            "a": lambda m: torch.optim.SGD(m[0].parameters(), lr=0.1),
            "b": lambda m: torch.optim.SGD(m[2].parameters(), lr=0.001),
        }
        return Trainer(
            model, make_loader(96, 16), optimizers, loss_fn=nn.CrossEntropyLoss(),
            num_epochs=epochs, callbacks=[*schedules, Checkpoint(tmp_path)], **kwargs,
        )  # fmt: skip

    await trainer(2, "ab").fit()
    with pytest.raises(CheckpointError, match=re.escape(
        "LRSchedule(optimizer='b'): the checkpoint's state in this one's place among the "
        "LRSchedules drove optimizer 'a': list the LRSchedules in the order the run that "
        "saved it did"
    )):  # fmt: skip
        await trainer(4, "ba", resume_from=tmp_path).fit()
    resumed = await trainer(4, "ab", resume_from=tmp_path).fit()
    lrs = [resumed.optimizers[name].param_groups[0]["lr"] for name in "ab"]
    assert lrs == pytest.approx([0.1 * 0.99**24, 0.001 * 0.99**24])


@pytest.mark.parametrize(
    ("before", "after", "told"),
    [
        (lambda: LRSchedule(cosine(24)), lambda: LRSchedule(cosine(48)),
         "T_max=48 (the checkpoint's 24)"),
        (lambda: LRSchedule(cosine(24), warmup_steps=2),
         lambda: LRSchedule(cosine(48), warmup_steps=4),
         "milestones=[4] (the checkpoint's [2]), schedulers[0].total_iters=4 (the checkpoint's "
         "2), schedulers[1].T_max=48 (the checkpoint's 24)"),
    ],
    ids=["cosine", "warmup-and-cosine"],
)  # fmt: skip
async def test_a_schedule_resumed_with_other_settings_is_told_it_keeps_the_saved(
    tmp_path: Path, before: Any, after: Any, told: str
) -> None:
    """Regression: a run resumed with more epochs (its cosine's length doubled) kept the
    saved length without a word, as torch's load_state_dict has it: the rate reached its
    floor at the saved run's end and rose again after."""
    await make_trainer(before(), Checkpoint(tmp_path), num_epochs=2).fit()
    with pytest.warns(CheckpointWarning, match=re.escape(
        f"LRSchedule: the scheduler was built with {told}: a resumed run goes on with the "
        "checkpoint's"
    )):  # fmt: skip
        await make_trainer(after(), Checkpoint(tmp_path), num_epochs=4, resume_from=tmp_path).fit()


class Worsening(Callback):
    """val/loss at each epoch's end: 1.0, then no better (a plateau schedule halves the
    rate at each check after the first)."""

    def on_epoch_end(self, state: LoopState) -> None:
        state.metrics["val/loss"] = 1.0 + 0.1 * state.epoch


async def test_an_early_stopping_reused_by_a_new_run_starts_afresh() -> None:
    stopper = EarlyStopping("val/loss", patience=1)
    await make_trainer(EveryOtherEpoch(0.1), stopper, num_epochs=2).fit()
    assert stopper.best == 0.1
    # A new model whose loss never reaches the last one's best trains until it stalls.
    state = await make_trainer(EveryOtherEpoch(1.0, 0.9, 0.8), stopper, num_epochs=6).fit()
    assert state.stop_reason is None and stopper.best == 0.8


async def test_early_stopping_names_a_misspelled_metric_and_warns_of_one_never_published() -> None:
    class Loss(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            state.metrics["val/loss"] = 1.0

    with pytest.raises(KeyError, match=r"no such metric .*the metrics are \['val/loss'\]"):
        await make_trainer(Loss(), EarlyStopping("val/los")).fit()
    with pytest.warns(UserWarning, match="'valid/loss' was never published in this run"):
        await make_trainer(Loss(), EarlyStopping("valid/loss")).fit()
    # No metric at all (no Validation, or none due before the end) acted as quietly: the
    # early stopping the run asked for never happened.
    with pytest.warns(UserWarning, match=r"'val/loss' was never published .*\(no metric\)"):
        await make_trainer(EarlyStopping("val/loss"), num_steps=2).fit()
    stopped = make_trainer(EarlyStopping("val/loss"), StopAt(1))
    assert (await stopped.fit()).stop_reason is not None  # stopped before it was due: quiet


async def test_a_plateau_schedule_steps_once_per_new_value_whatever_the_interval() -> None:
    """ReduceLROnPlateau never sees an improvement here (threshold 10): it halves the rate
    at every value after the first. Stepped at every step end (the default interval) with
    the last value, it failed at step 1 before, and would have halved the rate every step."""
    for interval in ("step", "epoch"):
        schedule = LRSchedule(
            lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=0.5, patience=0, threshold=10.0, threshold_mode="abs"
            ),
            interval=interval, monitor="val/loss",
        )  # fmt: skip
        state = await make_trainer(EveryOtherEpoch(), schedule, num_epochs=6).fit()
        assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        assert schedule.scheduler.last_epoch == 3, "values at epochs 0, 2 and 4"
        assert state.optimizers["default"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


async def test_an_optimizer_a_plateau_schedule_lowered_resumes_without_a_false_warning(
    tmp_path: Path,
) -> None:
    """Regression: an optimizer given as itself, whose rate a plateau schedule had lowered
    (to 0.025; ReduceLROnPlateau keeps no ``initial_lr``), resumed in the same process was
    told it "was built with lr=0.025 (the checkpoint's 0.1)": a setting nobody changed."""
    model = make_model()
    optimizer = sgd(model)

    def run(epochs: int, **kwargs: Any) -> Trainer:
        schedule = LRSchedule(
            lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=0.5, patience=0, threshold=10.0, threshold_mode="abs"
            ),
            interval="epoch", monitor="val/loss",
        )  # fmt: skip
        return Trainer(
            model, make_loader(96, 16), optimizer, loss_fn=nn.CrossEntropyLoss(),
            num_epochs=epochs, callbacks=[EveryOtherEpoch(), schedule, Checkpoint(tmp_path)],
            **kwargs,
        )  # fmt: skip

    await run(6).fit()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        state = await run(8, resume_from=tmp_path).fit()
    assert state.optimizers["default"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


async def test_one_process_may_follow_its_own_training_loss_with_a_plateau_schedule() -> None:
    # A rank's own metric is refused only where ranks train together (test_distributed).
    schedule = LRSchedule(
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=0, threshold=10.0
        ),
        monitor="train/mean_loss",
    )
    state = await make_trainer(LossMonitor(every_n_steps=6), schedule, num_epochs=2).fit()
    assert state.metrics.is_per_rank("train/mean_loss")
    assert state.optimizers["default"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_a_metric_set_again_by_anyone_is_no_longer_a_ranks_own() -> None:
    metrics = Metrics()  # (state.metrics)
    metrics.update_per_rank({"train/mean_loss": 1.5, "stats/step_time": 0.1})
    metrics["val/loss"] = 2.0
    assert [metrics.is_per_rank(n) for n in metrics] == [True, True, False]
    metrics["train/mean_loss"] = 1.0  # e.g. a callback that averaged it over the ranks
    assert not metrics.is_per_rank("train/mean_loss") and metrics.is_per_rank("stats/step_time")


async def test_terminate_on_nan_names_the_first_bad_step_without_syncing_each_step() -> None:
    ce = nn.CrossEntropyLoss()
    calls = 0

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = ce(outputs, targets)
        return loss * float("nan") if calls == 7 else loss

    trainer = Trainer(
        make_model(), make_loader(), sgd, loss_fn=loss_fn, num_epochs=5,
        callbacks=[TerminateOnNaN(check_every_n_steps=4)],
    )  # fmt: skip
    with pytest.raises(
        NonFiniteLossError, match=r"became NaN \(nan\) at global step 7 \(epoch 1\)"
    ):
        await trainer.fit()
    assert trainer.state.global_step == 8, "noticed at the next check, not at every step"


async def test_lr_schedule_with_warmup_matches_the_torch_chain() -> None:
    lrs: list[float] = []

    class LR(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            assert state.optimizer is not None
            lrs.append(state.optimizer.param_groups[0]["lr"])

    schedule = LRSchedule(cosine(total_steps=10), warmup_steps=4, warmup_start_factor=0.1)
    await make_trainer(schedule, LR(), num_steps=14).fit()
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    chain = torch.optim.lr_scheduler.SequentialLR(
        reference,
        [torch.optim.lr_scheduler.LinearLR(reference, 0.1, 1.0, 4),
         torch.optim.lr_scheduler.CosineAnnealingLR(reference, 10)],
        milestones=[4],
    )  # fmt: skip
    expected = []
    for _ in range(14):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        chain.step()
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1)


async def test_a_schedule_factory_must_return_a_scheduler_of_the_optimizer_it_is_given() -> None:
    # Both left the learning rate as it was, silently: a def that built the scheduler and
    # did not return it (None), and a closure over another optimizer (an earlier run's).
    def forgot_return(opt: torch.optim.Optimizer) -> Any:
        torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    earlier = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    trainer = make_trainer(LRSchedule(forgot_return))
    with pytest.raises(TypeError, match=r"returned None, not a torch learning rate scheduler"):
        await trainer.fit()
    assert trainer.state.global_step == 0
    stale = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(earlier, 1, gamma=0.5))
    trainer = make_trainer(stale)
    with pytest.raises(ValueError, match=r"returned a StepLR over another optimizer than the"):
        await trainer.fit()
    assert trainer.state.global_step == 0 and earlier.param_groups[0]["lr"] == 0.1


async def test_a_schedule_shorter_than_the_run_holds_its_last_rate() -> None:
    # torch's CosineAnnealingLR rose back to the base rate after its total_steps (the run's
    # last 8 steps at up to 0.96 of it), and its OneCycleLR failed the run at the step past
    # them ("Tried to step 9 times. The specified number of total steps is 8").
    async def rates(schedule: LRSchedule) -> list[float]:
        seen: list[float] = []

        class LR(Callback):
            def on_step_begin(self, state: LoopState) -> None:
                assert state.optimizer is not None
                seen.append(state.optimizer.param_groups[0]["lr"])

        loader = make_loader(256, 16)  # 16 steps
        trainer = make_trainer(schedule, LR(), loader=loader, num_epochs=1)
        assert (await trainer.fit()).global_step == 16
        return seen

    cosine_rates = await rates(LRSchedule(cosine(total_steps=8)))
    assert cosine_rates[8:] == [0.0] * 8
    assert cosine_rates[7] == pytest.approx(0.1 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    cycle = LRSchedule(one_cycle(0.1, total_steps=8))
    for _ in range(2):  # the instance reused by a new run tells it again
        with pytest.warns(RuntimeWarning, match=r"OneCycleLR's total_steps \(8\) were done "
                          r"before global step 9, and the run goes on"):  # fmt: skip
            cycle_rates = await rates(cycle)
        assert cycle_rates[8:] == [cycle_rates[7]] * 8


async def test_lr_schedule_per_epoch() -> None:
    lrs: list[float] = []

    class LR(Callback):
        def on_epoch_begin(self, state: LoopState) -> None:
            assert state.optimizer is not None
            lrs.append(state.optimizer.param_groups[0]["lr"])

    await make_trainer(LRSchedule(step_decay(1, gamma=0.5), interval="epoch"), LR()).fit()
    assert lrs == pytest.approx([0.1, 0.05, 0.025])


def test_callbacks_with_state_resume_exactly(tmp_path: Path) -> None:
    """EMA, LR schedule and early stopping resume where they were (in one process)."""
    from asynchat.callbacks import Checkpoint

    def run(
        total: int, *extra: Callback, resume: bool = False
    ) -> tuple[Trainer, ExponentialMovingAverage]:
        torch.manual_seed(0)
        ema = ExponentialMovingAverage(decay=0.9)
        schedule = LRSchedule(cosine(total_steps=20), warmup_steps=5)
        trainer = make_trainer(
            ema, schedule, *extra, num_steps=total, resume_from=tmp_path if resume else None
        )
        anyio.run(trainer.fit)
        return trainer, ema

    straight, straight_ema = run(16)

    class StopAt(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 9:
                state.loop.stop()

    run(16, Checkpoint(tmp_path, every_n_steps=9, save_on_end=False), StopAt())
    resumed, resumed_ema = run(16, resume=True)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight_ema.shadow, resumed_ema.shadow, strict=True):
        assert torch.equal(a, b)
    assert straight.optimizer is not None and resumed.optimizer is not None
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


async def test_ema_follows_the_formula() -> None:
    ema = ExponentialMovingAverage(decay=0.8, warmup=False)
    expected: list[torch.Tensor] = []

    class Manual(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            expected.extend(t.detach().clone() for t in state.model.parameters())

        def on_step_end(self, state: LoopState) -> None:
            for e, p in zip(expected, state.model.parameters(), strict=True):
                e.mul_(0.8).add_(p.detach(), alpha=0.2)

    await make_trainer(ema, Manual(), num_epochs=1).fit()
    for shadow, manual in zip(ema.shadow, expected, strict=True):
        assert torch.allclose(shadow, manual, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.anyio
async def test_ema_averages_buffers_and_a_narrow_model_in_float32(dtype: torch.dtype) -> None:
    # Kept in bfloat16, the average of a bfloat16 model did not move: 0.1 of a difference
    # below the weight's resolution rounded away (BatchNorm's weight and running_var, the
    # last bias stayed at their first values after 18 updates).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = model.to(dtype)
    ema = ExponentialMovingAverage(decay=0.9, warmup=False)
    expected: list[torch.Tensor] = []

    def floats(state: LoopState) -> list[torch.Tensor]:
        return [t for t in state.model.state_dict().values() if t.is_floating_point()]

    class Manual(Callback):  # the formula in float64, from the model's own tensors
        def on_loop_begin(self, state: LoopState) -> None:
            expected.extend(t.double() for t in floats(state))

        def on_step_end(self, state: LoopState) -> None:
            for e, t in zip(expected, floats(state), strict=True):
                e.mul_(0.9).add_(t.double(), alpha=0.1)

    data = [(torch.randn(16, 4, dtype=dtype) * 3 + 2, torch.randint(0, 3, (16,)))] * 18
    trainer = Trainer(
        model, data, sgd, loss_fn=nn.CrossEntropyLoss(), callbacks=[ema, Manual()], num_epochs=1
    )
    await trainer.fit()
    assert len(ema.shadow) == 8  # 2 weights, 2 biases; BatchNorm's weight, bias, mean, var
    for shadow, manual, live in zip(ema.shadow, expected, floats(trainer.state), strict=True):
        torch.testing.assert_close(shadow.double(), manual, rtol=1e-5, atol=1e-6)
        assert shadow.dtype == torch.float32
        assert not torch.equal(manual, live.double())  # (an average, not the weights)
    ema.copy_to(model)  # rounded to the model's type
    for shadow, live in zip(ema.shadow, floats(trainer.state), strict=True):
        assert live.dtype == dtype and torch.equal(live, shadow.to(dtype))


@pytest.mark.anyio
async def test_an_ema_saved_in_a_narrow_type_is_averaged_in_float32_once_loaded() -> None:
    model = make_model().to(torch.bfloat16)
    saved = [t.detach().clone() for t in model.state_dict().values()]  # as saved before
    ema = ExponentialMovingAverage(decay=0.5, warmup=False)
    ema.load_state_dict({"shadow": saved, "updates": 3})
    loader = [(x.to(torch.bfloat16), y) for x, y in make_loader(32, 16)]
    await Trainer(
        model, loader, sgd, loss_fn=nn.CrossEntropyLoss(), callbacks=[ema], num_epochs=1
    ).fit()
    assert ema.updates == 5 and [t.dtype for t in ema.shadow] == [torch.float32] * len(saved)


@pytest.mark.parametrize("amp", [None, "fp16"])
async def test_grad_clip_bounds_the_true_gradient_norm(amp: Any) -> None:
    norms: list[float] = []

    class Norm(Callback):
        def on_before_update(self, state: LoopState) -> None:
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    clip = GradClip(max_norm=0.05)
    trainer = Trainer(
        make_model(), make_loader(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0),
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), amp=amp),
        num_epochs=1, callbacks=[clip, Norm()],
    )  # fmt: skip
    await trainer.fit()
    assert len(norms) == 6
    assert all(n <= 0.05 * (1 + 1e-4) for n in norms)
    assert clip.last_norm is not None and float(clip.last_norm) > 0.05, "clipping was needed"


async def test_freeze_module_until_an_epoch() -> None:
    model = make_model()
    first_layer = model[0].weight.detach().clone()
    snapshots: list[torch.Tensor] = []

    class Snap(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            snapshots.append(state.model[0].weight.detach().clone())

    trainer = Trainer(
        model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=3,
        callbacks=[FreezeModule(["0"], until_epoch=2), Snap()],
    )  # fmt: skip
    await trainer.fit()
    assert torch.equal(snapshots[0], first_layer) and torch.equal(snapshots[1], first_layer)
    assert not torch.equal(snapshots[2], first_layer)
    with pytest.raises(KeyError, match=r"no submodule named \['backbone'\]"):
        await make_trainer(FreezeModule(["backbone"])).fit()


async def test_freeze_module_names_a_compiled_models_submodules_as_uncompiled() -> None:
    # torch.compile(model) names them "_orig_mod.0": FreezeModule(["0"]) was refused.
    model = make_model()
    first_layer = model[0].weight.detach().clone()
    compiled = torch.compile(model, backend="eager")
    await make_trainer(FreezeModule(["0"]), model=compiled, num_epochs=1).fit()
    assert torch.equal(model[0].weight, first_layer) and not model[0].weight.requires_grad
    with pytest.raises(KeyError, match=r"no submodule named \['_orig_mod\.0'\]; .* \['0', '1'"):
        await make_trainer(FreezeModule(["_orig_mod.0"]), model=compiled).fit()


async def test_stats_monitor_publishes_timing() -> None:
    record = Record()
    await make_trainer(StatsMonitor(every_n_steps=2), record, num_epochs=2).fit()
    stats = record.epochs[0]
    assert stats["stats/step_time"] > 0 and stats["stats/samples_per_s"] > 0
    assert 0.0 <= stats["stats/data_wait"] <= 1.0
    assert record.epochs[0]["stats/eta_s"] > record.epochs[1]["stats/eta_s"] == 0.0


async def test_progress_plain_lines_and_rich_bar() -> None:
    plain = io.StringIO()
    await make_trainer(Progress(every_n_steps=3, stream=plain), num_epochs=2).fit()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 6  # steps 3, 6, 9, 12 and two epoch ends
    assert "epoch 2/2 done, step 12" in lines[-1]

    fancy = io.StringIO()
    progress = Progress(stream=fancy, rich=True)
    await make_trainer(progress, num_epochs=1).fit()
    assert "6/6" in fancy.getvalue()
    assert progress._bar is None, "the bar (and rich's refresh thread) is stopped"


def test_progress_on_a_closed_pipe_warns_once_and_the_training_goes_on() -> None:
    """Regression: ``python train.py | head -2`` ended the training at step 3 with a
    BrokenPipeError from the progress line (losing what it had trained since its last
    checkpoint, and its final one)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as head is after two lines
    closed_pipe = open(write_end, "w")  # noqa: SIM115 (closed below, whatever it raises)
    try:
        trainer = make_trainer(Progress(every_n_steps=1, stream=closed_pipe))
        with pytest.warns(RuntimeWarning, match="stream can no longer be written") as caught:
            state = anyio.run(trainer.fit)
    finally:
        with contextlib.suppress(BrokenPipeError):
            closed_pipe.close()  # (what the failed write left buffered cannot go either)
    assert state.global_step == 18 and trainer.status == "finished"
    assert len([w for w in caught if "no longer" in str(w.message)]) == 1


class GoneTerminal(io.StringIO):
    """A terminal whose window closes (``gone``): from then on the loop's writes fail (EIO).
    (Those of rich's refresh thread still land, so that no thread's error can come in.)"""

    gone = False

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.gone and type(threading.current_thread()).__name__ != "_RefreshThread":
            raise OSError(5, "Input/output error")
        return super().write(text)


def test_progress_bar_on_a_terminal_gone_warns_and_fit_returns() -> None:
    """Regression: the training ran to its end (final checkpoint written), then fit()
    raised the OSError of the bar's last refresh."""
    terminal = GoneTerminal()

    class CloseTheWindow(Callback):
        def on_loop_end(self, state: LoopState) -> None:  # (before Progress's)
            terminal.gone = True

    trainer = make_trainer(CloseTheWindow(), Progress(stream=terminal, rich=True))
    with pytest.warns(RuntimeWarning, match="stream can no longer be written"):
        state = anyio.run(trainer.fit)
    assert state.global_step == 18 and trainer.status == "finished"


class ClosedTerminal(io.StringIO):
    """A terminal whose window closes (``gone``): from then on every write fails (EIO), those
    of rich's refresh thread too."""

    gone = False

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.gone:
            raise OSError(5, "Input/output error")
        return super().write(text)


def test_a_terminal_closed_under_the_progress_bar_ends_the_bar_and_not_the_training() -> None:
    """Regression: rich's refresh thread met the failed write and died with a traceback (a
    thread's unhandled exception); now the bar stops at the next step with one warning."""
    terminal = ClosedTerminal()

    class CloseTheWindow(Callback):
        def on_step_end(self, state: LoopState) -> None:
            terminal.gone = terminal.gone or state.global_step == 3
            time.sleep(0.03)  # rich redraws 10 times a second: its thread meets the EIO

    trainer = make_trainer(CloseTheWindow(), Progress(stream=terminal, rich=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = anyio.run(trainer.fit)
    assert state.global_step == 18 and trainer.status == "finished"
    assert [str(w.message).split(" (")[0] for w in caught] == [
        "Progress: its stream can no longer be written"
    ]


FULL_DISK_JOB = """
import resource, sys, warnings
from pathlib import Path
import anyio
from conftest import make_trainer
from asynchat import Callback
from asynchat.callbacks import JSONLinesLogger, TensorBoardLogger

out, full_at, freed_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)

class DiskFull(Callback):
    # From step full_at on, no file of this process can grow (as on a full disk: writes
    # fail with EFBIG, which Python gets instead of a SIGXFSZ); at freed_at, again.
    def on_step_end(self, state):
        if state.global_step == full_at:
            logs = [f for f in out.rglob("*") if f.is_file() and "lock" not in f.name]
            limit = min(f.stat().st_size for f in logs)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, unlimited[1]))
        if state.global_step == freed_at:
            resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)

warnings.simplefilter("always")
trainer = make_trainer(
    DiskFull(), JSONLinesLogger(out / "log.jsonl", every_n_steps=1),
    TensorBoardLogger(out / "tb", every_n_steps=1), num_epochs=40,
)
print("finished at step", anyio.run(trainer.fit).global_step)
"""


def run_on_a_full_disk(out: Path, full_at: int, freed_at: int) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_JOB, str(out), str(full_at), str(freed_at)],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def logged_steps(out: Path) -> tuple[list[int], list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = (out / "log.jsonl").read_bytes().split(b"\n")
    complete = [json.loads(line)["step"] for line in lines[:-1]]  # (the last: cut, or empty)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return complete, [e.step for e in events.Scalars("train/loss")]


def test_logs_on_a_disk_that_fills_up_keep_their_values_until_it_has_room(tmp_path: Path) -> None:
    """Regression: the first write of a log that failed (ENOSPC) ended the training with a
    bare OSError naming no file (TensorBoard's writer thread died with a traceback first).
    Now the training goes on, the values wait in memory, and are written when the disk
    has room again: each log holds every step once."""
    stdout, stderr = run_on_a_full_disk(tmp_path, full_at=20, freed_at=150)
    assert "finished at step 240" in stdout
    jsonl, tb = logged_steps(tmp_path)
    assert jsonl == tb == list(range(1, 241))
    for logger in ("JSONLinesLogger", "TensorBoardLogger"):
        warned = [line for line in stderr.splitlines() if f"RuntimeWarning: {logger}(" in line]
        assert len(warned) == 2, stderr
        assert "cannot write the log ([Errno 27] File too large)" in warned[0]
        assert "the log is written again; no value was lost" in warned[1]
    assert "Traceback" not in stderr


def test_logs_on_a_disk_that_stays_full_say_what_they_lost_and_the_training_ends(
    tmp_path: Path,
) -> None:
    stdout, stderr = run_on_a_full_disk(tmp_path, full_at=20, freed_at=-1)
    assert "finished at step 240" in stdout
    # What the logs held when the disk filled: the steps up to the last epoch's end (each
    # epoch of 6 steps flushes them), every record whole.
    assert logged_steps(tmp_path) == (list(range(1, 19)), list(range(1, 19)))
    for logger in ("JSONLinesLogger", "TensorBoardLogger"):
        warned = [line for line in stderr.splitlines() if f"RuntimeWarning: {logger}(" in line]
        assert len(warned) == 2 and "could not be written before the loop ended" in warned[1]
    assert "Traceback" not in stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_log_that_takes_no_writes_keeps_at_most_its_limit_in_memory(tmp_path: Path) -> None:
    """A disk full for days must not fill the memory too: past ``max_waiting`` bytes the
    records are dropped, and counted in the last warning."""
    from asynchat.callbacks._loggers import _LogFile

    path = tmp_path / "log.jsonl"
    path.symlink_to("/dev/full")  # every write: ENOSPC
    log = _LogFile(path, "JSONLinesLogger(probe)")
    log.max_waiting = 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            log.append(b"x" * 30 + b"\n")
        log.write_out()
        for _ in range(7):
            log.append(b"x" * 30 + b"\n")
        log.close()
    assert [str(w.message) for w in caught] == [
        "JSONLinesLogger(probe): cannot write the log ([Errno 28] No space left on device); "
        "its values are kept in memory and written when it takes them again",
        "JSONLinesLogger(probe): 93 bytes of the log wait to be written; the values logged "
        "from now on are dropped until it takes writes again",
        "JSONLinesLogger(probe): its last 10 record(s) could not be written before the loop "
        "ended, and are lost ([Errno 28] No space left on device)",
    ]


CUT_RECORD_JOB = """
import resource, sys, warnings
from pathlib import Path
from asynchat.callbacks._loggers import _LogFile

path = Path(sys.argv[1])
warnings.simplefilter("always")
log = _LogFile(path, "JSONLinesLogger(probe)")
log.append(b'{"step": 1}\\n')
log.write_out()
unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 5, unlimited[1]))
log.append(b'{"step": 2}\\n')
log.append(b'{"step": 3}\\n')
log.write_out()  # 5 bytes of step 2's line go in, then the file takes no more (EFBIG)
print(path.read_bytes())
path.unlink()  # removed by hand: the log goes on in a new file at its path
log = log.moved_to(path)
resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
log.append(b'{"step": 4}\\n')
log.close()
print(path.read_bytes())
"""


def test_a_log_removed_after_a_write_cut_its_line_begins_anew_with_whole_lines(
    tmp_path: Path,
) -> None:
    """The line cut by a full disk went with the removed file; the new file must not begin
    with its rest (a line no reader can parse), and the loss is counted."""
    done = subprocess.run(
        [sys.executable, "-c", CUT_RECORD_JOB, str(tmp_path / "log.jsonl")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        """b'{"step": 1}\\n{"ste'""",
        """b'{"step": 3}\\n{"step": 4}\\n'""",
    ]
    assert "the log is written again; 1 record(s) were dropped meanwhile" in done.stderr


async def test_tensorboard_event_files_hold_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = Record()
    trainer = make_trainer(
        Validation(make_loader(32, 16), loss_fn=nn.CrossEntropyLoss()),
        TensorBoardLogger(tmp_path, every_n_steps=2),
        record,
        num_epochs=2,
    )
    await trainer.fit()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "val/loss"}
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    val = events.Scalars("val/loss")
    assert [e.step for e in val] == [6, 12]
    assert val[-1].value == pytest.approx(record.epochs[-1]["val/loss"], rel=1e-6)


@pytest.mark.parametrize("overwrite", [False, True], ids=["appended", "overwritten"])
async def test_a_fresh_run_appends_to_its_logs_or_with_overwrite_begins_them_anew(
    tmp_path: Path, overwrite: bool
) -> None:
    # A run started over (examples/digits.py without --resume) replaced its checkpoints and
    # logged beside the last run: the JSON lines of both runs in one file, and in
    # TensorBoard the last run's validation curve under the new run's loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, log_dir = tmp_path / "train.jsonl", tmp_path / "tb"

    def run(*callbacks: Callback, epochs: int) -> Trainer:
        return make_trainer(
            *callbacks, JSONLinesLogger(path, every_n_steps=3, overwrite=overwrite),
            TensorBoardLogger(log_dir, every_n_steps=3, overwrite=overwrite), num_epochs=epochs,
        )  # fmt: skip

    await run(Validation(make_loader(32, 16), loss_fn=nn.CrossEntropyLoss()), epochs=2).fit()
    await run(epochs=1).fit()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == ([3, 6] if overwrite else [3, 6, 6, 9, 12, 12, 3, 6])  # (val/loss: 6, 12)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    losses = [e.step for e in events.Scalars("train/loss")]
    assert losses == ([3, 6] if overwrite else [3, 6, 9, 12, 3, 6])
    assert [e.step for e in events.Scalars("val/loss")] == ([] if overwrite else [6, 12])


async def test_json_lines_logger(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "train.jsonl"
    await make_trainer(JSONLinesLogger(path, every_n_steps=3), num_epochs=1).fit()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(math.isfinite(r["train/loss"]) for r in rows)


async def test_json_lines_are_strict_json_when_a_loss_diverges(tmp_path: Path) -> None:
    # A NaN or inf was written as Python's NaN and Infinity, which JSON has not: JSON.parse,
    # Go's and Rust's parsers refuse the line. They are null now, as JSON.stringify writes them.
    class Diverged(Callback):
        def on_step_end(self, state: LoopState) -> None:
            state.metrics["train/ratio"] = [float("inf"), 1.5, float("-inf")][state.step % 3]

    path = tmp_path / "train.jsonl"

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * float("nan") if trainer.state.global_step >= 3 else loss

    trainer = Trainer(
        make_model(), make_loader(), sgd, loss_fn=loss_fn, num_epochs=1,
        callbacks=[Diverged(), JSONLinesLogger(path, every_n_steps=1)],
    )  # fmt: skip
    await trainer.fit()
    lines = path.read_text().splitlines()

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in {lines}")

    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert [loss is None for loss in losses] == [False] * 3 + [True] * 3
    assert [row["train/ratio"] for row in rows if "train/ratio" in row] == [None, 1.5, None] * 2


async def test_a_metric_named_as_a_json_lines_own_key_does_not_replace_it(tmp_path: Path) -> None:
    # Regression: a metric named "step" (or "time", "run") replaced the line's own: the
    # line's step was lost (0.5), and a resume's trim took it for no log of ours.
    class Named(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            state.metrics.update({"step": 0.5, "run": 1.0})

    path = tmp_path / "train.jsonl"
    trainer = make_trainer(Named(), JSONLinesLogger(path, every_n_steps=6), num_epochs=2)
    with pytest.warns(UserWarning, match=r"the metric '(step|run)' is written as 'metric/\1'"):
        await trainer.fit()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["run"]) for r in rows] == [(s, trainer.run_id) for s in (6, 6, 12, 12)]
    assert [(r["metric/step"], r["metric/run"]) for r in rows if "metric/step" in r] == [
        (0.5, 1.0), (0.5, 1.0)
    ]  # fmt: skip


async def test_loggers_write_each_metric_value_once_at_the_step_it_was_measured(
    tmp_path: Path,
) -> None:
    """A Validation every 4 steps reaches the log at steps 4, 8, 12 (before, only the last
    value of each epoch did, at the epoch's end); one every other epoch is not logged again
    at the epochs between; a resumed run does not log again what it restored."""

    def val_rows(path: Path) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]

    every_4 = tmp_path / "every-4-steps.jsonl"
    validation = Validation(
        make_loader(32, 16), every_n_steps=4, every_n_epochs=None, loss_fn=nn.CrossEntropyLoss()
    )
    await make_trainer(validation, JSONLinesLogger(every_4), num_epochs=2).fit()
    assert [step for step, _ in val_rows(every_4)] == [4, 8, 12]

    other = tmp_path / "every-other-epoch.jsonl"
    await make_trainer(EveryOtherEpoch(1.0, 0.5), JSONLinesLogger(other), num_epochs=4).fit()
    assert val_rows(other) == [(6, 1.0), (18, 0.5)]

    cut = tmp_path / "cut.jsonl"

    def run(*extra: Callback, resume: bool = False) -> Trainer:
        return make_trainer(
            EveryOtherEpoch(1.0, 0.5), JSONLinesLogger(cut), *extra,
            Checkpoint(tmp_path / "checkpoints", save_on_end=True), num_epochs=4,
            resume_from=tmp_path / "checkpoints" if resume else None,
        )  # fmt: skip

    await run(StopAt(9)).fit()
    await run(resume=True).fit()
    assert val_rows(cut) == [(6, 1.0), (18, 0.5)]


async def test_a_run_resumed_after_a_crash_leaves_one_log_as_if_uninterrupted(
    tmp_path: Path,
) -> None:
    # A run that crashed after its step-6 checkpoint had logged steps 7-12 (and a kill can
    # cut the last line short); resumed from step 6, those steps were logged a second time,
    # its first line glued to the cut one. Now the resumed run drops them first: each step
    # once, with the values of a run never interrupted.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(name: str, resume: Path | None = None) -> Trainer:
        checkpoints = tmp_path / f"{name}-{'resumed' if resume else 'first'}-checkpoints"
        return make_trainer(
            JSONLinesLogger(tmp_path / f"{name}.jsonl", every_n_steps=1),
            TensorBoardLogger(tmp_path / f"{name}-tb", every_n_steps=1),
            Checkpoint(checkpoints, every_n_steps=3, keep_last=None),
            num_epochs=2, resume_from=resume,
        )  # fmt: skip

    await run("straight").fit()
    await run("crashed").fit()  # the same run, "crashed" after it logged step 12
    with (tmp_path / "crashed.jsonl").open("a") as log:
        log.write('{"step": 13, "time": 17')  # cut short by the kill
    await run("crashed", resume=tmp_path / "crashed-first-checkpoints/step-000000006.ckpt").fit()

    def losses(name: str) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        return [(row["step"], row["train/loss"]) for row in rows]

    assert [step for step, _ in losses("crashed")] == list(range(1, 13))
    assert losses("crashed") == losses("straight")
    events = EventAccumulator(str(tmp_path / "crashed-tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))


async def test_a_resumed_runs_event_file_sorts_after_the_ones_it_purges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Event files of one second and one process were told apart by an unpadded count: the
    # 10th sorted before the 9th, so TensorBoard read a run resumed within that second
    # before the run it purged (the test above failed when enough event files had been
    # made before it in the process: steps 7-12, then 1-12).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asynchat.callbacks import _loggers

    monkeypatch.setattr(_loggers, "_EVENT_FILES", itertools.count(9))
    log_dir, checkpoints = tmp_path / "tb", tmp_path / "checkpoints"

    def run(resume: Path | None = None) -> Trainer:
        return make_trainer(
            TensorBoardLogger(log_dir, every_n_steps=1),
            Checkpoint(checkpoints / ("resumed" if resume else "first"), every_n_steps=3),
            num_epochs=2, resume_from=resume,
        )  # fmt: skip

    await run().fit()
    await run(resume=checkpoints / "first" / "step-000000006.ckpt").fit()
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert [f.name.split(".")[-2] for f in files] == ["000009", "000010"]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))


async def test_a_log_line_nested_too_deep_to_parse_is_kept_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    # Regression: dropping the lines of steps after the checkpoint let json's RecursionError
    # out of a line that is no log of ours, and the resumed run ended before its first step.
    # And a line with a "step" but no "time" (a dataset's) was dropped as if logged.
    log, checkpoints = tmp_path / "log.jsonl", tmp_path / "checkpoints"
    await make_trainer(
        JSONLinesLogger(log, every_n_steps=1), Checkpoint(checkpoints, every_n_steps=3),
        num_steps=6,
    ).fit()  # fmt: skip
    deep, data = "[" * 100_000 + "]" * 100_000, '{"step": 5, "reward": 1.0}'
    with log.open("a") as file:
        file.write(f"{deep}\n{data}\n")
    await make_trainer(
        JSONLinesLogger(log, every_n_steps=1), num_steps=8,
        resume_from=checkpoints / "step-000000003.ckpt",
    ).fit()  # fmt: skip
    lines = log.read_text().splitlines()
    assert lines[3:5] == [deep, data]  # kept; steps 4-6 of the first run dropped
    assert [json.loads(line)["step"] for line in lines[:3] + lines[5:]] == list(range(1, 9))


async def test_a_log_that_is_a_link_is_trimmed_where_it_points_and_stays_a_link(
    tmp_path: Path,
) -> None:
    # Regression: a resumed run's trim replaced the link with a file of its own; the log it
    # pointed to (on a shared disk, say) kept the steps after the checkpoint, and got no
    # line more.
    shared, link = tmp_path / "shared" / "exp.jsonl", tmp_path / "log.jsonl"
    shared.parent.mkdir()
    link.symlink_to(shared)
    checkpoints = tmp_path / "checkpoints"
    await make_trainer(
        JSONLinesLogger(link, every_n_steps=1), Checkpoint(checkpoints, every_n_steps=3),
        num_steps=6,
    ).fit()  # fmt: skip
    await make_trainer(
        JSONLinesLogger(link, every_n_steps=1), num_steps=8,
        resume_from=checkpoints / "step-000000003.ckpt",
    ).fit()  # fmt: skip
    assert link.is_symlink() and link.resolve() == shared.resolve()
    assert steps_in(shared.read_text()) == list(range(1, 9))


async def test_a_private_log_stays_private_when_a_resume_trims_it(tmp_path: Path) -> None:
    # Regression: the trim wrote the log anew with mode 0644: one made private (0600) could
    # be read by every user of the machine after a resume. As root it also became root's.
    log, checkpoints = tmp_path / "log.jsonl", tmp_path / "checkpoints"
    await make_trainer(
        JSONLinesLogger(log, every_n_steps=1), Checkpoint(checkpoints, every_n_steps=3),
        num_steps=6,
    ).fit()  # fmt: skip
    log.chmod(0o600)
    owner = (4321, 4321) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(log, *owner)
    await make_trainer(
        JSONLinesLogger(log, every_n_steps=1), num_steps=8,
        resume_from=checkpoints / "step-000000003.ckpt",
    ).fit()  # fmt: skip
    assert steps_in(log.read_text()) == list(range(1, 9))  # trimmed: steps 4-6 logged again
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert (log.stat().st_uid, log.stat().st_gid) == owner


async def test_a_trim_killed_as_it_wrote_leaves_no_temporary_file_for_good(
    tmp_path: Path,
) -> None:
    # Regression: a process killed while it trimmed the log (a resume's first write) left
    # its temporary file (.log.jsonl.<pid>-<hex>.tmp) beside the log, never removed. The
    # next trim of that log removes those of processes that are gone, not a live one's.
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "time": 0.0}\n')
    killed = await anyio.run_process(
        [sys.executable, "-c", "import os, signal, sys; from pathlib import Path\n"
         "from asynchat._checkpoint_io import atomic_file\n"
         "with atomic_file(Path(sys.argv[1])) as f:\n"
         "    f.write(b'half a log'); os.kill(os.getpid(), signal.SIGKILL)", str(log)],
        check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left.startswith(".log.jsonl.")
    live = f".log.jsonl.{os.getpid()}-{'0' * 12}.tmp"  # (a trim under way in a live process)
    (tmp_path / live).write_bytes(b"")
    await make_trainer(JSONLinesLogger(log, every_n_steps=1), num_steps=2).fit()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [live]
    assert steps_in(log.read_text()) == [1, 1, 2]


def run_logged_twice(tmp_path: Path, *callbacks: Callback, **kwargs: Any) -> Trainer:
    """Two epochs of 6 steps logged every step to ``log.jsonl`` and TensorBoard's ``tb``
    (``overwrite`` to both loggers), with ``callbacks`` after them (:func:`logged_run`, for
    the SIGKILL test, has its own Validation and Checkpoint)."""
    overwrite = kwargs.pop("overwrite", False)
    return make_trainer(
        JSONLinesLogger(tmp_path / "log.jsonl", every_n_steps=1, overwrite=overwrite),
        TensorBoardLogger(tmp_path / "tb", every_n_steps=1, overwrite=overwrite),
        *callbacks, num_epochs=2, **kwargs,
    )  # fmt: skip


async def test_a_resumed_run_keeps_the_lines_another_run_logged_meanwhile(tmp_path: Path) -> None:
    # Regression: resumed from its step-6 checkpoint, a run dropped every line of steps 7 on
    # from its log, those a fresh run had appended meanwhile too. Each line now names its
    # run, and a resume drops its own run's (and those of no run, an older version's). In
    # TensorBoard, which shows a directory as one run, the resume hides the other run's
    # steps: it says so, naming that run.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoints = tmp_path / "checkpoints"
    first = run_logged_twice(tmp_path, Checkpoint(checkpoints, every_n_steps=3, keep_last=None))
    await first.fit()
    other = run_logged_twice(tmp_path)
    await other.fit()
    resumed = run_logged_twice(tmp_path, resume_from=checkpoints / "step-000000006.ckpt")
    with pytest.warns(UserWarning, match=rf"another run \({other.run_id}\).* after 6 there"):
        await resumed.fit()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert resumed.run_id == first.run_id != other.run_id
    assert [(row["run"], row["step"]) for row in rows] == (
        [(first.run_id, step) for step in range(1, 7)]
        + [(other.run_id, step) for step in range(1, 13)]
        + [(first.run_id, step) for step in range(7, 13)]
    )
    names = [path.name for path in sorted((tmp_path / "tb").glob("events.out.tfevents.*"))]
    assert [name.rsplit(".", 1)[1] for name in names] == [first.run_id, other.run_id, first.run_id]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()  # (the directory as one run: other's steps 7-12 hidden, not gone)
    assert [e.step for e in events.Scalars("train/loss")] == [*range(1, 7), *range(1, 13)]


@pytest.mark.parametrize("how", ["resumed", "fresh, overwrite=True"])
async def test_a_run_refused_at_its_begin_changes_no_log(tmp_path: Path, how: str) -> None:
    # Regression: listed before the Checkpoint that refused the run at its begin (its
    # directory holds a run further on, or another run's checkpoints), the loggers had
    # already dropped the log's lines of steps 7 on (every line, with overwrite=True) and
    # begun an event file that hid those steps in TensorBoard. They now do it when they
    # first write: the refused run wrote nothing.
    checkpoints = tmp_path / "checkpoints"
    await run_logged_twice(tmp_path, Checkpoint(checkpoints, every_n_steps=3, keep_last=None)).fit()
    lines, event_files = (tmp_path / "log.jsonl").read_bytes(), sorted((tmp_path / "tb").iterdir())
    resume = checkpoints / "step-000000006.ckpt" if how == "resumed" else None
    refused = run_logged_twice(
        tmp_path, Checkpoint(checkpoints, every_n_steps=3), resume_from=resume,
        overwrite=how != "resumed",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="the directory holds checkpoints of a"):
        await refused.fit()
    assert (tmp_path / "log.jsonl").read_bytes() == lines
    assert sorted((tmp_path / "tb").iterdir()) == event_files


def stream_log_job(path: str, tmp_path: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``tests/stream_log_job.py`` logging to ``path``, bounded (before, it waited forever)."""
    here = Path(__file__).parent
    return subprocess.run(
        [sys.executable, str(here / "stream_log_job.py"), path, str(tmp_path / "checkpoints")],
        cwd=here, text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(here)}, **kwargs,
    )  # fmt: skip


def steps_in(lines: str) -> list[int]:
    return [json.loads(line)["step"] for line in lines.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("where", ["pipe", "file"])
def test_json_lines_go_to_dev_stdout_wherever_it_goes(tmp_path: Path, where: str) -> None:
    # Regression: JSONLinesLogger("/dev/stdout") read its own stdout pipe to trim it and
    # waited forever (as root; else its lock file could not be made in /dev); to a file,
    # a trim would have replaced /dev/stdout itself. A stream is written as it comes.
    if where == "pipe":
        job = stream_log_job("/dev/stdout", tmp_path, capture_output=True)
        out = job.stdout
    else:
        log = tmp_path / "shell.log"
        log.write_text("the shell's line, cut sho")  # a file's trim would drop it
        with log.open("a") as stdout:
            job = stream_log_job("/dev/stdout", tmp_path, stdout=stdout, stderr=subprocess.PIPE)
        out = log.read_text()
        assert out.startswith("the shell's line, cut sho{")  # kept, and appended to
        out = out.removeprefix("the shell's line, cut sho")
        assert Path("/dev/stdout").is_symlink()
    assert job.returncode == 0, job.stderr[-2000:]
    assert steps_in(out) == [1, 2, 3, 4, 3, 4, 5, 6]  # no trim: 3 and 4 twice
    assert not list(Path("/dev").glob(".stdout.lock"))


def test_json_lines_go_to_a_fifo_once_its_reader_is_there(tmp_path: Path) -> None:
    # Regression: a FIFO was read to be trimmed (waiting forever for a writer), and with no
    # reader the open to append waited forever too; that is now an error at the loop's
    # begin, naming the FIFO.
    fifo = tmp_path / "lines"
    os.mkfifo(fifo)
    job = stream_log_job(str(fifo), tmp_path, capture_output=True)
    assert job.returncode != 0
    assert f"{fifo} is a FIFO that no process reads; start its reader first" in job.stderr
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # its reader from now on (the lines
    try:  # fit in its buffer; and, a writer too, it never reads an end of file)
        job = stream_log_job(str(fifo), tmp_path / "second", capture_output=True)
        received = b""
        with contextlib.suppress(BlockingIOError):  # (all read: nothing more to come)
            while chunk := os.read(reader, 1 << 16):
                received += chunk
    finally:
        os.close(reader)
    assert job.returncode == 0, job.stderr[-2000:]
    assert steps_in(received.decode()) == [1, 2, 3, 4, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines", "second"]  # no lock


class KillAfterCheckpoint(Callback):
    """SIGKILLs the process at the beginning of the step after global step ``at``, once the
    checkpoint of step ``at`` is complete (listed in the manifest)."""

    def __init__(self, at: int, directory: Path) -> None:
        self.at, self.directory = at, directory

    def on_step_begin(self, state: LoopState) -> None:
        if state.global_step != self.at:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                manifest = json.loads((self.directory / "manifest.json").read_text())
                if manifest["checkpoints"][-1]["global_step"] == self.at:
                    break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


def logged_run(directory: Path, *, kill_after: int | None = None, resume: bool = False) -> Trainer:
    """Two epochs of 6 steps, logged every step to JSON Lines and TensorBoard, validated and
    checkpointed every 2 steps (the Validation listed after the loggers)."""
    checkpoints = directory / "checkpoints"
    kill = [KillAfterCheckpoint(kill_after, checkpoints)] if kill_after is not None else []
    return make_trainer(
        JSONLinesLogger(directory / "log.jsonl", every_n_steps=1),
        TensorBoardLogger(directory / "tb", every_n_steps=1),
        Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss(),
                   every_n_steps=2, every_n_epochs=None),
        Checkpoint(checkpoints, every_n_steps=2, keep_last=None),
        *kill,
        num_epochs=2, resume_from=checkpoints if resume else None,
    )  # fmt: skip


def test_a_process_killed_after_a_checkpoint_lost_nothing_its_log_had_logged_before_it(
    tmp_path: Path,
) -> None:
    # SIGKILLed after its step-4 checkpoint, a run had lost the log of steps 1-4: the JSON
    # Lines file was flushed at epoch ends only and TensorBoard every 2 minutes, and the
    # step-4 validation's val/loss (published after the loggers' hooks) was to be logged at
    # step 5. Resumed from step 4, the run logs from step 5 on: those lines were never
    # written. The loggers now write and flush before each checkpoint's snapshot.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight = logged_run(tmp_path / "straight")
    anyio.run(straight.fit)
    killed = tmp_path / "killed"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import anyio; "
        f"from pathlib import Path; from test_callbacks import logged_run; "
        f"anyio.run(logged_run(Path({str(killed)!r}), kill_after=4).fit)"
    )
    job = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert job.returncode == -signal.SIGKILL, job.stderr[-3000:]
    # TensorBoard reads a directory's event files in the order of their names, which start
    # with the second each was opened in: the resumed run's must come after.
    (events_file,) = (killed / "tb").glob("events.out.tfevents.*")
    time.sleep(max(0.0, int(events_file.name.split(".")[3]) + 1 - time.time()))
    resumed = logged_run(killed, resume=True)
    anyio.run(resumed.fit)
    assert resumed.resumed_from == killed / "checkpoints" / "step-000000004.ckpt"

    def rows(name: str) -> list[dict[str, Any]]:
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        kept = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]
        assert {row.pop("run") for row in kept} == {runs[name]}  # one run across its resume
        return kept

    runs = {"killed": resumed.run_id, "straight": straight.run_id}

    def scalars(name: str) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(tmp_path / name / "tb"))
        events.Reload()
        return {
            tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in ("train/loss", "val/loss")
        }

    assert rows("killed") == rows("straight")
    assert [row["step"] for row in rows("killed") if "val/loss" in row] == [2, 4, 6, 8, 10, 12]
    assert scalars("killed") == scalars("straight")
    assert len(scalars("killed")["train/loss"]) == 12


def test_bad_callback_arguments() -> None:
    with pytest.raises(ValueError, match=r"Validation needs metrics=\.\.\., loss_fn="):
        Validation([])
    with pytest.raises(TypeError, match=r"metrics\['acc'\] must be a torchmetrics.Metric"):
        MetricUpdater({"acc": "accuracy"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="patience must be a positive int, got 0"):
        EarlyStopping("val/loss", patience=0)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.5"):
        ExponentialMovingAverage(decay=1.5)
    with pytest.raises(ValueError, match="max_norm must be > 0, got 0"):
        GradClip(0)
    with pytest.raises(ValueError, match="interval must be 'step' or 'epoch', got 'batch'"):
        LRSchedule(cosine(10), interval="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names must be a non-empty list"):
        FreezeModule("backbone")
