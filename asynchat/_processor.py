"""Batch processors: one step of model work, run on the compute thread.

A step's item from the data loader is handed to :meth:`BatchProcessor.step` once. The
processor runs ``on_batch_begin``/``on_batch_end`` around each batch through the
``run_phase`` function it is given, and performs the optimizer update when one is due.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from asynchat._checks import positive_int
from asynchat._handle import LoopHandle
from asynchat._phase import Phase
from asynchat._state import LoopState

LossFn = Callable[[Any, Any], torch.Tensor]
RunPhase = Callable[[Phase], None]
Amp = Literal["bf16", "fp16"]

_AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BatchProcessor(abc.ABC):
    """The protocol: what a loop calls once per step, on its compute thread.

    Subclasses implement :meth:`step`; :meth:`setup` is called once per run, on the compute
    thread, after the model is on its device and before ``on_loop_begin``.
    """

    def setup(self, loop: LoopHandle) -> None:  # noqa: B027 - optional, does nothing by default
        """Prepare for a run of ``loop`` (e.g. create a grad scaler)."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (e.g. the grad scaler's)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Restore what :meth:`state_dict` returned; called after :meth:`setup`."""

    @abc.abstractmethod
    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        """Run one step on ``state.batch``.

        Call ``run_phase(Phase.ON_BATCH_BEGIN)`` and ``run_phase(Phase.ON_BATCH_END)`` around
        each batch, set ``state.outputs`` and ``state.loss``, and, when ``state.training``,
        update ``state.optimizer`` when an update is due.
        """


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a pair, a 1-sequence, a tensor, or a dict.

    A dict's ``"targets"`` (or ``"target"``/``"labels"``) entry is the targets and the rest is
    passed to the model as keyword arguments.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        for key in ("targets", "target", "labels"):
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        return dict(batch), None
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    raise TypeError(
        f"BasicBatchProcessor cannot split a batch of type {type(batch).__name__}"
        f"{f' and length {len(batch)}' if isinstance(batch, Sequence) else ''} into "
        "(inputs, targets): yield (inputs, targets), a tensor, or a dict with a 'targets' "
        "key, or pass a BatchProcessor subclass that understands your batches"
    )


class BasicBatchProcessor(BatchProcessor):
    """One batch per step: forward, loss, backward, and an optimizer update when due.

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``. Needed to train; optional to
            predict (then ``state.loss`` is computed only when the batch has targets).
        grad_accumulation_steps: update the optimizer every this many steps (and at the last
            step of each epoch), with each step's loss divided by it.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` for mixed precision under ``torch.autocast``;
            ``"fp16"`` scales the loss with a ``torch.amp.GradScaler`` when training.
        set_to_none: passed to ``optimizer.zero_grad`` after each update.
    """

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        *,
        grad_accumulation_steps: int = 1,
        amp: Amp | None = None,
        set_to_none: bool = True,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        positive_int("grad_accumulation_steps", grad_accumulation_steps)
        if amp is not None and amp not in _AMP_DTYPES:
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.loss_fn = loss_fn
        self.grad_accumulation_steps = grad_accumulation_steps
        self.amp = amp
        self.set_to_none = set_to_none
        self.scaler: torch.amp.GradScaler | None = None
        self._device_type = "cpu"

    def setup(self, loop: LoopHandle) -> None:
        self._device_type = loop.device.type
        if self.amp == "fp16" and loop.training:
            self.scaler = torch.amp.GradScaler(self._device_type)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        state.batch_idx = 0
        self.run_batch(
            state, state.batch, self.loss_fn, run_phase, sync_grads=self.update_due(state)
        )
        if state.training:
            self.update_if_due(state, run_phase)

    # -- the pieces, shared with MultiBatchProcessor ---------------------------------------

    def run_batch(
        self,
        state: LoopState,
        batch: Any,
        loss_fn: LossFn | None,
        run_phase: RunPhase,
        *,
        sync_grads: bool = True,
    ) -> None:
        """``on_batch_begin``, forward, loss, backward (when training), ``on_batch_end``.

        ``sync_grads=False`` skips DDP's gradient all-reduce in this backward (``no_sync``):
        for every backward of an update but its last one (accumulation steps, sub-batches).
        """
        run_phase(Phase.ON_BATCH_BEGIN)
        inputs, targets = split_batch(batch)
        sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if state.training and not sync_grads and hasattr(state.model, "no_sync"):
            # DDP: no gradient all-reduce until the update's last backward. The context must
            # hold the forward too: DDP prepares its reducer there.
            sync = state.model.no_sync()  # type: ignore[operator]
        with sync:
            with self._autocast():
                model = state.model
                outputs = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
                loss = None
                if loss_fn is not None and targets is not None:
                    loss = loss_fn(outputs, targets)
            state.outputs = outputs
            state.loss = loss
            if state.training:
                if loss is None:
                    raise ValueError(
                        "cannot train on a batch without a loss: BasicBatchProcessor needs "
                        "loss_fn=... and batches with targets"
                    )
                if self.grad_accumulation_steps > 1:
                    loss = loss / self.grad_accumulation_steps
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        run_phase(Phase.ON_BATCH_END)

    def update_due(self, state: LoopState) -> bool:
        """Whether this step ends an accumulation (and so updates the optimizer)."""
        return state.is_last_step or (state.step + 1) % self.grad_accumulation_steps == 0

    def update_if_due(self, state: LoopState, run_phase: RunPhase) -> None:
        """If this step ends an accumulation: ``on_before_update``, optimizer step, zero grads."""
        if not self.update_due(state):
            return
        optimizer = state.optimizer
        assert optimizer is not None
        if self.scaler is not None:
            # Hooks at on_before_update see true gradients (clipping needs them); scaler.step
            # knows they are unscaled already and does not unscale them again.
            self.scaler.unscale_(optimizer)
        run_phase(Phase.ON_BEFORE_UPDATE)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=self.set_to_none)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=_AMP_DTYPES[self.amp])


