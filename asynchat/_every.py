"""The one rule for "every n steps" and "every n epochs", used by every shipped callback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asynchat._state import LoopState


def every_n_steps(state: LoopState, n: int | None) -> bool:
    """At ``on_step_end``: whether an every-``n``-steps action is due (``global_step`` counts
    the steps done, so the first is due after step ``n``); never when ``n`` is None."""
    return n is not None and state.global_step % n == 0


def every_n_epochs(state: LoopState, n: int | None) -> bool:
    """At ``on_epoch_end``: whether an every-``n``-epochs action is due. Only a complete
    epoch counts: one cut short by ``stop()`` is acted on by the run that finishes it."""
    return n is not None and state.epoch_complete and (state.epoch + 1) % n == 0
