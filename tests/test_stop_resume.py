"""stop() then resume acts on each epoch's end exactly once: the same weights, learning rates,
validations and decisions as a run that was never stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torchmetrics
from conftest import CancelAt, StopAt, make_data, make_loader, make_model, sgd
from torch import nn
from torch.utils.data import DataLoader

from asynchat import Callback, LoopState, Trainer
from asynchat.callbacks import (
    Checkpoint,
    EarlyStopping,
    LossMonitor,
    LRSchedule,
    MetricUpdater,
    Validation,
    cosine,
    one_cycle,
    poly,
    step_decay,
)

STEPS_PER_EPOCH = 6
EPOCHS = 4


class EpochLog(Callback):
    """What each epoch end saw: (epoch, complete, lr, val/loss); kept in checkpoints."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, float, float | None]] = []

    def on_epoch_end(self, state: LoopState) -> None:
        assert state.optimizer is not None
        lr = state.optimizer.param_groups[0]["lr"]
        self.seen.append((state.epoch, state.epoch_complete, lr, state.metrics.get("val/loss")))

    def state_dict(self) -> dict[str, Any]:
        return {"seen": [list(s) for s in self.seen]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen = [tuple(s) for s in state_dict["seen"]]  # type: ignore[misc]


def schedule(kind: str) -> LRSchedule:
    if kind == "epoch-steplr":
        return LRSchedule(
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), interval="epoch"
        )
    return LRSchedule(
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt,
            factor=0.5,
            patience=0,
            threshold=10.0,  # never "improves": halves every epoch
        ),
        interval="epoch",
        monitor="val/loss",
    )


def trainer(kind: str, directory: Path, *extra: Callback, resume: bool = False) -> Trainer:
    return Trainer(
        make_model(),
        make_loader(96, 16, shuffle=True),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=EPOCHS,
        callbacks=[
            *extra,
            Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss()),
            schedule(kind),
            EarlyStopping("val/loss", patience=100),
            EpochLog(),
            LossMonitor(every_n_steps=4),  # intervals across the stops: kept in checkpoints
            MetricUpdater(  # the epoch so far: kept in checkpoints (a sum and a list state)
                {
                    "accuracy": torchmetrics.classification.MulticlassAccuracy(3, average="micro"),
                    "auroc": torchmetrics.classification.MulticlassAUROC(3, thresholds=None),
                }
            ),
            Checkpoint(directory, save_on_end=True, keep_last=2),
        ],
        resume_from=directory if resume else None,
    )


def log_of(t: Trainer) -> EpochLog:
    return next(c for c in t.callbacks if isinstance(c, EpochLog))


@pytest.mark.parametrize("kind", ["epoch-steplr", "plateau"])
@pytest.mark.parametrize("stop_at", [3, 6, 7, 12, 23])
def test_stop_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, kind: str, stop_at: int
) -> None:
    straight = trainer(kind, tmp_path / "straight")
    anyio.run(straight.fit)

    first = trainer(kind, tmp_path / "stopped", StopAt(stop_at, "test"))
    anyio.run(first.fit)
    assert first.state.global_step == stop_at
    # The cut-short epoch was not acted on: no entry claims it complete.
    complete_epochs = stop_at // STEPS_PER_EPOCH
    assert [s[0] for s in log_of(first).seen if s[1]] == list(range(complete_epochs))

    resumed = trainer(kind, tmp_path / "stopped", resume=True)
    anyio.run(resumed.fit)
    assert resumed.state.global_step == straight.state.global_step == EPOCHS * STEPS_PER_EPOCH

    def complete(t: Trainer) -> list[Any]:
        return [s for s in log_of(t).seen if s[1]]

    assert complete(resumed) == complete(straight)  # lr and val/loss at each epoch end
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)
    assert resumed.state.metrics == straight.state.metrics
    assert resumed.state.optimizer is not None and straight.state.optimizer is not None
    lr = resumed.state.optimizer.param_groups[0]["lr"]
    assert lr == straight.state.optimizer.param_groups[0]["lr"] == 0.1 * 0.5**EPOCHS


