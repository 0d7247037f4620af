"""The loop's state: what callbacks and batch processors read and write."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from asynchat._events import LoopStatus
from asynchat._handle import LoopHandle
from asynchat._phase import Phase

__all__ = ["LoopState", "LoopStatus", "Metrics"]


class Metrics(dict[str, float]):
    """``state.metrics``: a dict of the last published values that also remembers the global
    step at which each was set, so a reader can tell a fresh value from an old one (a
    checkpoint saved between validations must not be ranked by the last validation's loss).
    """

    def __init__(self, clock: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self._clock = clock
        self._steps: dict[str, int] = {}
        self._per_rank: set[str] = set()
        self.version = 0  # bumped at every change: a reader can skip an unchanged dict
        # Which way is better ("max" or "min"), for metrics whose publisher knows it (a
        # torchmetrics metric's higher_is_better; a loss), and who publishes each, as
        # declared when the loop begins (declare()).
        self.better: dict[str, str] = {}
        self._publishers: dict[str, object] = {}

    def __setitem__(self, name: str, value: float) -> None:
        super().__setitem__(name, value)
        self._steps[name] = self._clock()
        self._per_rank.discard(name)
        self.version += 1

    def update(self, *args: Any, **kwargs: Any) -> None:
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def update_per_rank(self, values: Mapping[str, float]) -> None:
        """Set ``values`` that are this rank's own in a distributed trainer: measured on its
        data or its clock alone (LossMonitor's means of its losses, StatsMonitor's timings),
        so each rank's differ. Shown and logged like any other; refused where every rank
        must act alike (an LRSchedule's ``monitor``). Set again with ``[]`` or
        :meth:`update`, a name counts as the same on every rank."""
        self.update(values)
        self._per_rank.update(values)

    def declare(self, name: str, publisher: object, *, better: str | None = None) -> None:
        """``publisher`` (a callback, as the loop begins) will publish ``name``, which is
        better ``"max"`` or ``"min"`` if it knows. A name two publishers declare is
        refused: the later one's values overwrote the earlier's, silently (a trainer's
        MetricUpdater with prefix="val/" beside its Validation published one "val/acc")."""
        if better not in (None, "max", "min"):
            raise ValueError(f"better must be 'max', 'min' or None, got {better!r}")
        first = self._publishers.setdefault(name, publisher)
        if first is not publisher:
            raise ValueError(
                f"two callbacks publish {name!r}: {_publisher(first)} and "
                f"{_publisher(publisher)}; the later one's values would overwrite the "
                "earlier one's: give one of them another prefix (or name)"
            )
        if better is not None:
            self.better[name] = better

    def is_per_rank(self, name: str) -> bool:
        """Whether ``name``'s value is this rank's own (see :meth:`update_per_rank`)."""
        return name in self._per_rank

    def restore(
        self, saved: Mapping[str, float], *, step: int, steps: Mapping[str, int] | None = None
    ) -> None:
        """Put back values saved in a checkpoint at global step ``step``, each measured at
        its step in ``steps`` (checkpoints before those were kept: at ``step``, older than
        anything measured after the resume)."""
        super().update(saved)
        measured = steps or {}
        self._steps.update({name: int(measured.get(name, step)) for name in saved})
        self.version += 1

    def steps(self) -> dict[str, int]:
        """The global step at which each metric was last set (for checkpoints)."""
        return dict(self._steps)

    def measured_at(self, name: str) -> int | None:
        """The global step at which ``name`` was last set (None: unknown, or never)."""
        return self._steps.get(name)


def _publisher(callback: object) -> str:
    """A metric's publisher as a message names it: its class, and its prefix if it has one."""
    prefix = getattr(callback, "prefix", None)
    kind = type(callback).__name__
    return kind if prefix is None else f"{kind}(prefix={prefix!r})"


@dataclasses.dataclass(slots=True, eq=False, repr=False)
class LoopState:
    """Everything a callback sees; one instance per loop, updated in place as the loop runs.

    Counters:

    - ``epoch``: index of the current epoch (0-based); after the loop, of the last epoch run.
    - ``step``: index of the current step within its epoch (0-based).
    - ``global_step``: steps completed so far in the loop. It is incremented as soon as the batch
      processor has finished a step, so ``on_step_end`` of the first step sees 1 and
      ``on_loop_end`` sees the total.
    - ``batch_idx``: index of the current batch within the step (always 0 for
      :class:`~asynchat.BasicBatchProcessor`).

    ``epoch_complete`` tells ``on_epoch_end`` whether the epoch's data ran out (True) or the
    epoch was cut short by ``stop()`` or by ``num_steps`` (False). A cut-short epoch is
    finished by the run that resumes from its checkpoint, whose ``on_epoch_end`` then sees
    True; so epoch-level work that must happen once per epoch (an epoch LR schedule,
    validation, early stopping, epoch checkpoints: every shipped callback) acts only when it
    is True.

    ``accumulating`` is True after a training step whose gradients wait for a later update
    (inside a gradient-accumulation window: the processor's ``update_due`` was False). Such
    gradients are in no checkpoint, so ``stop()`` and a cancellation end the loop at the
    window's last step, and :class:`~asynchat.callbacks.Checkpoint` saves there.

    ``data_time`` is how long the current step waited for its batch (seconds), for
    :class:`~asynchat.callbacks.StatsMonitor`.

    Optimizers: ``optimizers`` maps each optimizer's name to it (a Trainer given one
    optimizer names it ``"default"``; a Predictor has none). ``optimizer`` is the only one when
    there is one; with several, it is the one whose update is in progress or came last (so
    ``on_before_update`` sees the optimizer about to step), with ``optimizer_name`` its name.

    ``loss`` is the step's loss as the batch processor defines it; ``losses`` holds named
    per-update losses of a step that makes several updates (e.g. ``{"d": ..., "g": ...}``),
    set by the processor and emptied by the loop before each step.

    ``batch``, ``outputs``, ``loss`` and ``losses`` hold device tensors. Reading their values
    on the host from an ``async def`` hook goes through ``await state.loop.to_host(...)``,
    which never blocks the event loop.
    """

    loop: LoopHandle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    training: bool
    num_epochs: int | None
    num_steps: int | None
    steps_per_epoch: int | None = None
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    batch_idx: int = 0
    is_last_step: bool = False
    epoch_complete: bool = False
    accumulating: bool = False
    data_time: float = 0.0
    batch: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)
    optimizer_name: str | None = None
    phase: Phase | None = None
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    stop_reason: str | None = None
    exception: BaseException | None = None

    def __repr__(self) -> str:
        # Where the loop is, never its tensors: formatting a batch or the outputs costs
        # milliseconds, and Python formats this whenever it formats the task that returned
        # it (asyncio.run does, restoring its SIGINT handler, at the end of every fit()).
        phase = self.phase.value if self.phase is not None else None
        return (
            f"LoopState(loop={self.loop.name!r}, epoch={self.epoch}, step={self.step}, "
            f"global_step={self.global_step}, phase={phase!r}, training={self.training}, "
            f"metrics={dict(self.metrics)!r})"
        )
