"""MetricUpdater: torchmetrics metrics updated on the compute thread, on the device."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch

from asynchat._callback import Callback
from asynchat._checks import function, positive_int, text
from asynchat._errors import CheckpointWarning, add_note
from asynchat._every import every_n_steps
from asynchat._processor import described, split_batch
from asynchat._settings import class_name
from asynchat._state import LoopState

if TYPE_CHECKING:
    import torchmetrics

Select = Callable[[LoopState], tuple[Any, Any]]

# Before, a model returning a dict (Hugging Face's, loss_fn=model_loss) met torchmetrics'
# "'dict' object has no attribute 'ndim'", which did not say what to do.
_SELECT_HINT = (
    "asynchat: the model's outputs are a {}, which the metrics got as they are: pass "
    "select=... (MetricUpdater, Validation) to take what to score out of them, e.g. "
    "select=lambda s: (s.outputs['logits'], s.batch['labels'])"
)

# The most values of a metric's states a checkpoint keeps (64 MB of float32): a state that
# grows with the data would make every save copy the epoch's predictions to the host.
MAX_SAVED_STATE = 1 << 24


def outputs_and_targets(state: LoopState) -> tuple[Any, Any]:
    """``(state.outputs, targets of state.batch)``: what most metrics are updated with."""
    _, targets = split_batch(state.batch)
    return state.outputs, targets


class MetricUpdater(Callback):
    """Updates ``torchmetrics`` metrics at ``on_batch_end`` and publishes them to ``state.metrics``.

    Updates run on the compute thread and stay on the device. Values are computed (one host
    sync, on the compute thread) every ``log_every_n_steps`` steps, if given, and at the end of
    each epoch, then published as ``state.metrics[prefix + name]``; the metrics are reset at the
    start of each epoch.

    The epoch so far is kept in checkpoints (each metric's states), so a run stopped inside
    an epoch and resumed publishes at its end what an uninterrupted run does; in a
    distributed trainer each rank's states, which count its own shard of the data
    (``state_per_rank``; torchmetrics sums them over the ranks when it computes), and each
    rank resumes its own. Not a state that grows with the data past
    :data:`MAX_SAVED_STATE` values (exact AUROC's predictions: every save would copy them
    to the host), with a warning once; nor a distributed job's resumed on another number
    of ranks (a warning says so). Such a resumed epoch's values cover the batches after
    the resume.

    Whether an update syncs is the metric's doing: torchmetrics' classification defaults
    (``validate_args=True``; ``average="macro"``, which counts with ``bincount``) read values
    on the host at every update on CUDA. For sync-free steps build them with
    ``validate_args=False`` and ``average="micro"`` (e.g.
    ``MulticlassAccuracy(10, average="micro", validate_args=False)``).

    Args:
        metrics: ``{"accuracy": torchmetrics.classification.MulticlassAccuracy(10), ...}``,
            or a ``torchmetrics.MetricCollection`` (its metrics by its keys, each updated on
            its own); moved to the loop's device when the loop begins.
        prefix: prepended to each name in ``state.metrics`` (``"train/"``).
        log_every_n_steps: also compute every n steps (an epoch-so-far value).
        select: ``select(state) -> (preds, target)`` for ``metric.update``; default
            ``(state.outputs, targets of the batch)``.
    """

    every_rank = True
    state_per_rank = True

    def __init__(
        self,
        metrics: Mapping[str, torchmetrics.Metric] | torchmetrics.MetricCollection,
        *,
        prefix: str = "train/",
        log_every_n_steps: int | None = None,
        select: Select = outputs_and_targets,
    ) -> None:
        import torchmetrics

        if isinstance(metrics, torchmetrics.MetricCollection):
            # (Refused before as no mapping.) Its metrics, each updated on its own: the
            # collection's shared-state groups are an optimisation of its own update().
            metrics = dict(metrics.items())
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"metrics must be a mapping of names to torchmetrics.Metric, got {metrics!r}"
            )
        if not metrics:
            raise ValueError("metrics must name at least one torchmetrics.Metric")
        names: dict[int, str] = {}
        for name, metric in metrics.items():
            if isinstance(cast(object, metric), torchmetrics.MetricCollection):
                raise TypeError(
                    f"metrics[{name!r}] is a MetricCollection: pass the collection itself "
                    "as metrics (its names are its keys)"
                )
            if not isinstance(metric, torchmetrics.Metric):
                raise TypeError(f"metrics[{name!r}] must be a torchmetrics.Metric, got {metric!r}")
            first = names.setdefault(id(metric), name)
            if first != name:
                raise ValueError(
                    f"metrics[{first!r}] and metrics[{name!r}] are one "
                    f"{type(metric).__name__} instance: it would count each batch twice; "
                    "give each name its own"
                )
        positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        text("prefix", prefix)
        function("select", select, "select(state) -> (preds, target)")
        self.metrics = dict(metrics)
        self.prefix = prefix
        self.log_every_n_steps = log_every_n_steps
        self.select = select
        self._loaded: dict[str, Any] | None = None
        self._warned_large: set[str] = set()

    def held_objects(self) -> dict[str, torchmetrics.Metric]:
        # A metric keeps its run's counts: one in a trainer's MetricUpdater and its
        # Validation's metrics had the validations reset and count in it (train/acc 0.26,
        # not 0.36, in a probe).
        return {f"metrics[{name!r}]": metric for name, metric in self.metrics.items()}

    def on_loop_begin(self, state: LoopState) -> None:
        for metric in self.metrics.values():
            metric.to(state.device)
        self.declare(state, self)

    def declare(self, state: LoopState, publisher: Callback) -> None:
        """Declare the names ``publisher`` (this one, or the Validation it serves) publishes
        in ``state.metrics``, and which way each is better where the metric says
        (``higher_is_better``), for the callbacks that rank by it (their ``mode``)."""
        for name, metric in self.metrics.items():
            higher = getattr(metric, "higher_is_better", None)
            better = ("max" if higher else "min") if isinstance(higher, bool) else None
            state.metrics.declare(self.prefix + name, publisher, better=better)

    def on_epoch_begin(self, state: LoopState) -> None:
        self.reset()
        loaded, self._loaded = self._loaded, None
        if loaded and state.step > 0:  # resumed inside the epoch the states were saved in
            for name, metric in self.metrics.items():
                if name in loaded and _fits(name, metric, loaded[name]):
                    _restore(metric, loaded[name], state.device)

    def on_batch_end(self, state: LoopState) -> None:
        selected = self.select(state)
        if not isinstance(selected, (tuple, list)) or len(selected) != 2:
            # (Unpacked as it was: "too many values to unpack (expected 2)", naming nothing.)
            raise TypeError(
                f"{type(self).__name__}: select(state) must return (preds, target) for the "
                f"metrics' update(preds, target), got {_described(selected)}"
            )
        preds, target = selected
        for metric in self.metrics.values():
            try:
                metric.update(preds, target)
            except Exception as exc:
                if self.select is outputs_and_targets and not isinstance(preds, torch.Tensor):
                    add_note(exc, _SELECT_HINT.format(type(preds).__name__))
                raise

    def on_step_end(self, state: LoopState) -> None:
        if every_n_steps(state, self.log_every_n_steps):
            self.publish(state)

    def on_epoch_end(self, state: LoopState) -> None:
        self.publish(state)

    def publish(self, state: LoopState) -> dict[str, float]:
        """Compute every metric and put the values into ``state.metrics``."""
        values = {
            self.prefix + name: _number(name, metric.compute())  # host sync: once per publish
            for name, metric in self.metrics.items()
            if metric.update_called
        }
        state.metrics.update(values)
        return values

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def state_dict(self) -> dict[str, Any]:
        saved = {}
        for name, metric in self.metrics.items():
            if not metric.update_called:
                continue
            states = dict(metric.metric_state)
            size = sum(_numel(value) for value in states.values())
            if size > MAX_SAVED_STATE:
                self._warn_too_large(name, size)
                continue
            saved[name] = {
                "states": states, "updates": metric._update_count, "class": class_name(metric)
            }  # fmt: skip
        return saved

    def _warn_too_large(self, name: str, size: int) -> None:
        if name in self._warned_large:
            return
        self._warned_large.add(name)
        warnings.warn(
            f"MetricUpdater: metrics[{name!r}] holds {size:,} values for the epoch so far (a "
            "state that grows with the data, such as exact AUROC's predictions), more than "
            f"checkpoints keep ({MAX_SAVED_STATE:,}); a run resumed inside this epoch "
            "reports it over the batches after the resume (a fixed-size state, e.g. "
            "thresholds=..., is kept)",
            RuntimeWarning,
            stacklevel=2,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)


def _numel(value: Any) -> int:
    if isinstance(value, list):
        return sum(int(v.numel()) for v in value)
    return int(value.numel())


def _number(name: str, value: Any) -> float:
    """A metric's computed value as the one number ``state.metrics`` holds; a value of
    several (a metric per class) is refused naming the metric (float() said "only one
    element tensors can be converted to Python scalars", after an epoch of training)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(
        f"MetricUpdater: metrics[{name!r}] computed {_described(value)}, not one number, "
        "which is what "
        "state.metrics holds: reduce it in the metric (e.g. average='macro' or 'micro' "
        "rather than None), or give each number a metric of its own"
    )


def _fits(name: str, metric: torchmetrics.Metric, saved: dict[str, Any]) -> bool:
    """Whether a metric's saved states are this metric's kind: a run resumed with another
    metric under the name (a MeanAbsoluteError where a MeanSquaredError was) took its
    states in as they were, the count of one beside nothing of its own sum, and reported
    half the error for the rest of the epoch. Said, with a CheckpointWarning, when
    not (the metric then counts the resumed epoch from where it resumed)."""
    ours = metric.metric_state
    kind = saved.get("class", class_name(metric))  # (absent from older checkpoints)
    states = saved["states"]
    fits = kind == class_name(metric) and states.keys() == ours.keys()
    fits = fits and all(_alike(value, ours[key]) for key, value in states.items())
    if not fits:
        warnings.warn(
            f"MetricUpdater: the checkpoint's state of metric {name!r} is a {kind}'s (states "
            f"{sorted(states)}), which this {class_name(metric)} cannot go on from: it counts "
            "the resumed epoch from here",
            CheckpointWarning,
            stacklevel=3,
        )
    return fits


def _alike(saved: Any, ours: Any) -> bool:
    """A saved state and the metric's of one kind: lists (of a ``cat`` state), or tensors of
    one shape (``num_classes`` changed, they are not)."""
    if isinstance(saved, list) or isinstance(ours, list):
        return isinstance(saved, list) and isinstance(ours, list)
    return isinstance(saved, torch.Tensor) and saved.shape == getattr(ours, "shape", None)


def _restore(metric: torchmetrics.Metric, saved: dict[str, Any], device: torch.device) -> None:
    """Put back a metric's states and its count of updates (torchmetrics keeps the count in
    ``_update_count``: ``update_called`` and ``compute()`` read it)."""
    for key, value in saved["states"].items():
        moved = [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
        setattr(metric, key, moved)
    metric._update_count = int(saved["updates"])
    metric._computed = None


def _described(value: object) -> str:
    """``value`` as :func:`described` names it, and a sequence by its length too (a pair is
    what ``select`` returns)."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return described(value)
