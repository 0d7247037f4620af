"""EarlyStopping and TerminateOnNaN: decisions that end the loop."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from asynchat._callback import Callback
from asynchat._checks import metric_name, positive_int, real
from asynchat._errors import AsynchatError
from asynchat._every import every_n_steps
from asynchat._state import LoopState
from asynchat.callbacks._monitor import Monitor
from asynchat.callbacks._stats import step_losses


class EarlyStopping(Callback):
    """Stops the loop when ``state.metrics[monitor]`` has not improved for ``patience`` checks.

    Checked at the end of each complete epoch that has a new value of the metric (list it
    after the :class:`Validation` that publishes it): with a Validation every few epochs,
    ``patience`` counts validations, and an epoch without one is not a check. A misspelled
    ``monitor`` (``val/los`` beside ``val/loss``) is an error at the first check; one never
    published in a run that went to its end is a warning there. An improvement is a
    change beyond ``min_delta`` in the direction of ``mode``. The loop ends through
    ``stop()``, so ``fit()`` returns normally, with ``state.stop_reason`` saying why. Its
    state is kept in checkpoints (a resumed run does not check a value again); an instance
    reused by a new run (not a resumed one) starts afresh.

    In a distributed trainer a stop is agreed by every rank, so one rank's is enough: on a
    metric that is each rank's own (LossMonitor's), the first rank whose value stops
    improving stops them all. Checkpoints keep rank 0's state, which every rank resumes
    with; monitor a metric agreed over the ranks (Validation's) for a resumed run that
    stops where the uninterrupted one does.
    """

    def __init__(
        self,
        monitor: str,
        *,
        patience: int = 3,
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        metric_name("monitor", monitor)
        positive_int("patience", patience)
        real("min_delta", min_delta)
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_checks = 0
        self._metric = Monitor(
            f"EarlyStopping(monitor={monitor!r})", monitor, mode=mode,
            does="stop the run while it improves",
        )  # fmt: skip

    def on_loop_begin(self, state: LoopState) -> None:
        self._metric.refuse_opposite_mode(state)
        if self._metric.begin(state):  # reused by a new run: another model's best
            self.best, self.bad_checks = None, 0

    def on_epoch_end(self, state: LoopState) -> None:
        if not state.epoch_complete:
            return  # a cut-short epoch is judged once, when the resumed run ends it
        value = self._metric.new_value(state)
        if value is None:
            return  # no validation since the last check
        if self.best is None or self._improved(value, self.best):
            self.best, self.bad_checks = value, 0
            return
        self.bad_checks += 1
        if self.bad_checks >= self.patience:
            state.loop.stop(
                f"early stopping: {self.monitor} did not improve on {self.best:.6g} for "
                f"{self.patience} check(s)"
            )

    def on_loop_end(self, state: LoopState) -> None:
        self._metric.warn_if_unseen(state)

    def _improved(self, value: float, best: float) -> bool:
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best, "bad_checks": self.bad_checks, "acted_at": self._metric.acted_at,
            "monitor": self.monitor, "mode": self.mode,
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run resumed with another ``monitor`` or ``mode`` starts afresh (with a
        warning): the saved best is another metric's (a best accuracy of 0.95 taken for
        the best loss, no loss improved on it, and the run stopped after ``patience``)."""
        if self._metric.of_another(state_dict, mode=self.mode):
            self.best, self.bad_checks = None, 0
            return
        self.best, self.bad_checks = state_dict["best"], state_dict["bad_checks"]
        self._metric.acted_at = state_dict.get("acted_at")  # absent from older checkpoints


class NonFiniteLossError(AsynchatError, FloatingPointError):
    """The training loss became NaN or infinite."""


class TerminateOnNaN(Callback):
    """Ends the loop with :class:`NonFiniteLossError` when the loss becomes NaN or infinite
    (``state.loss``, and each of ``state.losses`` in a step with several updates).

    Each step's check stays on the device (no host sync): the first bad step is recorded in
    a device tensor. The host looks every ``check_every_n_steps`` steps and at each epoch's
    end, so the error (naming the first bad step) comes at most that many steps late.
    """

    every_rank = True

    def __init__(self, *, check_every_n_steps: int = 20) -> None:
        positive_int("check_every_n_steps", check_every_n_steps)
        self.check_every_n_steps = check_every_n_steps

    def on_loop_begin(self, state: LoopState) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=state.device)
        self.first_value = torch.zeros((), device=state.device)

    def on_step_end(self, state: LoopState) -> None:
        losses = [loss.float() for loss in step_losses(state).values()]
        if not losses:
            return
        # With several (state.losses), their sum: NaN or infinite when any of them is.
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        new = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(new, state.global_step, self.first_bad)
        self.first_value = torch.where(new, loss, self.first_value)
        if every_n_steps(state, self.check_every_n_steps):
            self.check(state)

    def on_epoch_end(self, state: LoopState) -> None:
        self.check(state)

    def check(self, state: LoopState) -> None:
        step = int(self.first_bad)  # host sync, every check_every_n_steps steps
        if state.loop.any_rank(step >= 0):  # all ranks end together, none waits in a collective
            if step < 0:
                raise NonFiniteLossError(
                    f"the loss became NaN or infinite on another rank by global step "
                    f"{state.global_step} (epoch {state.epoch})"
                )
            value = float(self.first_value)
            kind = "NaN" if math.isnan(value) else "infinite"
            raise NonFiniteLossError(
                f"the loss became {kind} ({value}) at global step {step} (epoch {state.epoch}); "
                "lower the learning rate, clip gradients (GradClip) or check the data"
            )
