"""LRSchedule: drives any torch.optim.lr_scheduler per step or per epoch, with warmup."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from asynchat._callback import Callback
from asynchat._checks import metric_name, positive_int, real
from asynchat._errors import CheckpointError, CheckpointWarning
from asynchat._settings import changed, plain
from asynchat._state import LoopState
from asynchat.callbacks._monitor import Monitor

SchedulerFactory = Callable[[torch.optim.Optimizer], LRScheduler | ReduceLROnPlateau]


def set_lr(group: dict[str, Any], lr: float | torch.Tensor) -> None:
    """Set a param group's learning rate; a tensor one in place (a CUDA graph reads it)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A copy of everything in a param group but its parameters (tensors cloned)."""
    return {
        key: value.clone() if isinstance(value, torch.Tensor) else value
        for key, value in group.items()
        if key != "params"
    }


def _put_back(group: dict[str, Any], saved: dict[str, Any]) -> None:
    """Set a param group's hyper-parameters to ``saved`` (:func:`_hyperparameters`); a tensor
    one in place, as :func:`set_lr` does."""
    for key, value in saved.items():
        current = group.get(key)
        if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
            current.copy_(value)
        else:
            group[key] = value


class LRSchedule(Callback):
    """Steps a learning-rate scheduler after every optimizer update (``interval="step"``) or
    epoch.

    Per step, the scheduler counts updates, as torch's schedulers expect (``scheduler.step()``
    after ``optimizer.step()``): with ``grad_accumulation_steps=k`` it steps at the last step
    of each window, every k steps, so give its lengths (``total_steps``, ``warmup_steps``)
    in updates, e.g. ``num_steps // k``.

    With ``interval="epoch"`` the scheduler steps at the end of each *complete* epoch: an
    epoch cut short by ``stop()`` steps it once, in the run that resumes and finishes it.

    Metric-driven schedulers such as ``ReduceLROnPlateau`` take ``monitor``: the scheduler is
    stepped once with each new value of ``state.metrics[monitor]``, right after the hook that
    publishes it (list the :class:`Validation` before this callback), at a step's or an
    epoch's end whatever the ``interval``; so its ``patience`` counts validations, never the
    steps or epochs between them. A misspelled ``monitor`` is an error at the first step; one
    never published in a run that went to its end, a warning at its end. Such a scheduler
    without ``monitor`` is refused when the loop begins, before any training. In a
    distributed trainer every rank's scheduler must see the same value at the same step, or
    the ranks would train at different rates and their replicas drift apart: a metric that is
    each rank's own (LossMonitor's, StatsMonitor's) is refused at its first value with a
    ``ValueError``; Validation's and MetricUpdater's are agreed over the ranks.

    The scheduler is built from ``scheduler(optimizer)`` when the loop begins (the optimizer may
    itself come from a factory). A Trainer with several optimizers needs ``optimizer="g"``: the
    name of the one to schedule (one LRSchedule per optimizer). A warmup of ``warmup_steps``
    scheduler steps ramps the rate linearly from ``warmup_start_factor`` times the base rate
    (``warmup="linear"``) or holds it there (``"constant"``), then hands over to the scheduler.
    Per-step scheduling runs on the compute thread, right after the step. The scheduler's state
    is kept in checkpoints.

    HAT's updaters are expressed with the helpers :func:`step_decay`, :func:`cosine`,
    :func:`poly` and :func:`one_cycle`::

        LRSchedule(cosine(total_steps=10_000), warmup_steps=500)

    A tensor learning rate (``lr=torch.tensor(...)``, as a CUDA-graph step needs) is
    updated in place, never replaced.
    """

    every_rank = True
    sets_lr = True

    def __init__(
        self,
        scheduler: SchedulerFactory,
        *,
        interval: Literal["step", "epoch"] = "step",
        warmup_steps: int = 0,
        warmup: Literal["linear", "constant"] = "linear",
        warmup_start_factor: float = 0.01,
        monitor: str | None = None,
        optimizer: str | None = None,
    ) -> None:
        if not callable(scheduler) or _a_scheduler_class_needing_more(scheduler):
            # (A scheduler built on an optimizer, or its class, failed later with torch's
            # "missing 1 required positional argument", naming neither.)
            example = getattr(scheduler, "__name__", type(scheduler).__name__)
            raise TypeError(
                f"scheduler must be a factory scheduler(optimizer), got {scheduler!r}: e.g. "
                f"lambda optimizer: {example}(optimizer, ...), called once the trainer's "
                "optimizer exists"
            )
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        if warmup not in ("linear", "constant"):
            raise ValueError(f"warmup must be 'linear' or 'constant', got {warmup!r}")
        positive_int("warmup_steps", warmup_steps, minimum=0)
        metric_name("monitor", monitor, allow_none=True)
        if monitor is not None and warmup_steps:
            raise ValueError("warmup_steps cannot be combined with a metric-driven monitor=...")
        if optimizer is not None and (not isinstance(optimizer, str) or not optimizer):
            raise ValueError(f"optimizer must be an optimizer's name or None, got {optimizer!r}")
        real("warmup_start_factor", warmup_start_factor)
        if not 0 < warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor!r}")
        self.factory = scheduler
        self.interval = interval
        self.warmup_steps = warmup_steps
        self.warmup = warmup
        self.warmup_start_factor = warmup_start_factor
        self.monitor = monitor
        self.optimizer = optimizer
        self.scheduler: LRScheduler | ReduceLROnPlateau | None = None
        self._loaded: dict[str, Any] | None = None
        self._loaded_class: str | None = None  # the class whose state _loaded is
        self._held = 0  # steps a OneCycleLR did not take, its total_steps made
        self._metric = None
        if monitor:
            self._metric = Monitor(
                f"LRSchedule(monitor={monitor!r})", monitor, alike_on_ranks=True,
                does="lower the learning rate while it improves",
            )  # fmt: skip

    def on_loop_begin(self, state: LoopState) -> None:
        if self._metric is not None:
            self._metric.begin(state)
        optimizer = self._optimizer(state)
        for group in optimizer.param_groups:
            # torch's other schedulers note each group's first rate; ReduceLROnPlateau does
            # not, and an optimizer it had lowered, resumed by a later run of the process,
            # was taken for one built with the lowered rate (a false CheckpointWarning).
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
        restored: list[dict[str, Any]] = []
        if self._loaded is not None:
            # Building schedulers rescales the learning rates, and some set more of each
            # group (OneCycleLR its momentum or Adam's beta1, to their first step's): start
            # from the initial rates so the rebuilt chain matches the saved one, load it, then
            # put back every hyper-parameter the optimizer was restored with, which are the
            # run's whatever steps them (a scheduler's last rate is not, when another
            # LRSchedule steps the same optimizer).
            restored = [_hyperparameters(group) for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                set_lr(group, group.get("initial_lr", group["lr"]))
        main = _built(self.factory(optimizer), optimizer, self.optimizer)
        if isinstance(main, ReduceLROnPlateau) != (self.monitor is not None):
            raise TypeError(
                f"LRSchedule: the scheduler {type(main).__name__} "
                + (
                    "steps on a metric: pass monitor='val/loss' (or another published metric)"
                    if self.monitor is None
                    else f"does not take a metric, so monitor={self.monitor!r} cannot drive it"
                )
            )
        if self.warmup_steps:
            assert not isinstance(main, ReduceLROnPlateau)
            warm: LRScheduler
            if self.warmup == "linear":
                warm = LinearLR(optimizer, self.warmup_start_factor, 1.0, self.warmup_steps)
            else:
                warm = ConstantLR(optimizer, self.warmup_start_factor, self.warmup_steps)
            main = SequentialLR(optimizer, [warm, main], milestones=[self.warmup_steps])
        self.scheduler = main
        if self._metric is not None and isinstance(main, ReduceLROnPlateau):
            self._metric.mode = main.mode  # (its factory's)
            self._metric.refuse_opposite_mode(state)
        if self._loaded is not None:
            self._refuse_another_class(main)
            self._warn_replaced(_settings(main.state_dict()), _settings(self._loaded))
            main.load_state_dict(self._loaded)
            for group, saved in zip(optimizer.param_groups, restored, strict=True):
                _put_back(group, saved)
            self._loaded = None

    def _warn_replaced(self, built: dict[str, Any], saved: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` gives a scheduler the saved settings with its
        position: a run resumed with more epochs kept the cosine's old length (its rate
        at the floor at the saved run's end, and rising again after it) without a word.
        Said, with a :class:`CheckpointWarning`."""
        differ = changed(built, saved)
        if differ:
            warnings.warn(
                f"LRSchedule: the scheduler was built with {', '.join(differ)}: a resumed run "
                "goes on with the checkpoint's (torch's load_state_dict restores a scheduler's "
                "settings with its position), so one resumed with more steps or epochs keeps "
                "the schedule's old length. Give a schedule the whole run's length from the "
                "start",
                CheckpointWarning,
                stacklevel=3,
            )

    def _refuse_another_optimizers(self, saved: str | None) -> None:
        """States are given to a run's LRSchedules by their place among them: two listed
        in another order than the saved run's took each other's (with a LambdaLR, each
        optimizer went on at the other's rate, a hundredfold off here)."""
        if saved is not None and self.optimizer is not None and saved != self.optimizer:
            raise CheckpointError(
                f"LRSchedule(optimizer={self.optimizer!r}): the checkpoint's state in this "
                f"one's place among the LRSchedules drove optimizer {saved!r}: list the "
                "LRSchedules in the order the run that saved it did"
            )

    def _refuse_another_class(self, scheduler: LRScheduler | ReduceLROnPlateau) -> None:
        """A scheduler's state is its own class's: loaded into another, it was taken in
        silently (torch's schedulers update their ``__dict__`` with it), and a StepLR resumed
        where a cosine had run took the cosine's step count and cut the rate a hundredfold
        at once."""
        saved, built = self._loaded_class, _class_of(scheduler)
        if saved is not None and saved != built:
            raise CheckpointError(
                f"LRSchedule: the checkpoint holds the state of a {saved}, which this "
                f"schedule's {built} cannot go on from: resume with the same scheduler (and "
                "warmup), or start a new run from the weights alone "
                "(asynchat.callbacks.load_weights(model, path) before training)"
            )

    def _optimizer(self, state: LoopState) -> torch.optim.Optimizer:
        optimizers = state.optimizers
        if not optimizers:
            raise TypeError("LRSchedule needs a Trainer (the loop has no optimizer)")
        if self.optimizer is None:
            if len(optimizers) > 1:
                raise ValueError(
                    f"LRSchedule: the Trainer has the optimizers {sorted(optimizers)}; name "
                    "the one to schedule, e.g. LRSchedule(..., optimizer='g')"
                )
            return next(iter(optimizers.values()))
        if self.optimizer not in optimizers:
            raise ValueError(
                f"LRSchedule(optimizer={self.optimizer!r}): the loop's optimizers are "
                f"{sorted(optimizers)}"
            )
        return optimizers[self.optimizer]

    def on_step_end(self, state: LoopState) -> None:
        if self._metric is not None or (self.interval == "step" and not state.accumulating):
            self._step(state)

    def on_epoch_end(self, state: LoopState) -> None:
        if self._metric is not None or (self.interval == "epoch" and state.epoch_complete):
            self._step(state)

    def on_loop_end(self, state: LoopState) -> None:
        self._held = 0  # (each run's: an instance reused by a new run is told again)
        if self._metric is not None:
            self._metric.warn_if_unseen(state)

    def _step(self, state: LoopState) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        if self._metric is None:
            assert not isinstance(scheduler, ReduceLROnPlateau)
            if not self._past_its_end(scheduler, state):
                scheduler.step()
            return
        value = self._metric.new_value(state)
        if value is not None:  # once per value: a plateau is measured in validations
            assert isinstance(scheduler, ReduceLROnPlateau)
            scheduler.step(value)

    def _past_its_end(self, scheduler: LRScheduler, state: LoopState) -> bool:
        """Whether a OneCycleLR (alone, or after the warmup) has made its ``total_steps``:
        torch's raises at the next step ("Tried to step N times"), which failed a run longer
        than its schedule there. It holds its last rate instead, with a warning, once."""
        last = scheduler._schedulers[-1] if isinstance(scheduler, SequentialLR) else scheduler
        if not isinstance(last, OneCycleLR) or last.last_epoch + 1 < last.total_steps:
            return False
        # Its last rate is set (the final phase's end); the step after the run's last update
        # would set none that trains, so a run of total_steps updates is not told.
        self._held += 1
        if self._held == 2:
            warnings.warn(
                f"LRSchedule: the OneCycleLR's total_steps ({last.total_steps}) were done "
                f"before global step {state.global_step}, and the run goes on: the learning "
                "rate stays at its last value. Give it the run's number of updates",
                RuntimeWarning,
                stacklevel=2,
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return {}
        state: dict[str, Any] = {
            "scheduler": self.scheduler.state_dict(), "class": _class_of(self.scheduler),
            "optimizer": self.optimizer,
        }  # fmt: skip
        if self._metric is not None:
            state.update(acted_at=self._metric.acted_at, monitor=self.monitor)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A monitored scheduler resumed with another ``monitor`` is built afresh (with a
        warning; the learning rate stays the optimizer's): its best is another metric's.
        One of another class is refused as the loop begins; one of another optimizer's
        schedule here."""
        # Older checkpoints: a monitored one's {"scheduler", "acted_at"} (a ReduceLROnPlateau,
        # the only kind a monitor drives), before that the scheduler's own state.
        ours = "scheduler" in state_dict and ("class" in state_dict or "acted_at" in state_dict)
        plateau = "acted_at" in state_dict and "ReduceLROnPlateau"
        self._loaded_class = state_dict.get("class", plateau or None) if ours else None
        self._refuse_another_optimizers(state_dict.get("optimizer") if ours else None)
        if ours:
            if self._metric is not None and self._metric.of_another(state_dict):
                self._loaded = None
                return
            if self._metric is not None:
                self._metric.acted_at = state_dict.get("acted_at")
            state_dict = state_dict["scheduler"]
        self._loaded = state_dict or None


# What of a scheduler's state is where it is rather than how it was built (ReduceLROnPlateau's
# best and counts; the rates, which the optimizer's own settings are checked for).
_POSITION = frozenset(
    {"last_epoch", "base_lrs", "best", "num_bad_epochs", "cooldown_counter", "mode_worse",
     "lr_lambdas"}
)  # fmt: skip


def _settings(state: Any, where: str = "") -> dict[str, Any]:
    """A scheduler's settings in its ``state_dict()`` (``T_max``, ``step_size``; a warmup's
    chain: ``milestones``, and ``schedulers[i].T_max``...), those of plain values (a
    checkpoint's is read the same way, whatever it holds: a chain in a chain is not)."""
    if not isinstance(state, dict):
        return {}
    found: dict[str, Any] = {}
    for key, value in state.items():
        if key == "_schedulers" and isinstance(value, list) and not where:
            for i, inner in enumerate(value):
                found |= _settings(inner, f"schedulers[{i}].")
        elif _a_setting(key) and plain(value):
            found[where + key.lstrip("_")] = value
    return found


def _a_setting(key: Any) -> bool:
    public = isinstance(key, str) and not key.startswith("_") and key not in _POSITION
    return public or key == "_milestones"


def _class_of(scheduler: LRScheduler | ReduceLROnPlateau) -> str:
    """``"CosineAnnealingLR"``, ``"SequentialLR(LinearLR, LambdaLR)"`` (a warmup's chain)."""
    name = getattr(type(scheduler), "saved_as", type(scheduler).__qualname__)
    if isinstance(scheduler, SequentialLR):
        name += f"({', '.join(_class_of(s) for s in scheduler._schedulers)})"
    return name


def step_decay(step_size: int, gamma: float = 0.1) -> SchedulerFactory:
    """Multiply the rate by ``gamma`` every ``step_size`` scheduler steps (HAT's StepDecay)."""
    positive_int("step_size", step_size)
    return lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)


class _CosineToFloor(CosineAnnealingLR):
    """torch's CosineAnnealingLR, held at ``eta_min`` after its ``T_max`` steps, as HAT's
    Cosine is: torch's rises back to the base rate over the next ``T_max`` (a run longer
    than its schedule trained its last steps at the full rate again, silently). Its state
    is torch's, so checkpoints name it as torch's class (older ones resume with it)."""

    saved_as = "CosineAnnealingLR"

    def get_lr(self) -> list[float | torch.Tensor]:
        if self.last_epoch > self.T_max:
            return [self.eta_min for _ in self.optimizer.param_groups]
        return super().get_lr()


def cosine(total_steps: int, min_lr: float = 0.0) -> SchedulerFactory:
    """Cosine annealing to ``min_lr`` over ``total_steps`` scheduler steps, then ``min_lr``
    (HAT's Cosine)."""
    positive_int("total_steps", total_steps)
    return lambda optimizer: _CosineToFloor(optimizer, total_steps, eta_min=min_lr)


def poly(total_steps: int, power: float = 1.0) -> SchedulerFactory:
    """``(1 - t / total_steps) ** power`` decay to zero (HAT's Polynomial)."""
    positive_int("total_steps", total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.PolynomialLR(optimizer, total_steps, power)


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3) -> SchedulerFactory:
    """Leslie Smith's one-cycle policy (HAT's OneCycle); use without extra warmup."""
    positive_int("total_steps", total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr, total_steps=total_steps, pct_start=pct_start
    )


def constant() -> SchedulerFactory:
    """The base rate throughout (for warmup-only schedules)."""
    return lambda optimizer: LambdaLR(optimizer, lambda _: 1.0)


__all__ = ["LRSchedule", "constant", "cosine", "one_cycle", "poly", "step_decay"]


def _a_scheduler_class_needing_more(scheduler: object) -> bool:
    """Whether ``scheduler`` is a class that cannot be built from the optimizer alone (such as
    ``StepLR``, which needs ``step_size``)."""
    if not isinstance(scheduler, type):
        return False
    try:
        inspect.signature(scheduler).bind(object())
    except TypeError:
        return True
    except ValueError:  # (no signature to read)
        return False
    return False


def _built(
    scheduler: object, optimizer: torch.optim.Optimizer, name: str | None
) -> LRScheduler | ReduceLROnPlateau:
    """What ``scheduler(optimizer)`` returned, if it schedules ``optimizer``. A factory that
    built one and forgot to return it (None), or that built it over another optimizer (one
    of an earlier run, in its closure), left the loop's learning rate as it was, silently."""
    what = f"the optimizer {name!r}" if name is not None else "the trainer's optimizer"
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise TypeError(
            f"LRSchedule: scheduler(optimizer) returned {scheduler!r}, not a torch learning "
            "rate scheduler (a def that builds one must return it): e.g. LRSchedule(lambda "
            "opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000))"
        )
    if scheduler.optimizer is not optimizer:
        kind = type(scheduler).__name__
        raise ValueError(
            f"LRSchedule: scheduler(optimizer) returned a {kind} over another optimizer than "
            f"the one it was given ({what}), whose rate it would never change: build it "
            f"on its argument, LRSchedule(lambda opt: {kind}(opt, ...))"
        )
    return scheduler