class MultiBatchProcessor(BasicBatchProcessor):
    """Several batches per step (e.g. one per task) and one optimizer update per step.

    The step's item is a tuple (or list) of sub-batches; each runs as a batch with its own
    ``on_batch_begin``/``on_batch_end`` (``state.batch_idx`` is its index, ``state.batch`` the
    sub-batch, ``state.loss`` its loss) and gradients add up across them. At ``on_step_end``,
    ``state.batch`` is the whole item, ``state.outputs`` the tuple of outputs and
    ``state.loss`` the sum of the losses.

    Args:
        loss_fn: one loss for every sub-batch, or a sequence with one per sub-batch.
        The other arguments are :class:`BasicBatchProcessor`'s.
    """

    def __init__(
        self,
        loss_fn: LossFn | Sequence[LossFn] | None = None,
        *,
        grad_accumulation_steps: int = 1,
        amp: Amp | None = None,
        set_to_none: bool = True,
    ) -> None:
        loss_fns: tuple[LossFn, ...] | None = None
        if isinstance(loss_fn, Sequence):
            loss_fns = tuple(loss_fn)
            for i, fn in enumerate(loss_fns):
                if not callable(fn):
                    raise TypeError(f"loss_fn[{i}] must be callable, got {fn!r}")
            loss_fn = None
        super().__init__(
            loss_fn,
            grad_accumulation_steps=grad_accumulation_steps,
            amp=amp,
            set_to_none=set_to_none,
        )
        self.loss_fns = loss_fns

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        item = state.batch
        if not isinstance(item, (tuple, list)) or not item:
            raise TypeError(
                "MultiBatchProcessor expects each step's item to be a non-empty tuple of "
                f"sub-batches, got {type(item).__name__}"
            )
        if self.loss_fns is not None and len(self.loss_fns) != len(item):
            raise ValueError(
                f"MultiBatchProcessor got {len(self.loss_fns)} loss functions for a step of "
                f"{len(item)} sub-batches; pass one loss_fn per sub-batch"
            )
        outputs: list[Any] = []
        losses: list[torch.Tensor] = []
        try:
            for i, batch in enumerate(item):
                state.batch_idx = i
                state.batch = batch
                loss_fn = self.loss_fns[i] if self.loss_fns is not None else self.loss_fn
                # One gradient all-reduce per update, at its last sub-batch (HAT's delay_sync).
                last = i == len(item) - 1 and self.update_due(state)
                self.run_batch(state, batch, loss_fn, run_phase, sync_grads=last)
                outputs.append(state.outputs)
                if state.loss is not None:
                    losses.append(state.loss.detach())
        finally:
            state.batch = item
        state.outputs = tuple(outputs)
        state.loss = torch.stack(losses).sum() if losses else None
        if state.training:
            self.update_if_due(state, run_phase)
