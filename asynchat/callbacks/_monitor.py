"""A monitored metric, read by callbacks that act on it: each new value once, a misspelled
name at once, a name never published by the end of the run with a warning."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from asynchat._errors import CheckpointWarning
from asynchat._state import LoopState


def measured_at(state: LoopState, name: str) -> int:
    """The global step ``state.metrics[name]`` was measured at (now, if not known)."""
    step = state.metrics.measured_at(name)
    return state.global_step if step is None else step


def misspelled(state: LoopState, name: str) -> bool:
    """Whether a missing metric ``name`` looks misspelled: another metric with its prefix
    exists (``val/los`` beside ``val/loss``), so it is not just not published yet."""
    prefix = name.rpartition("/")[0]
    return any(key.rpartition("/")[0] == prefix for key in state.metrics)


def refuse_opposite_mode(owner: str, name: str, mode: str, state: LoopState, does: str) -> None:
    """Refuse ``mode`` where the metric's publisher says the other way is better: with
    ``Checkpoint(monitor="val/accuracy")`` left at ``mode="min"``, the worst checkpoint was
    kept as the best and the better ones pruned, silently. ``does``: what the owner would do
    with the worst values taken for the best."""
    better = state.metrics.better.get(name)
    if better is not None and better != mode:
        way = "higher" if better == "max" else "lower"
        raise ValueError(
            f"{owner}: {name!r} is better {way} (as its publisher says: a torchmetrics "
            f"metric's higher_is_better, or a loss), so mode={mode!r} would take its worst "
            f"values for its best and {does}; pass mode={better!r}"
        )


class Monitor:
    """``state.metrics[name]`` as a callback that acts on each value once reads it.

    A value is new when it was measured after the one last acted on (``acted_at``, the global
    step it was measured at; kept in the callback's checkpoint state), so a check between two
    validations does not count the last one again, and a resumed run does not act again on a
    value it acted on before the checkpoint. A name missing while a metric with its prefix
    exists (``val/los`` beside ``val/loss``) is a misspelling: a ``KeyError`` naming the
    metrics. Missing otherwise, it is not published yet (a Validation every few epochs):
    nothing to act on; a run that goes to its end without ever seeing it warns
    (:meth:`warn_if_unseen`).

    ``alike_on_ranks``: what the owner does with a value must be alike on every rank of a
    distributed trainer (a learning rate), so a value that is each rank's own
    (``state.metrics.update_per_rank``) is refused with a ``ValueError``.
    """

    def __init__(
        self,
        owner: str,
        name: str,
        *,
        alike_on_ranks: bool = False,
        mode: str | None = None,
        does: str = "act on them",
    ) -> None:
        self.owner = owner  # e.g. "EarlyStopping(monitor='val/loss')", for messages
        self.name = name
        self.alike_on_ranks = alike_on_ranks
        self.mode = mode  # which way the owner takes as better, checked against the metric's
        self.does = does  # what the owner does with the best values, for the message
        self.acted_at: int | None = None
        self._seen = False  # in this run

    def begin(self, state: LoopState) -> bool:
        """At the loop's begin: a value acted on after this step was another run's (the
        instance is reused by a new loop, whose steps count from 0 again); forget it, and
        return True so the owner forgets what it made of it."""
        if self.acted_at is not None and self.acted_at > state.global_step:
            self.acted_at = None
            return True
        return False

    def of_another(self, saved: Mapping[str, Any], **settings: object) -> bool:
        """Whether the owner's state from a checkpoint (``saved``, which records the metric
        as ``monitor`` and the owner's ``settings``, e.g. its mode) was made on another
        metric, or with other settings: then what it holds (a best value, a count of
        checks) is no value of this one, and it is said with a :class:`CheckpointWarning`
        (the owner starts afresh). Older checkpoints record neither: taken as this one's."""
        ours = {"monitor": self.name, **settings}
        theirs = {key: saved.get(key, value) for key, value in ours.items()}
        if theirs == ours:
            return False
        described = ", ".join(f"{key}={value!r}" for key, value in theirs.items())
        warnings.warn(
            f"{self.owner}: the checkpoint's state of it was made with {described}: what it "
            "holds is no value of this metric, so it starts afresh",
            CheckpointWarning,
            stacklevel=4,
        )
        self.acted_at = None
        return True

    def new_value(self, state: LoopState) -> float | None:
        """The metric's value if it is new (then it counts as acted on), else None."""
        metrics = state.metrics
        if self.name not in metrics:
            self._missing(state)
            return None
        self._seen = True
        step = measured_at(state, self.name)
        if self.acted_at is not None and step <= self.acted_at:
            return None
        if self.alike_on_ranks and metrics.is_per_rank(self.name):
            self._refuse_per_rank(state)
        self.refuse_opposite_mode(state)
        self.acted_at = step
        return float(metrics[self.name])

    def refuse_opposite_mode(self, state: LoopState) -> None:
        """As the loop begins (where the publisher is listed first) and at each value: the
        owner's ``mode`` against the way the metric's publisher says is better."""
        if self.mode is not None:
            refuse_opposite_mode(self.owner, self.name, self.mode, state, self.does)

    def _refuse_per_rank(self, state: LoopState) -> None:
        loop = state.loop
        if loop.spans_ranks and loop.world_size > 1:
            raise ValueError(
                f"{self.owner}: {self.name!r} is each rank's own value (measured on its data "
                "or its clock alone, as LossMonitor's and StatsMonitor's are), so each rank "
                "would act on another value and the ranks' training would drift apart. "
                "Monitor a metric that is the same on every rank: Validation's (val/loss), or "
                "a MetricUpdater's (torchmetrics agrees its values over the ranks)"
            )

    def _missing(self, state: LoopState) -> None:
        if misspelled(state, self.name):
            raise KeyError(
                f"{self.owner}: no such metric at global step {state.global_step}; the "
                f"metrics are {sorted(state.metrics)}. Fix the name, or list the callback "
                "that publishes it (e.g. Validation) before this one"
            )

    def warn_if_unseen(self, state: LoopState) -> None:
        """At the end of a run that went to its end: warn if the metric never appeared in
        it, so its owner never acted (a name misspelled beyond its prefix, ``valid/loss``
        for ``val/loss``; no Validation, or none due before the run's end). A run stopped or
        cancelled says nothing: the metric may not have been due yet."""
        seen, self._seen = self._seen or self.name in state.metrics, False
        ended = state.exception is None and state.stop_reason is None
        if not seen and ended:
            published = f"metrics: {sorted(state.metrics)}" if state.metrics else "no metric"
            warnings.warn(
                f"{self.owner}: {self.name!r} was never published in this run ({published}), "
                "so it never acted. Check the name, and that the callback that publishes it "
                "(e.g. Validation) is there and runs before the run ends",
                stacklevel=3,
            )
