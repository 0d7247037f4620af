"""Resume: where a loop is in its data, and what a checkpoint holds to go on from there.

A checkpoint (:func:`build_checkpoint`) is a plain dict that loads with
``torch.load(weights_only=True)``:

====================  ======================================================================
``format, version``   ``"asynchat-checkpoint"``, 3
``progress``          ``epoch``, ``steps_in_epoch``, ``epoch_exhausted`` (the epoch's end has
                      run), ``global_step``, ``world_size`` and the data loader's
                      ``batch_size`` (to resume inside an epoch on another number of ranks),
                      and ``run``: the loop's ``run_id`` (absent from older checkpoints)
``metrics``           ``state.metrics``
``metric_steps``      the global step at which each metric was measured (absent from older
                      checkpoints: the checkpoint's step stands in)
``model``             the (unwrapped) model's ``state_dict()``, named as without ``torch.compile``
                      (:mod:`asynchat._weights`; not in a sharded checkpoint)
``processor``         the batch processor's state (the grad scaler)
``callbacks``         ``{"ClassName": state, "ClassName#1": ...}`` for callbacks with state
                      (in a sharded checkpoint their DTensors are in the shards, a
                      placeholder here: :func:`asynchat._dcp.split_sharded`)
``rng``               every global generator's state now
``epoch_rng``,        the global and the data loader's generator states the current epoch's
``epoch_generators``  data order was drawn from (to draw it again when resuming inside it)
``generators``        the data loader's generator states now (for the next epoch's order)
``ranks``             a distributed trainer's only: each rank's own part (its ``rng``,
                      ``epoch_rng``, ``epoch_generators``, ``generators``, ``metrics``,
                      ``metric_steps`` and, under ``callbacks``, the state of callbacks with
                      ``state_per_rank``), by rank; the keys above hold rank 0's, and leave out
                      the callbacks with ``state_per_rank`` (see :func:`own_part`)
``optimizers``        ``{name: state}`` of every optimizer of a :class:`~asynchat.Trainer`
                      (versions 1 and 2 held one ``optimizer``; not in a sharded checkpoint)
``optimizer_classes`` ``{name: "module.Class"}`` of those optimizers (absent from older
                      checkpoints): a run resumed with another class is refused
``sharded``           a sharded checkpoint only: ``optimizers`` (their names) and ``files``
                      (the SHA-256 of each of DCP's files); see :mod:`asynchat._dcp`
``integrity``         a digest of everything above (added when written)
====================  ======================================================================

Resuming inside an epoch re-draws its order from ``epoch_rng``/``epoch_generators``, skips
the batches already trained on in the sampler (their data is never read; on another number
of ranks, or with another batch size, as many batches as hold the samples already trained
on), then restores ``rng`` before the first step; resuming after an epoch's end restores ``rng`` and
``generators`` and starts the next epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from asynchat._callback import Callback
from asynchat._checkpoint_io import FORMAT, VERSION, check_loadable
from asynchat._data import DataSource, data_length, loader_generators
from asynchat._dcp import split_sharded
from asynchat._errors import CheckpointWarning
from asynchat._rng import capture_rng, restore_rng
from asynchat._state import Metrics
from asynchat._transfer import HostCopy
from asynchat._weights import portable_state_dict


@dataclasses.dataclass(slots=True)
class DataPosition:
    """Where the loop is in its data, for a checkpoint taken now."""

    epoch: int = 0
    steps_done: int = 0  # steps of `epoch` completed
    epoch_ended: bool = False  # its on_epoch_end is running or has run: resume at the next


@dataclasses.dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a resumed run starts: ``steps_done`` steps into ``epoch``, and the RNG states to
    re-draw that epoch's data order (``epoch_rng``) and to continue from (``step_rng``)."""

    epoch: int
    steps_done: int
    epoch_rng: dict[str, Any] | None
    epoch_generators: list[torch.Tensor]
    step_rng: dict[str, Any] | None


