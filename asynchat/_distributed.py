"""DistributedDataParallelTrainer: the Trainer, one rank of a torch.distributed job."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from asynchat._callback import Callback
from asynchat._data import data_length, distributed_sampler, shard_loader
from asynchat._device import resolve_device
from asynchat._loop import LoopBase, Models, as_module
from asynchat._processor import BatchProcessor, LossFn
from asynchat._trainer import OptimizerSpec, Trainer

T = TypeVar("T")


class DistributedDataParallelTrainer(Trainer):
    """A :class:`~asynchat.Trainer` for one rank of a job started by :func:`asynchat.launch`
    or ``torchrun``: the model is wrapped in ``DistributedDataParallel`` on the rank's device.

    A ``DataLoader`` whose sampler is not a ``DistributedSampler`` is rebuilt with one (shuffled
    if the original was), and ``set_epoch`` is called before each epoch's order is drawn; each
    rank reads its shard with the loader's batch size; other data (an ``IterableDataset``
    reading its rank's share, a list) is each rank's as given. Every rank runs as many steps
    an epoch, the fewest any rank's data has (agreed at each epoch's start, or before each
    step for data without a ``len()``), with a warning when they differ. With gradient
    accumulation the all-reduce is skipped (``no_sync``) until the update step. ``stop()``,
    ``pause()`` and a cancellation on any rank act on every rank at the same boundary: the
    ranks agree at each epoch and step boundary in one all-reduce of ``[stop, cancel,
    pause]`` on a CPU (gloo) group, so they never diverge or hang, and agreeing costs no
    device sync under NCCL. A rank paused holds them all until it resumes. ``device=None``
    is the rank's GPU (``LOCAL_RANK``), or the CPU without CUDA.
    ``state.model`` is the DDP wrapper; ``trainer.model`` (and checkpoints) the module itself.
    Give every rank the same callbacks: those that write files (Checkpoint, the loggers,
    Progress) write on rank 0 only (``loop.is_rank_zero``); decisions such as
    TerminateOnNaN's are agreed with ``loop.any_rank``; callbacks with ``every_rank`` are
    checked alike on every rank before training, as are the bounds (``num_epochs``,
    ``num_steps``) and the processor's class, accumulation and ``amp``. A checkpoint
    holds what is each rank's own (its random states, so ranks seeded apart draw apart
    again after a resume; its metrics; callbacks with ``state_per_rank``), and each rank
    resumes from its own.
    Other arguments are :class:`~asynchat.Trainer`'s.
    """

    spans_ranks = True

    def __init__(
        self,
        model: Models,
        data_loader: Iterable[Any],
        optimizer: OptimizerSpec | Mapping[str, OptimizerSpec],
        *,
        batch_processor: BatchProcessor | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device | int | None = None,
        num_epochs: int | None = None,
        num_steps: int | None = None,
        callbacks: Iterable[Callback] = (),
        prefetch: int = 2,
        name: str | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        sync_batchnorm: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        if device is None and dist.is_available() and dist.is_initialized():
            device = _rank_device()
        if sync_batchnorm and resolve_device(device).type != "cuda":
            raise ValueError(
                "sync_batchnorm=True needs a CUDA device: torch's SyncBatchNorm runs on GPUs "
                "only; on the CPU keep sync_batchnorm=False"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedDataParallelTrainer needs an initialised process group: create it "
                "inside a function run by asynchat.launch(...) or under torchrun"
            )
        several_models = isinstance(model, Mapping) and not isinstance(model, torch.nn.Module)
        model = as_module(model)
        if sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
        super().__init__(
            model, shard_loader(data_loader), optimizer, batch_processor=batch_processor,
            loss_fn=loss_fn, device=device, num_epochs=num_epochs, num_steps=num_steps,
            callbacks=callbacks, prefetch=prefetch, name=name, resume_from=resume_from,
        )  # fmt: skip
        self.find_unused_parameters = find_unused_parameters
        self._several_models = several_models
        # Control collectives go over gloo on the CPU: a CUDA tensor would cost a host sync
        # per step under NCCL. Every rank builds its trainer at the same point, so every
        # rank creates this group (a collective call) in step.
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._control.agree = self._agree
        self._told_lengths: dict[str, list[int]] = {}  # each loop's counts last warned of

    def _configure(self) -> None:
        super()._configure()
        if self._several_models:  # each model its own DDP: a step may call them one by one
            self.state.model = torch.nn.ModuleDict(
                {name: self._wrap(module) if _trains(module) else module
                 for name, module in self.model.items()}  # type: ignore[operator]
            )  # fmt: skip
        else:
            self.state.model = self._wrap(self.model)

    def _wrap(self, module: torch.nn.Module) -> DistributedDataParallel:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters
        )

    def _begin_epoch_data(self, epoch: int) -> int | None:
        sampler = distributed_sampler(self.data_loader)
        if sampler is not None:
            sampler.set_epoch(epoch)
        return self._agreed_length(self)

    def _agree_with_ranks(self) -> None:
        """One all-gather per loop, before training, of what must be alike on every rank.

        The run's bounds and step (:meth:`_settings`): a rank with more steps (or epochs)
        went on alone and waited in a collective until the collective timeout (5 minutes by
        default); one accumulating over more steps all-reduced its gradients while another
        did not (gloo aborted the job). The callbacks with ``every_rank``, in the same order
        and on the same schedule: a Checkpoint given to rank 0 alone (or saving every 2
        steps there and every 3 on rank 1) paired its agreement with the other ranks' step
        agreement; a GradClip or an LRSchedule on one rank drove its replica apart.
        """
        callbacks = ", ".join(_alike(c) for c in self.callbacks if c.every_rank) or "none"
        everyone: list[tuple[str, str]] = [("", "")] * self.world_size
        dist.all_gather_object(everyone, (self._settings(), callbacks), group=self._group)
        name = type(self).__name__
        _refuse_unlike(
            [settings for settings, _ in everyone],
            f"a {name} must be built alike on every rank, where its ranks step and update "
            "together ({}): give every rank the same arguments",
        )
        _refuse_unlike(
            [callbacks for _, callbacks in everyone],
            f"callbacks must be alike on every rank of a {name}, in the same order, where "
            "they act together or change the training ({}). Give every rank the same ones: "
            "Checkpoint, the loggers and Progress write on rank 0 only by themselves",
        )

    def _settings(self) -> str:
        """What must be alike on every rank for the ranks to step and update together."""
        processor = self.batch_processor
        synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules())
        return (
            f"num_epochs={self.state.num_epochs}, num_steps={self.state.num_steps}, "
            f"batch_processor={type(processor).__qualname__}(grad_accumulation_steps="
            f"{getattr(processor, 'grad_accumulation_steps', None)}, "
            f"amp={getattr(processor, 'amp', None)!r}), "
            f"sync_batchnorm={synced}"
        )

    def _agreed_length(self, loop: LoopBase) -> int | None:
        """The steps every rank runs in an epoch of ``loop`` (this trainer, or a loop run
        inline in it): the fewest any rank's data has, with a warning whenever the counts
        differ anew. A rank that stepped on alone met its peers' next agreement with its
        gradient all-reduce (gloo aborted the job on the size mismatch; NCCL would hang)."""
        lengths: list[int | None] = [None] * self.world_size
        dist.all_gather_object(lengths, data_length(loop.data_loader), group=self._group)
        if None in lengths:  # told as it happens: agreed before each step
            if loop._control.agree_last is None:
                loop._control.agree_last = _LastAgreed(loop, self.any_rank)
            return None
        loop._control.agree_last = None
        known = [length for length in lengths if length is not None]  # (all of them)
        told, self._told_lengths[loop.name] = self._told_lengths.get(loop.name), known
        if min(known) != max(known) and self.is_rank_zero and known != told:
            listed = ", ".join(f"rank {rank}: {n}" for rank, n in enumerate(known))
            ours = "; this trainer gives one to a DataLoader without" if loop is self else ""
            warnings.warn(
                f"{loop.name}: the ranks' data have different numbers of batches ({listed}): "
                f"every rank runs {min(known)} steps an epoch and leaves the rest unread. "
                f"Give every rank as many (a DistributedSampler does{ours})",
                RuntimeWarning,
                stacklevel=2,
            )
        return min(known)

    def any_rank(self, flag: bool) -> bool:
        return self._agree([flag])[0]

    def gather_to_rank_zero(self, obj: T) -> list[T] | None:
        gathered: list[Any] | None = [None] * self.world_size if self.is_rank_zero else None
        dist.gather_object(obj, gathered, dst=0, group=self._group)  # on the CPU too
        return gathered

    def sum_over_ranks(self, values: Sequence[float]) -> list[float]:
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(totals, group=self._group)  # on the CPU, like the agreements
        return [float(v) for v in totals.tolist()]

    def _agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag True on every rank if it is True on any: one MAX all-reduce on the CPU
        (every rank calls this at the same point)."""
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group)
        return [bool(v) for v in values.tolist()]


