"""Validation: a Predictor over held-out data, run between a trainer's steps."""

from __future__ import annotations

import contextlib
import reprlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data.distributed import DistributedSampler

from asynchat._callback import Callback, checked_callbacks, objects_held
from asynchat._checks import flag, function, loss_function, positive_int, text
from asynchat._data import DataSource, check_data_loader, is_read_once
from asynchat._errors import InUseError
from asynchat._every import every_n_epochs, every_n_steps
from asynchat._predictor import Predictor
from asynchat._processor import BatchProcessor, LossFn, check_processor
from asynchat._state import LoopState
from asynchat.callbacks._metrics import MetricUpdater, Select, outputs_and_targets

if TYPE_CHECKING:
    import torchmetrics


class Validation(Callback):
    """Runs a :class:`~asynchat.Predictor` on the training model and publishes its metrics.

    The predictor runs inline on the trainer's compute thread (:meth:`LoopBase.run_inline`),
    so the model stays on its device and stream and no thread is started. Its metrics land
    in the trainer's ``state.metrics`` as ``prefix + name`` (``"val/accuracy"``), where
    :class:`Checkpoint` and :class:`EarlyStopping` can monitor them: list Validation before
    EarlyStopping (a Checkpoint's hooks run last wherever it is listed).

    The mean validation loss is published as ``prefix + "loss"`` whenever the batches have a
    loss: with ``loss_fn`` (the default processor computes it), or with a custom
    ``batch_processor`` that sets ``state.loss``. It is a mean over samples, not over
    batches: each batch's loss (a mean over its samples, as ``reduction="mean"`` gives) is
    weighted by its sample count (the processor's ``samples_in``), so a short last batch
    counts for what it holds; with a ``loss_fn`` of ``reduction="sum"`` each batch's loss is
    its samples' total already, and is summed as it is. In a distributed trainer it is the
    mean over every rank's samples (give the data loader a ``DistributedSampler`` to
    validate a shard per rank), as the metrics are (torchmetrics sync at ``compute()``).

    Args:
        data_loader: the validation batches (iterable, or async iterable).
        every_n_epochs: validate after every n-th complete epoch (``None``: never by epoch).
        every_n_steps: validate after every n-th step (``None``: never by step).
        metrics: ``{"accuracy": torchmetrics.classification.MulticlassAccuracy(10)}``.
        select: ``select(state) -> (preds, target)`` for the metrics' updates, as for
            :class:`MetricUpdater` (e.g. ``lambda s: (s.outputs["logits"], s.batch["labels"])``
            for a model that returns a dict).
        loss_fn: the loss for the default processor (a custom processor computes its own).
        use_ema: validate the weights of the trainer's
            :class:`ExponentialMovingAverage` callback instead of the raw ones.
        prefix: put before each metric's name (``"test/"`` for a second Validation over a
            test set, so its values do not overwrite the first one's).
        batch_processor: for batches that ``BasicBatchProcessor`` does not understand; its
            ``state.loss``, when it sets one, is published as the loss.
        callbacks: more callbacks for the predictor.
    """

    every_rank = True

    def __init__(
        self,
        data_loader: DataSource,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        metrics: Mapping[str, torchmetrics.Metric] | torchmetrics.MetricCollection | None = None,
        select: Select = outputs_and_targets,
        loss_fn: LossFn | None = None,
        use_ema: bool = False,
        prefix: str = "val/",
        batch_processor: BatchProcessor | None = None,
        callbacks: Iterable[Callback] = (),
    ) -> None:
        check_data_loader(data_loader, num_epochs=1)  # before training, not at its first use
        positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        positive_int("every_n_steps", every_n_steps, allow_none=True)
        text("prefix", prefix)
        flag("use_ema", use_ema)
        function("select", select, "select(state) -> (preds, target)")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("Validation never runs: give every_n_epochs or every_n_steps")
        if not metrics and loss_fn is None and batch_processor is None:
            raise ValueError(
                "Validation needs metrics=..., loss_fn=... or a batch_processor that sets "
                "state.loss, to report something"
            )
        if batch_processor is not None and loss_fn is not None:
            raise ValueError(
                "pass either loss_fn or batch_processor, not both: a custom batch_processor "
                "computes its own state.loss, which Validation publishes as the loss"
            )
        if loss_fn is not None:  # (checked here, not after the first epoch's training)
            loss_function("loss_fn", loss_fn)
        if batch_processor is not None:
            check_processor(batch_processor)
        # The loss the batches have: this one's, or a BasicBatchProcessor's own.
        batch_loss = loss_fn if loss_fn is not None else getattr(batch_processor, "loss_fn", None)
        _check_reduction(batch_loss)
        self._loss_is_total = getattr(batch_loss, "reduction", None) == "sum"
        self.data_loader = data_loader
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.updater = MetricUpdater(metrics, prefix=prefix, select=select) if metrics else None
        self.loss_fn = loss_fn
        self.use_ema = use_ema
        self.prefix = prefix
        self.batch_processor = batch_processor
        self.callbacks = list(checked_callbacks(callbacks))

    def on_loop_begin(self, state: LoopState) -> None:
        self._refuse_shared(state.loop.callbacks)
        self._refuse_read_once(state)
        _warn_padded(self.data_loader)
        state.metrics.declare(self.prefix + "loss", self, better="min")
        if self.use_ema:  # (at the first validation, it failed an epoch of training later)
            from asynchat.callbacks._model import ExponentialMovingAverage

            ExponentialMovingAverage.find(state.loop)
        if self.updater is not None:
            self.updater.declare(state, self)
        twins = [
            c for c in state.loop.callbacks
            if isinstance(c, Validation) and c is not self and c.prefix == self.prefix
        ]  # fmt: skip
        if twins:
            raise ValueError(
                f"two Validation callbacks publish under prefix={self.prefix!r}: the later "
                "one's values would overwrite the earlier one's; give each its own prefix "
                "(e.g. prefix='test/')"
            )

    def _refuse_read_once(self, state: LoopState) -> None:
        """An iterator (a generator, a stream) is read once: the first validation read it
        all, and the second failed with "yielded no batch", an epoch or more of training
        later. Refused as the trainer starts, unless the run validates once at most."""
        if not is_read_once(self.data_loader):
            return
        count = self._validations(state)
        if count is None or count > 1:
            raise ValueError(
                f"Validation's data_loader is an iterator ({type(self.data_loader).__name__}),"
                f" read once, but it validates more than once in this run (every_n_epochs="
                f"{self.every_n_epochs}, every_n_steps={self.every_n_steps}, num_epochs="
                f"{state.num_epochs}, num_steps={state.num_steps}): the second validation "
                "would find it empty. Pass batches read anew each time (a list, a "
                "DataLoader, a class whose __iter__ or __aiter__ starts over)"
            )

    def _validations(self, state: LoopState) -> int | None:
        """How many times the run of ``state`` validates, if its length is known."""
        epochs, steps, per_epoch = state.num_epochs, state.num_steps, state.steps_per_epoch
        if steps is None and epochs is not None and per_epoch is not None:
            steps = epochs * per_epoch
        if epochs is None and steps is not None and per_epoch:
            epochs = steps // per_epoch
        count = 0
        for every, length in ((self.every_n_epochs, epochs), (self.every_n_steps, steps)):
            if every is not None:
                if length is None:
                    return None
                count += length // every
        return count

    def _refuse_shared(self, trainers: Sequence[Callback]) -> None:
        """Before training, what the predictor's start would refuse at the first validation
        (an epoch later): a callback instance that also serves the trainer, or an object
        one keeps its run's state in (a metric) that one of the trainer's keeps too."""
        mine: dict[int, str] = {}  # id -> where the Validation has it
        if self.updater is not None:
            mine.update(
                (id(m), f"Validation's {n}") for n, m in self.updater.held_objects().items()
            )
        for i, callback in enumerate(self.callbacks):
            if not callback.shared_across_loops and any(callback is c for c in trainers):
                raise InUseError(
                    f"Validation's callbacks[{i}] ({type(callback).__name__}) is the "
                    f"trainer's callbacks[{trainers.index(callback)}] too: its predictor, run "
                    "inside the trainer, would start the callback's run anew in the middle "
                    "of the trainer's (a LossMonitor's sums, a logger's file); give the "
                    "Validation an instance of its own, or say `shared_across_loops = True` "
                    "on a class whose one instance may serve both"
                )
        mine.update(
            (id(obj), f"Validation's {where}") for where, obj in objects_held(self.callbacks)
        )
        for where, obj in objects_held(trainers):
            if id(obj) in mine:
                raise InUseError(
                    f"{mine[id(obj)]} is the trainer's {where} too (one {type(obj).__name__} "
                    "instance): each validation would reset the counts the trainer keeps in "
                    "it and add its own; give the Validation an instance of its own"
                )

    def on_step_end(self, state: LoopState) -> None:
        if every_n_steps(state, self.every_n_steps):
            self.run(state)

    def on_epoch_end(self, state: LoopState) -> None:
        if every_n_epochs(state, self.every_n_epochs):  # complete epochs only
            self.run(state)

    def run(self, state: LoopState) -> dict[str, float]:
        """Validate now (from a ``def`` hook of the trainer; in a distributed trainer, on
        every rank at the same point, as the loss is summed over the ranks) and publish the
        metrics."""
        from asynchat.callbacks._model import ExponentialMovingAverage

        loss = _MeanLoss(totals=self._loss_is_total)
        callbacks: list[Callback] = [*self.callbacks, loss]
        if self.updater is not None:
            callbacks.insert(0, self.updater)
        predictor = Predictor(
            state.model,
            self.data_loader,
            batch_processor=self.batch_processor,
            loss_fn=self.loss_fn,
            device=state.device,
            callbacks=callbacks,
            name=f"{state.loop.name}-validation",
        )
        ema = ExponentialMovingAverage.find(state.loop) if self.use_ema else None
        with ema.swapped_in(state.model) if ema is not None else contextlib.nullcontext():
            predictor.run_inline(state.loop)
        values = dict(predictor.state.metrics)
        # Over every rank's batches, as the torchmetrics are (their compute() syncs): each
        # rank validating its shard had its own val/loss, and rank 0 ranked checkpoints by
        # its half. A collective: in a distributed trainer every rank runs this hook.
        total, samples = state.loop.sum_over_ranks([loss.total(), loss.samples])
        if samples:
            values[self.prefix + "loss"] = total / samples
        elif not values and not predictor.state.global_step:
            raise ValueError(
                f"Validation's data_loader yielded no batch, so there is nothing to publish: "
                f"{reprlib.repr(self.data_loader)}"
            )
        elif not values and loss.losses:
            raise ValueError(
                f"Validation published nothing: its batches' losses are weighted by their "
                "sample counts, and samples_in counted none in them (the first dimension of "
                "the first tensor in a batch's tuples, lists, dicts or dataclasses): pass "
                f"samples=lambda batch: ... to {type(predictor.batch_processor).__name__}"
            )
        elif not values:
            raise ValueError(
                f"Validation published nothing: no metrics, and its batch processor "
                f"{type(predictor.batch_processor).__name__} set no state.loss"
            )
        state.metrics.update(values)
        return values