def test_a_metric_scheduler_without_monitor_is_refused_before_training(tmp_path: Path) -> None:
    t = Trainer(
        make_model(),
        make_loader(),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        callbacks=[LRSchedule(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt))],
    )
    with pytest.raises(TypeError, match="monitor='val/loss'"):
        anyio.run(t.fit)
    assert t.state.global_step == 0


def test_a_cancellation_lets_the_steps_validation_and_hooks_complete(tmp_path: Path) -> None:
    # The Validation due at the cancelled step was cut short by the cancellation (its inline
    # predictor raised it), and the def hooks after it at on_step_end never ran: the final
    # checkpoint said the step was done, so the resumed LR schedule was a step behind.
    def steps(directory: Path, *extra: Callback, resume: bool = False) -> Trainer:
        return Trainer(
            make_model(), make_loader(96, 16, shuffle=True), sgd,
            loss_fn=nn.CrossEntropyLoss(), num_epochs=2,
            callbacks=[
                *extra,
                Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss(),
                           every_n_steps=4, every_n_epochs=None),
                LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)),
                Checkpoint(directory),
            ],
            resume_from=directory if resume else None,
        )  # fmt: skip

    straight = steps(tmp_path / "straight")
    anyio.run(straight.fit)

    cancel = CancelAt(8)
    first = steps(tmp_path / "cancelled", cancel)

    async def cancelled() -> None:
        with anyio.CancelScope() as cancel.scope:
            await first.fit()

    anyio.run(cancelled)
    assert first.status.value == "cancelled" and first.state.global_step == 8
    assert first.state.metrics.measured_at("val/loss") == 8, "the step's validation ran"
    resumed = steps(tmp_path / "cancelled", resume=True)
    anyio.run(resumed.fit)
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)
    assert resumed.state.metrics == straight.state.metrics


def test_a_run_resumed_only_to_end_its_last_epoch_is_saved_with_that_end(
    tmp_path: Path,
) -> None:
    """Cancelled in the last epoch's last step, a run is saved before that epoch's end;
    resumed, it runs that end and takes no step. It is saved at its end all the same (a
    run that took no step is not, as a rule): else every later resume ran that end again,
    its validation and its schedule's step too."""
    cancel = CancelAt(EPOCHS * STEPS_PER_EPOCH)
    first = trainer("epoch-steplr", tmp_path, cancel)

    async def cancelled() -> None:
        with anyio.CancelScope() as cancel.scope:
            await first.fit()

    anyio.run(cancelled)
    assert [s[0] for s in log_of(first).seen if s[1]] == list(range(EPOCHS - 1))
    ends = [Ends(), Ends()]  # (of the run they serve: not kept in checkpoints)
    resumed = trainer("epoch-steplr", tmp_path, ends[0], resume=True)
    anyio.run(resumed.fit)
    assert [s[0] for s in log_of(resumed).seen if s[1]] == list(range(EPOCHS))
    again = trainer("epoch-steplr", tmp_path, ends[1], resume=True)
    anyio.run(again.fit)
    assert [e.epochs for e in ends] == [[EPOCHS - 1], []], "no epoch's end ran again"
    assert log_of(again).seen == log_of(resumed).seen
    assert again.state.global_step == EPOCHS * STEPS_PER_EPOCH


class Ends(Callback):
    """The epochs whose end ran in this run."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_epoch_end(self, state: LoopState) -> None:
        self.epochs.append(state.epoch)


def test_two_schedules_on_one_optimizer_resume_to_the_same_rate(tmp_path: Path) -> None:
    # A cosine by step and a plateau on val/loss: each resumed LRSchedule set the rate to its
    # own scheduler's last one, and the plateau's (from its last validation) undid the
    # cosine's steps since.
    def two(directory: Path, *extra: Callback, resume: bool = False) -> Trainer:
        return Trainer(
            make_model(), make_loader(96, 16, shuffle=True), sgd,
            loss_fn=nn.CrossEntropyLoss(), num_epochs=3,
            callbacks=[
                *extra,
                Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss(),
                           every_n_steps=5, every_n_epochs=None),
                LRSchedule(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 18)),
                LRSchedule(
                    lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
                        opt, patience=0, threshold=10.0
                    ),
                    monitor="val/loss",
                ),
                Checkpoint(directory),
            ],
            resume_from=directory if resume else None,
        )  # fmt: skip

    straight = two(tmp_path / "straight")
    anyio.run(straight.fit)
    anyio.run(two(tmp_path / "stopped", StopAt(7)).fit)
    resumed = two(tmp_path / "stopped", resume=True)
    anyio.run(resumed.fit)
    assert resumed.state.optimizer is not None and straight.state.optimizer is not None
    lr = resumed.state.optimizer.param_groups[0]["lr"]
    assert lr == straight.state.optimizer.param_groups[0]["lr"]
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)


class Hyperparameters(Callback):
    """Each step's param group hyper-parameters (all but the parameters), as the update of
    the step after it will use them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_step_end(self, state: LoopState) -> None:
        assert state.optimizer is not None
        group = state.optimizer.param_groups[0]
        self.seen.append({k: v for k, v in group.items() if k != "params"})