def _refuse_unlike(everyone: list[str], message: str) -> None:
    """A ValueError unless every rank's entry of ``everyone`` is the same: ``message`` with
    each rank's entry listed in its ``{}``."""
    if any(theirs != everyone[0] for theirs in everyone):
        listed = "; ".join(f"rank {rank}: {theirs}" for rank, theirs in enumerate(everyone))
        raise ValueError(message.format(listed))


class _LastAgreed:
    """``control.agree_last`` for ``loop``: whether the epoch ends with the next step, True
    if it does on any rank (its data ran out); the rank whose data goes on says so, once."""

    def __init__(self, loop: LoopBase, any_rank: Callable[[bool], bool]) -> None:
        self.loop = loop
        self.any_rank = any_rank
        self.cut_short = False

    def __call__(self, last: bool) -> bool:
        agreed = self.any_rank(last)
        if agreed and not last and not self.cut_short:
            self.cut_short = True
            warnings.warn(
                f"{self.loop.name}: rank {self.loop.rank}'s data had more batches than another "
                f"rank's in epoch {self.loop.state.epoch}: every rank ends an epoch when the "
                "first runs out, and this rank's further batches were not read. Give every "
                "rank as many",
                RuntimeWarning,
                stacklevel=2,
            )
        return agreed


# The attributes that say when a callback's hooks act (and so when its collectives run):
# part of what must be alike on every rank.
_SCHEDULE = ("every_n_steps", "every_n_epochs", "log_every_n_steps", "check_every_n_steps",
             "save_on_end", "interval")  # fmt: skip