class _MeanLoss(Callback):
    """The batches' losses (each a mean over its batch) weighted by their sample counts, and
    the count: their per-sample mean is the one over every rank's totals. With ``totals``
    each batch's loss is its samples' sum already (a loss with ``reduction="sum"``)."""

    def __init__(self, *, totals: bool = False) -> None:
        self.totals = totals

    def on_loop_begin(self, state: LoopState) -> None:
        self.total_loss: Any = 0.0
        self.samples = 0
        self.losses = 0  # batches with a loss

    def on_batch_end(self, state: LoopState) -> None:
        if state.loss is not None:
            self.losses += 1
            count = state.loop.samples_in(state.batch)
            loss = state.loss.detach().float()
            self.total_loss = self.total_loss + (loss if self.totals else loss * count)  # device
            self.samples += count

    def total(self) -> float:
        return float(self.total_loss)  # host sync: once per validation


def _check_reduction(loss_fn: LossFn | None) -> None:
    """A loss module's ``reduction``: "mean" and "sum" are each weighted as what they are
    (with "sum" each batch's loss had been weighted by its count again: val/loss 16 times
    the mean over samples, for batches of 16); "none" gives no number per batch."""
    if getattr(loss_fn, "reduction", None) == "none":
        raise ValueError(
            f"Validation's loss_fn {type(loss_fn).__name__} has reduction='none': val/loss is "
            "the mean over the samples of one number per batch; give it reduction='mean' "
            "(or 'sum')"
        )


def _warn_padded(data_loader: object) -> None:
    """Torch's DistributedSampler (without ``drop_last``) repeats samples so every rank has
    as many: the repeated ones counted twice in val/loss and the metrics (1.12400 against
    1.12596 over 101 samples on 2 ranks, in a probe). Validation needs no even shards: it
    sums over the ranks whatever each has."""
    sampler = getattr(data_loader, "sampler", None)
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return
    size, ranks = sampler.total_size, sampler.num_replicas
    samples = len(sampler.dataset)  # type: ignore[arg-type]
    if size != samples:
        warnings.warn(
            f"Validation: its data_loader's DistributedSampler pads the {samples} samples to "
            f"{size} over {ranks} ranks (it repeats {size - samples}), which val/loss and "
            "the metrics then count twice. Validation needs no even shards (it sums over "
            "the ranks; a sharded model's, as many batches on every rank): give each rank "
            "its own samples, e.g. DataLoader(dataset, sampler=range(rank, len(dataset), "
            "world_size), ...)",
            RuntimeWarning,
            stacklevel=2,
        )
