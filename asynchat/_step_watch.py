"""StepWatch: a run's first steps checked against :meth:`BatchProcessor.step`'s contract.

A custom step runs ``on_batch_begin``/``on_batch_end`` around each batch and, when it trains,
updates through :meth:`BatchProcessor.update` at the end of each accumulation window. One
that did neither trained on without a word: the callbacks' batch hooks never ran (a
MetricUpdater published nothing) or the model never changed. Each is warned of once, at the
first step that shows it; after that the steps run unwatched, at no cost.
"""

from __future__ import annotations

import warnings

from asynchat._phase import Phase
from asynchat._processor import BatchProcessor, RunPhase
from asynchat._state import LoopState


class StepWatch:
    """The run's first steps, until each contract is seen kept (or warned of)."""

    def __init__(self, processor: BatchProcessor, *, batch_hooks: bool, training: bool) -> None:
        self.processor = processor
        self.batches_unchecked = batch_hooks  # (without batch hooks, nothing is lost)
        self.update_unchecked = training

    @property
    def done(self) -> bool:
        return not (self.batches_unchecked or self.update_unchecked)

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        """The processor's step, with the phases it runs recorded and checked."""
        seen: set[Phase] = set()

        def recorded(phase: Phase) -> None:
            seen.add(phase)
            run_phase(phase)

        self.processor.step(state, recorded)
        kind = type(self.processor).__name__
        if self.batches_unchecked:
            self.batches_unchecked = False
            if Phase.ON_BATCH_END not in seen:
                warnings.warn(
                    f"{kind}.step ran no on_batch_end phase in the run's first step: the "
                    "callbacks' batch hooks (a MetricUpdater's updates) do not run. Call "
                    "run_phase(Phase.ON_BATCH_BEGIN) before each batch's forward and "
                    "run_phase(Phase.ON_BATCH_END) after its backward",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self.update_unchecked and self.processor.update_due(state):
            self.update_unchecked = False
            if Phase.ON_BEFORE_UPDATE not in seen:
                warnings.warn(
                    f"{kind}.step made no update through self.update(state, run_phase) at "
                    f"global step {state.global_step}, where one was due: the model does not "
                    "train (or an optimizer stepped by hand skips on_before_update: "
                    "GradClip, and the grad scaler's unscaling). Call self.update at the end "
                    "of each step (self.update_each for several optimizers)",
                    RuntimeWarning,
                    stacklevel=2,
                )