SCHEDULES = {
    "step_decay": (lambda: LRSchedule(step_decay(4, 0.5)), sgd),
    "poly": (lambda: LRSchedule(poly(18, 2.0)), sgd),
    "cosine-warmup": (lambda: LRSchedule(cosine(13), warmup_steps=5), sgd),
    "one_cycle-sgd": (lambda: LRSchedule(one_cycle(1.0, 18)), sgd),
    "one_cycle-adam": (
        lambda: LRSchedule(one_cycle(0.01, 18)),
        lambda m: torch.optim.Adam(m.parameters(), lr=0.001),
    ),
    "one_cycle-by-epoch": (lambda: LRSchedule(one_cycle(1.0, 3), interval="epoch"), sgd),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_shipped_schedule_resumes_to_the_uninterrupted_run(tmp_path: Path, name: str) -> None:
    # OneCycleLR sets the momentum (Adam's beta1) as it is built: a resumed run's first
    # update used the cycle's first momentum, not the one it was stopped with, and trained
    # to other weights. Only the learning rates were put back after the rebuild.
    schedule, optimizer = SCHEDULES[name]

    def run(steps: int, run: str, resume: bool = False) -> tuple[Trainer, Hyperparameters]:
        seen = Hyperparameters()
        trainer = Trainer(
            make_model(), make_loader(96, 16, shuffle=True), optimizer,
            loss_fn=nn.CrossEntropyLoss(), num_steps=steps,
            callbacks=[schedule(), seen, Checkpoint(tmp_path / run)],
            resume_from=tmp_path / run if resume else None,
        )  # fmt: skip
        anyio.run(trainer.fit)
        return trainer, seen

    straight, all_along = run(18, "straight")
    _, before = run(7, "stopped")  # mid-epoch 1
    resumed, after = run(18, "stopped", resume=True)
    assert before.seen + after.seen == all_along.seen
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)


class StopAtEpochBegin(Callback):
    """Calls ``stop()`` in ``on_epoch_begin`` of ``epoch``: before the epoch's first step."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, state: LoopState) -> None:
        if state.epoch == self.epoch:
            state.loop.stop("before the epoch's first step")


def test_a_stop_before_an_epochs_first_step_resumes_to_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    # The checkpoint is at epoch 1 with no step of it done. The resumed run drew the
    # epoch's order, then put back the RNG state of the stop, taken before that draw: the
    # order's draw from torch's generator was undone, and every dropout mask after differed.
    def run(directory: Path, *extra: Callback, resume: bool = False) -> Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        trainer = Trainer(
            model, DataLoader(make_data(96), batch_size=16, shuffle=True), sgd,
            loss_fn=nn.CrossEntropyLoss(), num_epochs=3,
            callbacks=[*extra, Checkpoint(directory)], resume_from=directory if resume else None,
        )  # fmt: skip
        anyio.run(trainer.fit)
        return trainer

    straight = run(tmp_path / "straight")
    stopped = run(tmp_path / "stopped", StopAtEpochBegin(1))
    assert stopped.state.global_step == STEPS_PER_EPOCH
    saved = torch.load(next((tmp_path / "stopped").glob("*.ckpt")), weights_only=True)
    assert (saved["progress"]["epoch"], saved["progress"]["steps_in_epoch"]) == (1, 0)
    resumed = run(tmp_path / "stopped", resume=True)
    assert resumed.state.global_step == straight.state.global_step == 3 * STEPS_PER_EPOCH
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)
