"""FullyShardedDataParallelTrainer: one rank of a job whose model is sharded with FSDP2."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from asynchat._callback import Callback
from asynchat._data import DataSource
from asynchat._distributed import DistributedDataParallelTrainer
from asynchat._loop import Models
from asynchat._processor import BatchProcessor, LossFn
from asynchat._ranks import shared_group
from asynchat._trainer import OptimizerFactory

ShardPolicy = Sequence[str] | Callable[[nn.Module], Iterable[nn.Module]]


class FullyShardedDataParallelTrainer(DistributedDataParallelTrainer):
    """A :class:`~asynchat.Trainer` for one rank of a job whose model does not fit one device:
    parameters, gradients and optimizer state are sharded over the ranks with FSDP2
    (``torch.distributed.fsdp.fully_shard``; parameters become ``DTensor``s). A mapping of
    models (a GAN's two) shards each model as a root of its own.

    Sharding happens on the compute thread once the model is on the rank's device: each
    module of ``shard`` gets its own ``fully_shard`` (its parameters are gathered for its
    forward and backward only), then the root. ``shard`` is a list of submodule names, or a
    function ``shard(model) -> modules``; by default every child of the root that holds
    parameters. The optimizer must be a factory (or a mapping of factories): it is called
    after sharding, over the sharded parameters. ``mixed_precision="bf16"`` computes in
    bfloat16 with float32 gradient reduction (FSDP's ``MixedPrecisionPolicy``).

    As in :class:`DistributedDataParallelTrainer`: the DataLoader is re-sharded with a
    ``DistributedSampler``; ``stop()``, ``pause()`` and cancellation are agreed by every rank
    at each boundary (``control_lag`` as there); files are written on rank 0. Gradient
    accumulation neither reduces nor reshards between micro-batches (the processor's
    ``no_sync``). ``state.model`` and ``trainer.model`` are the sharded module.

    Checkpoints: :class:`~asynchat.callbacks.Checkpoint` works unchanged, and writes a
    directory ``step-<global_step>.dcp`` per checkpoint with ``torch.distributed.checkpoint``:
    every rank stages its own shards to host memory (the only pause) and writes them on a
    thread while training goes on (with the sharded tensors of callbacks' states, such as
    an :class:`~asynchat.callbacks.ExponentialMovingAverage` of the sharded model); rank 0
    commits the directory by renaming it into place
    once every rank's files are written, then writes the manifest. ``resume_from`` loads
    such a checkpoint on any number of ranks (DCP reshards it; an interrupted epoch resumes
    after the samples already trained on), and
    :func:`~asynchat.callbacks.load_weights` loads its model into a module of one process.
    """

    shards_state = True

    def __init__(
        self,
        model: Models,
        data_loader: DataSource,
        optimizer: OptimizerFactory | Mapping[str, OptimizerFactory],
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
        shard: ShardPolicy | None = None,
        mixed_precision: Literal["bf16"] | None = None,
        control_lag: int = 0,
    ) -> None:
        factories = optimizer.values() if isinstance(optimizer, Mapping) else [optimizer]
        if any(isinstance(f, torch.optim.Optimizer) for f in factories):
            raise TypeError(
                "FullyShardedDataParallelTrainer needs optimizer factories "
                "(optimizer=lambda model: torch.optim.AdamW(model.parameters(), ...)): an "
                "optimizer built before sharding would hold the unsharded parameters"
            )
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision must be None or 'bf16', got {mixed_precision!r}")
        self.shard = _check_shard(shard)
        self.mixed_precision = mixed_precision
        super().__init__(
            model, data_loader, optimizer, batch_processor=batch_processor, loss_fn=loss_fn,
            device=device, num_epochs=num_epochs, num_steps=num_steps, callbacks=callbacks,
            prefetch=prefetch, name=name, resume_from=resume_from, control_lag=control_lag,
        )  # fmt: skip
        # Sharded checkpoints' collectives run on DCP's writer thread while steps run FSDP's
        # on the default group: a group of their own (gloo: DCP's async save needs a CPU
        # one), made by every rank here, in step, or the one made for an earlier trainer
        # (one DCP operation at a time goes over it: asynchat._dcp).
        self._dcp_group = shared_group("checkpoints")

    def _checkpoint_group(self) -> dist.ProcessGroup | None:
        return self._dcp_group

    def _settings(self) -> str:
        # Sharded apart, or reducing in other dtypes, the ranks' gathers and reductions
        # would not pair up.
        shard = self.shard if self.shard is None or isinstance(self.shard, list) else (
            getattr(self.shard, "__qualname__", type(self.shard).__qualname__)
        )  # fmt: skip
        return f"{super()._settings()}, shard={shard!r}, mixed_precision={self.mixed_precision!r}"

    def _configure(self) -> None:
        # (imported here: FSDP brings DTensor and sympy, a third of asynchat's import time)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision == "bf16"
            else MixedPrecisionPolicy()
        )
        # Several models (a mapping): each is a root of its own, as a step calls them one by
        # one; the ModuleDict holding them never runs a forward.
        roots = list(self.model.values()) if self._several_models else [self.model]  # type: ignore[operator]
        units = (
            _shard_units(self.model, self.shard)
            if self.shard is not None
            else [unit for root in roots for unit in _shard_units(root, None)]
        )
        for module in units:
            fully_shard(module, mesh=mesh, mp_policy=policy)
        for root in roots:
            fully_shard(root, mesh=mesh, mp_policy=policy)
        self.state.model = self.model
        super(DistributedDataParallelTrainer, self)._configure()  # the optimizers, sharded


def _check_shard(shard: ShardPolicy | None) -> ShardPolicy | None:
    if shard is None or callable(shard):
        return shard
    if isinstance(shard, str) or not all(isinstance(name, str) for name in shard):
        raise TypeError(f"shard must be a list of submodule names or a function, got {shard!r}")
    return list(shard)


def _units_returned(model: nn.Module, units: object) -> list[nn.Module]:
    """What ``shard(model)`` returned, if it is submodules of ``model``: None (a def that
    forgot ``return``) failed in ``list()`` naming nothing, and names or another model's
    modules (a copy's) reached ``fully_shard``."""
    if not isinstance(units, Iterable) or isinstance(units, (str, bytes, nn.Module)):
        raise TypeError(
            f"shard(model) must return the submodules of the model to shard (e.g. its "
            f"blocks), got {units!r:.80}"
        )
    units = list(units)
    own = {id(module) for module in model.modules()}
    for i, unit in enumerate(units):
        if not isinstance(unit, nn.Module) or id(unit) not in own:
            what = "a module of another model" if isinstance(unit, nn.Module) else repr(unit)
            raise TypeError(
                f"shard(model) returned {what} at [{i}]: it must return the model's own "
                "submodules (modules, not names: for names pass shard=['blocks.0', ...])"
            )
    return units


def _shard_units(model: nn.Module, shard: ShardPolicy | None) -> list[nn.Module]:
    """The modules that get a ``fully_shard`` of their own, before the root."""
    if shard is None:
        return [child for child in model.children() if any(True for _ in child.parameters())]
    if callable(shard):
        return _units_returned(model, shard(model))
    found = dict(model.named_modules())
    missing = [name for name in shard if name not in found]
    if missing:
        known = sorted(n for n in found if n)[:20]
        raise KeyError(f"shard: no submodule named {missing}; the model has {known}")
    return [found[name] for name in shard]
