"""DistributedDataParallelTrainer: the Trainer, one rank of a torch.distributed job."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from asynchat._callback import Callback
from asynchat._checks import flag
from asynchat._data import DataSource, distributed_sampler, shard_loader
from asynchat._device import resolve_device
from asynchat._loop import Models, as_module
from asynchat._processor import BatchProcessor, LossFn
from asynchat._trainer import OptimizerSpec, Trainer
from asynchat._tree import batch_size


class DistributedDataParallelTrainer(Trainer):
    """A :class:`~asynchat.Trainer` for one rank of a job started by :func:`asynchat.launch`
    or ``torchrun``: the model is wrapped in ``DistributedDataParallel`` on the rank's device.

    A ``DataLoader`` whose sampler is not a ``DistributedSampler`` is rebuilt with one (shuffled
    if the original was), and ``set_epoch`` is called before each epoch's order is drawn; each
    rank reads its shard with the loader's batch size; other data (an ``IterableDataset``
    reading its rank's share, a list) is each rank's as given. Every rank runs as many steps
    an epoch, the fewest any rank's data has (agreed at each epoch's start, or before each
    step for data without a ``len()``, in the step boundary's all-reduce), with a warning
    when they differ. With gradient accumulation the all-reduce is skipped (``no_sync``)
    until the update step. ``stop()``, ``pause()`` and a cancellation on any rank act on
    every rank at the same boundary: the ranks agree at each epoch and step boundary in one
    all-reduce of ``[stop, cancel, pause]`` on a CPU (gloo) group, so they never diverge or
    hang, and agreeing costs no device sync under NCCL. A rank paused holds them all until
    it resumes. That round trip is the engine's cost in a distributed step (a tiny DDP step
    on 2 CPU cores: 2.6 ms against a hand-written loop's 1.6): ``control_lag=1`` pipelines
    it (each step boundary starts its all-reduce and decides on the one started a step
    earlier, which came in while the step ran; 2.1 ms there), and a stop, pause or
    cancellation asked during a step then ends or holds every rank one step later (the epoch
    boundaries still act at once, and so does every boundary of data without a ``len()``,
    agreed before each step anyway).
    ``device=None`` is the rank's GPU (``LOCAL_RANK``), or the CPU without CUDA.
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

    def __init__(
        self,
        model: Models,
        data_loader: DataSource,
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
        control_lag: int = 0,
    ) -> None:
        if control_lag not in (0, 1) or isinstance(control_lag, bool):
            raise ValueError(f"control_lag must be 0 or 1, got {control_lag!r}")
        flag("sync_batchnorm", sync_batchnorm)
        flag("find_unused_parameters", find_unused_parameters)
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
        self.control_lag = control_lag
        # Every rank builds its trainer at the same point.
        self._span_ranks(sharded_model=self.shards_state, pipelined=control_lag == 1)

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
        assert self._ranks is not None, "set in __init__"
        hint = "; this trainer gives one to a DataLoader without"
        return self._ranks.agreed_length(self.state, self.data_loader, self._control, hint)

    def _settings(self) -> str:
        """What must be alike on every rank for the ranks to step and update together: the
        run's bounds and step. A rank with more steps (or epochs) went on alone and waited in
        a collective until the collective timeout (5 minutes by default); one accumulating
        over more steps all-reduced its gradients while another did not (gloo aborted the
        job). The callbacks with ``every_rank`` must be alike too (``_agree_with_ranks``): a
        Checkpoint given to rank 0 alone (or saving every 2 steps there and every 3 on rank
        1) paired its agreement with the other ranks' step agreement; a GradClip or an
        LRSchedule on one rank drove its replica apart."""
        synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules())
        return (
            f"num_epochs={self.state.num_epochs}, num_steps={self.state.num_steps}, "
            f"{super()._settings()}, sync_batchnorm={synced}, control_lag={self.control_lag}"
        )


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
    A scalar loss in the replicas' outputs (``loss_fn=model_loss``) is gathered as the batch's
    (:class:`ReplicaLossMean`).
    For more than one machine, or for speed on one, prefer :class:`DistributedDataParallelTrainer`.
    """

    def __init__(
        self,
        model: Models,
        data_loader: DataSource,
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
            self.state.model = ReplicaLossMean(self.model, device_ids=self.device_ids)


class ReplicaLossMean(torch.nn.DataParallel):  # type: ignore[type-arg]
    """``nn.DataParallel`` whose gathered outputs hold the batch's loss where each replica's
    held a scalar one (a ``"loss"`` entry, as a Hugging Face model's, the one scalar of a
    tuple, or the outputs themselves: where :func:`~asynchat.model_loss` looks): the mean
    over the replicas, each weighted by its share of the batch. ``nn.DataParallel`` gathers
    scalars into a vector of one per replica, with a warning, which ``model_loss`` refused."""

    _shares: tuple[int, ...] = ()

    def scatter(self, inputs: Any, kwargs: Any, device_ids: Sequence[Any]) -> Any:
        scattered = super().scatter(inputs, kwargs, device_ids)
        self._shares = tuple(batch_size(replica) for replica in zip(*scattered, strict=True))
        return scattered

    def gather(self, outputs: Any, output_device: Any) -> Any:
        place = scalar_loss_place(outputs)
        if place is None:
            return super().gather(outputs, output_device)
        with warnings.catch_warnings():  # (the vector of scalars is averaged right away)
            warnings.filterwarnings("ignore", "Was asked to gather along dimension 0")
            gathered = super().gather(outputs, output_device)
        return mean_of_replicas(gathered, place, self._shares)


LossPlace = str | int | None  # a Mapping's key, a tuple's index, or the outputs themselves


def scalar_loss_place(outputs: Sequence[Any]) -> tuple[LossPlace] | None:
    """Where every replica's ``outputs`` hold a scalar loss (as one tuple, so that the whole
    outputs, ``(None,)``, differ from none at all)."""

    def place_in(output: Any) -> tuple[LossPlace] | None:
        if isinstance(output, torch.Tensor):
            return (None,) if output.dim() == 0 else None
        if isinstance(output, Mapping):
            loss = output.get("loss")
            return ("loss",) if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None
        if isinstance(output, tuple):
            scalars = [i for i, o in enumerate(output)
                       if isinstance(o, torch.Tensor) and o.dim() == 0]  # fmt: skip
            return (scalars[0],) if len(scalars) == 1 else None
        return None

    places = {place_in(output) for output in outputs}
    return places.pop() if len(places) == 1 else None


def mean_of_replicas(gathered: Any, place: tuple[LossPlace], shares: Sequence[int]) -> Any:
    """``gathered`` with the vector of replica losses at ``place`` replaced by their mean,
    weighted by ``shares`` (the replicas' numbers of samples)."""
    (where,) = place
    losses = gathered if where is None else gathered[where]
    if len(shares) != len(losses) or not sum(shares):  # (no tensor to count samples by)
        shares = [1] * len(losses)
    weights = torch.tensor(shares, dtype=losses.dtype, device=losses.device)
    mean = (losses * weights).sum() / weights.sum()
    if where is None:
        return mean
    if isinstance(where, int):
        items = [mean if i == where else item for i, item in enumerate(gathered)]
        kind = type(gathered)
        return kind._make(items) if hasattr(gathered, "_fields") else kind(items)
    gathered[where] = mean
    return gathered
