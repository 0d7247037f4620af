"""The one rule for "every n steps" and "every n epochs", used by every shipped callback, and
:func:`every`, the same rule as a decorator for a hook of one's own."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from asynchat._checks import positive_int
from asynchat._phase import Phase

if TYPE_CHECKING:
    from asynchat._state import LoopState

F = TypeVar("F", bound=Callable[..., object])

_STEP_PHASES = frozenset({
    Phase.ON_STEP_BEGIN, Phase.ON_BATCH_BEGIN, Phase.ON_BATCH_END, Phase.ON_BEFORE_UPDATE,
    Phase.ON_STEP_END,
})  # fmt: skip
_EPOCH_PHASES = frozenset({Phase.ON_EPOCH_BEGIN, Phase.ON_EPOCH_END})
_RULE = "__asynchat_every__"  # the attribute @every sets on the hook's function


def every_n_steps(state: LoopState, n: int | None) -> bool:
    """At ``on_step_end``: whether an every-``n``-steps action is due (``global_step`` counts
    the steps done, so the first is due after step ``n``); never when ``n`` is None."""
    return n is not None and state.global_step % n == 0


class UpdateDue:
    """An every-``n``-steps action that acts on the weights or saves them, held inside a
    gradient-accumulation window to the window's last step (``state.accumulating`` False):
    only there have the weights changed, and only there is the state whole (the window's
    gradients are in no checkpoint). Without accumulation, :func:`every_n_steps` itself."""

    def __init__(self) -> None:
        self.pending = False

    def __call__(self, state: LoopState, n: int | None) -> bool:
        """At ``on_step_end``: whether the action is due now."""
        return self.hold(state, every_n_steps(state, n))

    def hold(self, state: LoopState, due: bool) -> bool:
        """At ``on_step_end``: whether an action ``due`` now, or held since, is due now."""
        self.pending = self.pending or due
        if self.pending and not state.accumulating:
            self.pending = False
            return True
        return False


def every_n_epochs(state: LoopState, n: int | None) -> bool:
    """At ``on_epoch_end``: whether an every-``n``-epochs action is due. Only a complete
    epoch counts: one cut short by ``stop()`` is acted on by the run that finishes it."""
    return n is not None and state.epoch_complete and (state.epoch + 1) % n == 0


def every(*, steps: int | None = None, epochs: int | None = None) -> Callable[[F], F]:
    """Run the decorated hook only every ``steps`` steps or every ``epochs`` epochs.

    The loop decides on its compute thread whether the hook is due, so on the steps between,
    an ``async def`` hook costs no hop to the event loop (and a ``def`` hook no call)::

        class Report(Callback):
            @every(steps=100)
            async def on_step_end(self, state):  # after steps 100, 200, ...
                await client.post("/progress", json={"step": state.global_step})

    The rule is the shipped callbacks' (``LossMonitor(every_n_steps=...)``): ``steps=n`` runs
    the hook for every n-th step of the loop (``global_step`` n, 2n, ..., counted across
    epochs and resumes), at any step-level phase (``on_step_begin`` to ``on_step_end``);
    ``epochs=n`` runs it at ``on_epoch_begin`` of every n-th epoch, or at ``on_epoch_end``
    of every n-th epoch that ran to its end (an epoch cut short by ``stop()`` is acted on by
    the run that finishes it). (Checkpoint and ExponentialMovingAverage hold theirs to the
    end of a gradient-accumulation window: :class:`UpdateDue`.)
    """
    if (steps is None) == (epochs is None):
        raise TypeError(
            f"every() takes one of steps=... or epochs=..., got steps={steps!r}, epochs={epochs!r}"
        )
    positive_int("steps", steps, allow_none=True)
    positive_int("epochs", epochs, allow_none=True)
    rule = Every(steps, epochs)

    def mark(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@every(...) decorates a hook method, got {fn!r}")
        setattr(fn, _RULE, rule)
        return fn

    return mark


def rule_of(hook: Callable[..., object]) -> Every | None:
    """The :func:`every` rule a hook method carries, or None."""
    return getattr(hook, _RULE, None)


@dataclasses.dataclass(frozen=True)
class Every:
    """What :func:`every` asks of a hook: one of ``steps`` or ``epochs``."""

    steps: int | None
    epochs: int | None

    def __str__(self) -> str:
        return f"@every(steps={self.steps})" if self.steps else f"@every(epochs={self.epochs})"

    def due(self, phase: Phase, hook: str) -> Callable[[LoopState], bool]:
        """Whether the hook ``hook`` at ``phase`` is due, as a test of the loop's state."""
        if self.steps is not None and phase in _STEP_PHASES:
            n = self.steps
            if phase is Phase.ON_STEP_END:  # the step is counted in global_step already
                return lambda state: every_n_steps(state, n)
            return lambda state: (state.global_step + 1) % n == 0
        if self.epochs is not None and phase in _EPOCH_PHASES:
            n = self.epochs
            if phase is Phase.ON_EPOCH_END:
                return lambda state: every_n_epochs(state, n)
            return lambda state: (state.epoch + 1) % n == 0
        if self.steps is not None:
            where = "step-level hooks (on_step_begin .. on_step_end)"
        else:
            where = "on_epoch_begin and on_epoch_end"
        raise TypeError(f"{hook}: {self} applies to {where} only, not to {phase.value}")