def _alike(callback: Callback) -> str:
    """``Name`` or ``Name(every_n_steps=2, ...)``: what must be alike on every rank."""
    schedule = ", ".join(
        f"{name}={getattr(callback, name)!r}" for name in _SCHEDULE if hasattr(callback, name)
    )
    return f"{type(callback).__qualname__}({schedule})" if schedule else type(callback).__qualname__


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _rank_device() -> torch.device:
    """This rank's device: its GPU by LOCAL_RANK (as torchrun and launch set it), else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
    return torch.device("cuda", local)


class DataParallelTrainer(Trainer):
    """A :class:`~asynchat.Trainer` that splits each batch over several GPUs of one process
    with ``torch.nn.DataParallel`` (HAT's DataParallelTrainer).

    ``device_ids`` defaults to every visible GPU; with fewer than two (or on the CPU) it is the
    plain Trainer. ``state.model`` is the wrapper; ``trainer.model`` and checkpoints the module.
    For more than one machine, or for speed on one, prefer :class:`DistributedDataParallelTrainer`.
    """

    def __init__(
        self,
        model: Models,
        data_loader: Iterable[Any],
        optimizer: OptimizerSpec | Mapping[str, OptimizerSpec],
        *,
        batch_processor: BatchProcessor | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device | int | None = None,
        num_epochs: int | None = None,
        num_steps: int | None = None,
        callbacks: Iterable[Callback] = (),
        prefetch: int = 2,
        name: str | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        device_ids: Sequence[int] | None = None,
    ) -> None:
        available = list(range(torch.cuda.device_count()))
        ids = list(device_ids) if device_ids is not None else available
        unknown = [i for i in ids if i not in available]
        if unknown:
            raise ValueError(f"device_ids {unknown} are not visible CUDA devices ({available})")
        if len(ids) > 1:
            # nn.DataParallel gathers on device_ids[0]: the loop's device must be that one.
            first = torch.device("cuda", ids[0])
            if device is None:
                device = first
            elif resolve_device(device) != first:
                raise ValueError(
                    f"device={device!r} must be device_ids[0] (cuda:{ids[0]}) for "
                    "DataParallel, which gathers outputs there; pass device=None"
                )
        super().__init__(
            model, data_loader, optimizer, batch_processor=batch_processor, loss_fn=loss_fn,
            device=device, num_epochs=num_epochs, num_steps=num_steps, callbacks=callbacks,
            prefetch=prefetch, name=name, resume_from=resume_from,
        )  # fmt: skip
        self.device_ids = ids

    def _configure(self) -> None:
        super()._configure()
        if self.device.type == "cuda" and len(self.device_ids) > 1:
            self.state.model = torch.nn.DataParallel(self.model, device_ids=self.device_ids)