class DataTracker:
    """The loop's position in its data and the generator states its epochs were drawn from;
    updated on the compute thread as the loop goes, read by :func:`build_checkpoint`."""

    def __init__(self) -> None:
        self.position = DataPosition()
        self.epoch_rng: dict[str, Any] | None = None
        self.epoch_generators: list[torch.Tensor] = []
        self._step_rng: dict[str, Any] | None = None  # to restore once the order is drawn
        # A loaded checkpoint's RNG and generator states, which are the run's until it draws
        # its next data order (the live ones are put back only then).
        self._loaded: tuple[dict[str, Any], list[torch.Tensor]] | None = None

    def resumed(self, checkpoint: Mapping[str, Any]) -> None:
        """A checkpoint was loaded: until the run draws its next data order, a checkpoint
        of it is that one (a resumed run that ends before its first step, its bound already
        reached, would otherwise save the position of a fresh run: epoch 0, no step)."""
        progress = checkpoint["progress"]
        self.position = DataPosition(
            progress["epoch"], progress["steps_in_epoch"], progress["epoch_exhausted"]
        )
        self.epoch_rng = checkpoint.get("epoch_rng")
        self.epoch_generators = list(checkpoint.get("epoch_generators", []))
        self._loaded = (checkpoint["rng"], list(checkpoint.get("generators", [])))

    def now(self, data_loader: DataSource) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The run's RNG states and its data loader's generator states now."""
        if self._loaded is not None:
            return self._loaded
        return capture_rng(), [g.get_state() for g in loader_generators(data_loader)]

    def begin_epoch(self, epoch: int, data_loader: DataSource, resume: ResumePoint | None) -> None:
        """Before the epoch's order is drawn: put the generators back for a resumed epoch and
        remember what this epoch draws from."""
        generators = loader_generators(data_loader)
        if resume is not None and resume.epoch_rng is not None:
            # Re-draw this epoch's data order: put the generators back as they were when it
            # was first drawn; the skipped batches' indices are drawn, their data never read.
            restore_rng(resume.epoch_rng)
            for generator, saved in zip(generators, resume.epoch_generators, strict=False):
                generator.set_state(saved)
        self.epoch_rng = capture_rng()
        self.epoch_generators = [g.get_state() for g in generators]
        skip = resume.steps_done if resume is not None else 0
        self.position = DataPosition(epoch, skip)
        self._step_rng = resume.step_rng if resume is not None else None

    def order_drawn(self) -> None:
        """The epoch's first batch is in hand, so its order is drawn: a resumed epoch's steps
        go on with the RNG state the interrupted run had."""
        self._loaded = None
        self.skipped()

    def skipped(self) -> None:
        """A resumed epoch's order is drawn and its trained batches skipped in its sampler,
        before the next batch is read (any thread; the compute thread waits for that batch):
        put back the RNG state the interrupted run had, which that batch's random
        augmentations drew from then. Done once."""
        step_rng, self._step_rng = self._step_rng, None
        if step_rng is not None:
            restore_rng(step_rng)

    def step_done(self, epoch: int, steps_done: int) -> None:
        position = self.position  # in place: after every step (a checkpoint reads it here)
        position.epoch, position.steps_done, position.epoch_ended = epoch, steps_done, False

    def steps_ended(self, epoch: int, steps_done: int) -> None:
        """The epoch's steps are over (however they ended); a checkpoint taken from now on
        must hold the step RNG even when no step ran."""
        self.order_drawn()
        self.step_done(epoch, steps_done)

    def epoch_ended(self) -> None:
        self.position = dataclasses.replace(self.position, epoch_ended=True)


def stateful_callbacks(callbacks: Iterable[Callback]) -> dict[str, Callback]:
    """Callbacks that define ``state_dict``, keyed by class name (``Name#1`` for repeats)."""
    seen: collections.Counter[str] = collections.Counter()
    keyed: dict[str, Callback] = {}
    for callback in callbacks:
        name = type(callback).__qualname__
        key = name if seen[name] == 0 else f"{name}#{seen[name]}"
        seen[name] += 1
        if type(callback).state_dict is not Callback.state_dict:
            keyed[key] = callback
    return keyed


def callback_states(
    callbacks: Iterable[Callback], *, per_rank: bool | None = None
) -> dict[str, Any]:
    """``{key: state_dict()}`` of the callbacks with state (keys: :func:`stateful_callbacks`);
    with ``per_rank``, only those whose ``state_per_rank`` is that."""
    return {
        key: cb.state_dict()
        for key, cb in stateful_callbacks(callbacks).items()
        if per_rank is None or cb.state_per_rank == per_rank
    }


def rank_state(
    *,
    tracker: DataTracker,
    metrics: Mapping[str, float],
    callbacks: Iterable[Callback],
    data_loader: DataSource,
) -> dict[str, Any]:
    """This rank's own part of a distributed trainer's checkpoint (``ranks``), copied to
    host memory: what differs from rank to rank (each rank seeds its own dropout, logs its
    own losses, counts its own shard's metric states)."""
    part = {
        **_own_fields(tracker, metrics, data_loader),
        "callbacks": callback_states(callbacks, per_rank=True),
    }
    check_loadable(part)
    copied: dict[str, Any] = to_host_copy(part)
    return copied


def _own_fields(
    tracker: DataTracker, metrics: Mapping[str, float], data_loader: DataSource
) -> dict[str, Any]:
    """The fields of a checkpoint that may differ from rank to rank (not copied)."""
    rng, generators = tracker.now(data_loader)
    return {
        "metrics": dict(metrics),
        # When each was measured: a monitor acts on a value once, resumed or not.
        "metric_steps": metrics.steps() if isinstance(metrics, Metrics) else {},
        "rng": rng,
        "epoch_rng": tracker.epoch_rng,
        "epoch_generators": tracker.epoch_generators,
        "generators": generators,
    }


def own_part(
    checkpoint: dict[str, Any], *, rank: int, world_size: int, callbacks: Iterable[Callback]
) -> dict[str, Any]:
    """``checkpoint`` as rank ``rank`` of a job of ``world_size`` ranks resumes from it: its
    own part of ``ranks`` in place of rank 0's. On another number of ranks each rank that
    was one takes its part's random states and metrics (the others rank 0's), and the
    ``callbacks`` with ``state_per_rank`` start afresh (a shard's metric counts do not
    carry over to another sharding), with a warning when any had a state. A checkpoint
    without ``ranks`` (written before they were kept) holds rank 0's: the other ranks'
    such callbacks start afresh."""
    ranks = checkpoint.get("ranks")
    if ranks is None:
        if rank == 0:
            return checkpoint
        per_rank = {key for key, cb in stateful_callbacks(callbacks).items() if cb.state_per_rank}
        kept = {k: v for k, v in checkpoint["callbacks"].items() if k not in per_rank}
        return {**checkpoint, "callbacks": kept}
    part = ranks[rank] if rank < len(ranks) else ranks[0]
    own = {key: value for key, value in checkpoint.items() if key != "ranks"}
    own.update({key: value for key, value in part.items() if key != "callbacks"})
    if len(ranks) == world_size:
        own["callbacks"] = {**checkpoint["callbacks"], **part["callbacks"]}
    elif lost := sorted({key for p in ranks for key, state in p["callbacks"].items() if state}):
        warnings.warn(
            f"the checkpoint was written by {len(ranks)} rank(s) and this run has "
            f"{world_size}: the per-rank state of {', '.join(lost)} is not restored (each "
            "rank's covers its own share of the data; e.g. a MetricUpdater's epoch-so-far "
            "values cover the batches after the resume)",
            CheckpointWarning,
            stacklevel=3,
        )
    return own


def build_checkpoint(
    *,
    tracker: DataTracker,
    run_id: str,
    global_step: int,
    world_size: int,
    spans_ranks: bool,
    metrics: Mapping[str, float],
    model: torch.nn.Module | None,
    processor_state: dict[str, Any],
    callbacks: Iterable[Callback],
    data_loader: DataSource,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything needed to resume, copied to host memory (on the compute thread); without
    the model when it is None (a sharded checkpoint saves it with DCP), and, when the loop
    ``spans_ranks`` (a distributed trainer), without the callbacks with ``state_per_rank``
    (each rank's :func:`rank_state` holds its own)."""
    position = tracker.position
    weights = {"model": portable_state_dict(model)} if model is not None else {}
    # Those with state_per_rank are each rank's own: in ``ranks`` only (rank_state), when
    # the loop spans ranks; one rank's for every rank would count a shard's metrics twice.
    states = callback_states(callbacks, per_rank=False if spans_ranks else None)
    if model is None:  # sharded: their DTensors are in the shards (sharded_state)
        states, _ = split_sharded(states)
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "progress": {
            "epoch": position.epoch,
            "steps_in_epoch": position.steps_done,
            "epoch_exhausted": position.epoch_ended,
            "global_step": global_step,
            "world_size": world_size,
            "batch_size": getattr(data_loader, "batch_size", None),
            "run": run_id,
        },
        **_own_fields(tracker, metrics, data_loader),
        **weights,
        "processor": processor_state,
        "callbacks": states,
        **extra,
    }
    check_loadable(checkpoint)
    copied: dict[str, Any] = to_host_copy(checkpoint)
    return copied


def apply_checkpoint(
    checkpoint: dict[str, Any],
    *,
    load_model: Callable[[dict[str, Any]], None],
    load_processor: Callable[[dict[str, Any]], None],
    callbacks: Iterable[Callback],
    data_loader: DataSource,
    world_size: int,
) -> ResumePoint:
    """Restore the model, processor and callbacks; return where the loop resumes (the
    counters and metrics are the caller's to restore from ``checkpoint["progress"]``)."""
    load_model(checkpoint)
    load_processor(checkpoint["processor"])
    saved = checkpoint["callbacks"]
    stateful = stateful_callbacks(callbacks)
    for key, callback in stateful.items():
        if key in saved:
            callback.load_state_dict(saved[key])
    if lacking := sorted(saved.keys() - stateful.keys()):
        warnings.warn(
            f"the checkpoint holds the state of callbacks this run lacks: {', '.join(lacking)}; "
            "it is not restored (give the run the same callbacks to go on with it, e.g. an "
            "LRSchedule's position, an EMA's average)",
            CheckpointWarning,
            stacklevel=3,
        )
    progress = checkpoint["progress"]
    if progress["epoch_exhausted"]:
        # Resume at the next epoch: the generators (global and the data loader's own) are put
        # back as they were when the checkpoint was taken, which is what the next epoch's
        # data order is drawn from.
        restore_rng(checkpoint["rng"])
        generators = loader_generators(data_loader)
        for generator, state in zip(generators, checkpoint.get("generators", []), strict=False):
            generator.set_state(state)
        return ResumePoint(progress["epoch"] + 1, 0, None, [], None)
    skip = _steps_into(progress, data_loader, world_size)
    return ResumePoint(
        progress["epoch"],
        skip,
        checkpoint["epoch_rng"],
        checkpoint["epoch_generators"],
        # Saved before the epoch's first step (a stop decided before it, in on_epoch_begin
        # say), the state is from before its order was drawn: the epoch's own, put back
        # when it begins, draws the order and goes on as the uninterrupted run did.
        checkpoint["rng"] if skip else None,
    )


def _steps_into(progress: Mapping[str, Any], data_loader: DataSource, world_size: int) -> int:
    """The steps of the interrupted epoch to skip; a warning if the data has fewer."""
    skip = steps_to_skip(progress, world_size, getattr(data_loader, "batch_size", None))
    length = data_length(data_loader)
    if length is not None and skip > length:  # (equal: saved before the epoch's end ran)
        # Resumed on other data (a smaller set, a larger batch): the epoch's rest is empty.
        warnings.warn(
            f"the checkpoint is {skip} steps into epoch {progress['epoch']}, and the "
            f"data_loader has {length} steps an epoch: epoch {progress['epoch']} ends with no "
            "further step (is this the data the checkpoint was trained on?)",
            CheckpointWarning,
            stacklevel=4,
        )
    return skip


def steps_to_skip(progress: Mapping[str, Any], world_size: int, batch_size: int | None) -> int:
    """The steps of the interrupted epoch this rank skips: those of the checkpoint, or, on
    another number of ranks or batch size, as many as hold the samples the job had trained
    on in the epoch (a ``DistributedSampler`` deals one order out rank by rank, so the first
    ``k * batch * ranks`` samples of an epoch are the same set at any world size)."""
    steps = int(progress["steps_in_epoch"])
    old = (progress.get("world_size", world_size), progress.get("batch_size", batch_size))
    if old == (world_size, batch_size) or not steps:
        return steps
    if not all(isinstance(n, int) for n in (*old, batch_size)):
        warnings.warn(
            f"the checkpoint was written with {old[0]} rank(s) and now there are {world_size}; "
            f"without both batch sizes ({old[1]!r}, {batch_size!r}) the interrupted epoch "
            f"resumes after {steps} steps of this rank",
            CheckpointWarning,
            stacklevel=3,
        )
        return steps
    samples = steps * int(old[0]) * int(old[1])
    skip, left = divmod(samples, world_size * int(batch_size))  # type: ignore[arg-type]
    if left:
        warnings.warn(
            f"the interrupted epoch's {samples} samples are not a whole number of steps of "
            f"{world_size} rank(s) x {batch_size}; resuming after {skip} steps, so "
            f"{left} samples are trained on again",
            CheckpointWarning,
            stacklevel=3,
        )
    return skip


def to_host_copy(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are in host memory, detached from the live ones."""
    # Host/device sync, on purpose: the copies are queued on each device's current stream
    # (the compute stream for the loop's device) and must have landed before the checkpoint
    # is handed to a writer thread. This is the only pause a checkpoint causes.
    copied = HostCopy(obj).wait()
    _copy_metadata(obj, copied)
    return copied


def _copy_metadata(original: Any, copied: Any) -> None:
    """Keep ``state_dict()._metadata`` (module versions) that a plain dict copy drops."""
    if isinstance(original, dict) and isinstance(copied, dict):
        if hasattr(original, "_metadata"):
            copied._metadata = original._metadata  # type: ignore[attr-defined]
        for key, value in original.items():
            _copy_metadata(value, copied.get(key))
