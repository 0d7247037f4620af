"""Trainer: LoopBase with an optimizer."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from asynchat._callback import Callback
from asynchat._checks import optimizer_trains
from asynchat._errors import CheckpointError
from asynchat._loop import LoopBase
from asynchat._processor import BasicBatchProcessor, BatchProcessor, LossFn

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class Trainer(LoopBase):
    """Trains ``model`` on ``data_loader`` for ``num_epochs`` epochs or ``num_steps`` steps.

    Args:
        model: the module to train; moved to ``device`` on the compute thread when the run
            starts.
        data_loader: a re-iterable of batches, e.g. a ``torch.utils.data.DataLoader``.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or a factory
            ``optimizer(model)`` called once the model is on its device.
        batch_processor: what one step does; default ``BasicBatchProcessor(loss_fn)``.
        loss_fn: shortcut for ``batch_processor=BasicBatchProcessor(loss_fn=loss_fn)``.
        device: ``None`` picks CUDA when available, else the CPU.
        num_epochs, num_steps: exactly one bounds the loop.
        callbacks: :class:`~asynchat.Callback` instances, run in this order within a phase.
        prefetch: how many batches to read and stage ahead on a data thread (0: read them on
            the compute thread). With a data thread, ``stop()`` and cancellation end the loop
            even while the data loader is blocked in ``__next__`` (after a 10 s grace and a
            warning naming it); with 0 they wait for the loader to return.
        name: used in thread names, errors and ``repr``.
        resume_from: a checkpoint file, or a directory whose newest valid checkpoint is used
            (see :class:`asynchat.callbacks.Checkpoint`). Model, optimizer, grad scaler,
            callbacks with state, counters, RNG states and the position in the data are
            restored; ``num_epochs``/``num_steps`` count from the start of the first run.
    """

    training: ClassVar[bool] = True

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer | OptimizerFactory,
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
    ) -> None:
        if batch_processor is None:
            if loss_fn is None:
                raise ValueError(
                    "Trainer needs a loss: pass loss_fn=... (e.g. torch.nn.CrossEntropyLoss()) "
                    "or batch_processor=..."
                )
            batch_processor = BasicBatchProcessor(loss_fn)
        elif loss_fn is not None:
            raise ValueError(
                "pass either loss_fn or batch_processor, not both: loss_fn is a shortcut for "
                "batch_processor=BasicBatchProcessor(loss_fn=...)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer) and not callable(optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer or a factory optimizer(model), got "
                f"{optimizer!r}"
            )
        super().__init__(
            model,
            data_loader,
            batch_processor=batch_processor,
            device=device,
            num_epochs=num_epochs,
            num_steps=num_steps,
            callbacks=callbacks,
            prefetch=prefetch,
            name=name,
            resume_from=resume_from,
        )
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer_trains(optimizer, model)
        self._optimizer = optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer; ``None`` before the run when a factory was given."""
        return (
            self.state.optimizer
            if self.state.optimizer is not None
            else (self._optimizer if isinstance(self._optimizer, torch.optim.Optimizer) else None)
        )

    def _configure(self) -> None:
        optimizer = self._optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(self.model)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"the optimizer factory must return a torch.optim.Optimizer, got {optimizer!r}"
                )
            optimizer_trains(optimizer, self.model)
        self.state.optimizer = optimizer

    def _extra_state(self) -> dict[str, Any]:
        assert self.state.optimizer is not None
        return {"optimizer": self.state.optimizer.state_dict()}

    def _load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        if "optimizer" not in checkpoint:
            raise CheckpointError(
                "the checkpoint has no optimizer state; was it saved by a Predictor?"
            )
        assert self.state.optimizer is not None
        self.state.optimizer.load_state_dict(checkpoint["optimizer"])
