"""Callbacks that act on the model: ExponentialMovingAverage, GradClip, FreezeModule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from asynchat._callback import Callback
from asynchat._checks import flag, positive_int, real
from asynchat._every import UpdateDue
from asynchat._handle import LoopHandle
from asynchat._ranks import local_parts
from asynchat._state import LoopState
from asynchat._weights import plain_modules


class ExponentialMovingAverage(Callback):
    """Keeps an exponential moving average of the model's parameters and buffers.

    After each optimizer update (on the compute thread, with fused ``foreach`` ops on the
    device): ``ema = decay * ema + (1 - decay) * weights``; with gradient accumulation, at
    the last step of each window (the weights do not change between). Floating-point
    buffers (BatchNorm's running statistics) are averaged alike; integer ones
    (``num_batches_tracked``) are not kept. The average of a tensor narrower than float32
    (bfloat16, float16) is kept in float32 (:attr:`shadow`; twice the memory of those
    tensors, and each update reads them widened): kept in their own type, ``(1 - decay)``
    of a difference falls below their resolution (8 bits of mantissa in bfloat16: at
    ``decay=0.999`` a weight near 1.0 had to differ from its average by 2 to 4 before the
    average moved at all), and the average stayed where it began.
    ``Validation(use_ema=True)`` validates the averaged weights; :meth:`swapped_in` swaps them
    into the model for any other use, and :meth:`copy_to` writes them for good. The average
    is kept in checkpoints; a run that does not resume starts it from the model's weights.

    Args:
        decay: weight of the old average, in [0, 1).
        every_n_steps: update every n steps (inside an accumulation window: at its end).
        warmup: ramp the decay as ``min(decay, (1 + n) / (10 + n))`` over the first updates,
            so early averages are not dominated by the random initialization.
    """

    every_rank = True

    def __init__(
        self, decay: float = 0.999, *, every_n_steps: int = 1, warmup: bool = True
    ) -> None:
        real("decay", decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        positive_int("every_n_steps", every_n_steps)
        flag("warmup", warmup)
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.warmup = warmup
        self.updates = 0
        self.shadow: list[torch.Tensor] = []
        self._widened: list[int] = []  # (indices into shadow)
        self._loaded: list[torch.Tensor] | None = None
        self._due = UpdateDue()

    @staticmethod
    def find(loop: LoopHandle) -> ExponentialMovingAverage:
        for callback in loop.callbacks:
            if isinstance(callback, ExponentialMovingAverage):
                return callback
        raise LookupError(
            f"{loop.name} has no ExponentialMovingAverage callback; add one to use_ema=True"
        )

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]

    def on_loop_begin(self, state: LoopState) -> None:
        live = self._tensors(state.model)
        self._due = UpdateDue()
        if self._loaded is not None:  # (one saved in a narrow type, before it was widened)
            pairs = zip(self._loaded, live, strict=True)  # (the model loaded first: alike)
            self._loaded = None
            self.shadow = [t.to(state.device, _averaged_as(like)) for t, like in pairs]
        else:  # a new run (an instance reused by one kept another model's average)
            self.shadow = [t.detach().to(_averaged_as(t), copy=True) for t in live]
            self.updates = 0
        # The tensors averaged in a wider type (none in a float32 model: each step is then
        # spared a conversion per tensor, about 1 us each on the CPU).
        self._widened = [i for i, t in enumerate(live) if self.shadow[i].dtype != t.dtype]

    @torch.no_grad()
    def on_step_end(self, state: LoopState) -> None:
        if not self._due(state, self.every_n_steps):
            return
        self.updates += 1
        decay = (
            min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        )
        # On this rank's parts (under FSDP a DTensor's shard, which the average's matching
        # DTensor holds alike): DTensor has no sharding rule for some foreach ops
        # (``_foreach_copy_``).
        shadow = local_parts(self.shadow)
        live = local_parts(t.detach() for t in self._tensors(state.model))
        for i in self._widened:
            live[i] = live[i].to(shadow[i].dtype)
        torch._foreach_lerp_(shadow, live, 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Use the averaged weights inside the block; the model's own come back after."""
        live = local_parts(self._tensors(model))
        saved = [t.detach().clone() for t in live]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the average (rounded to their types)."""
        torch._foreach_copy_(local_parts(self._tensors(model)), local_parts(self.shadow))

    def state_dict(self) -> dict[str, Any]:
        # The live average, not a copy (a checkpoint copies it to host memory, DCP stages it).
        return {"shadow": list(self.shadow), "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict["shadow"])
        self.updates = state_dict["updates"]


def _averaged_as(tensor: torch.Tensor) -> torch.dtype:
    """The type the average of ``tensor`` is kept in: float32 if it is a narrower float."""
    return torch.float32 if tensor.element_size() < 4 else tensor.dtype


class GradClip(Callback):
    """Clips the gradient norm to ``max_norm`` before each optimizer update.

    Runs at ``on_before_update``, where fp16 gradients are already unscaled, so the norm is
    the true one, over the parameters of the optimizer about to step (``state.optimizer``).
    With several optimizers, ``optimizer="g"`` clips only at that optimizer's updates (and
    only its parameters); without it every update is clipped, each over its own parameters.
    ``state.metrics["grad_norm"]`` is not published: reading the norm would be a host sync
    every step (``torch.nn.utils.clip_grad_norm_`` itself does not sync); ``last_norm`` holds
    the last norm as a device tensor. ``norm_type`` is the p of the p-norm (> 0; ``math.inf``
    or ``"inf"``: the largest magnitude).

    Graph-safe: under a :class:`~asynchat.CudaGraphBatchProcessor` the clipping runs inside
    the captured update (``last_norm`` is then a buffer each replay rewrites).
    """

    every_rank = True
    graph_safe = True

    def __init__(
        self,
        max_norm: float,
        *,
        norm_type: float | Literal["inf"] = 2.0,
        optimizer: str | None = None,
    ) -> None:
        real("max_norm", max_norm)
        if not max_norm > 0:  # (inf is allowed: the norm is then only measured)
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        if norm_type == "inf":  # (as torch takes it)
            norm_type = math.inf
        real("norm_type", norm_type)
        if not norm_type > 0:  # (inf: the largest gradient entry's magnitude)
            raise ValueError(f"norm_type must be > 0, got {norm_type!r}")
        if optimizer is not None and (not isinstance(optimizer, str) or not optimizer):
            raise ValueError(f"optimizer must be an optimizer's name or None, got {optimizer!r}")
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.optimizer = optimizer
        self.last_norm: torch.Tensor | None = None

    def on_loop_begin(self, state: LoopState) -> None:
        if self.optimizer is not None and self.optimizer not in state.optimizers:
            raise ValueError(
                f"GradClip(optimizer={self.optimizer!r}): the loop's optimizers are "
                f"{sorted(state.optimizers)}"
            )

    def on_before_update(self, state: LoopState) -> None:
        if self.optimizer is not None and state.optimizer_name != self.optimizer:
            return
        optimizer = state.optimizer
        assert optimizer is not None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        try:
            self.last_norm = torch.nn.utils.clip_grad_norm_(
                params, self.max_norm, norm_type=self.norm_type
            )
        except NotImplementedError as exc:  # (torch before 2.14: no norm of a sparse tensor)
            if any(p.grad is not None and p.grad.is_sparse for p in params):
                name = state.optimizer_name
                raise ValueError(
                    f"GradClip: the optimizer {name!r} ({type(optimizer).__name__}) has sparse "
                    "gradients (an nn.Embedding(sparse=True)), whose norm this torch does not "
                    f"take ({torch.__version__}; 2.14 does): clip only the others, "
                    "GradClip(max_norm, optimizer='<a dense one>')"
                ) from exc
            raise


class FreezeModule(Callback):
    """Freezes submodules (no gradients, eval mode) for the first ``until_epoch`` epochs, or
    for the whole run.

    Args:
        names: dotted submodule names of the model as given to the trainer (not of a DDP
            wrapper, nor with ``torch.compile``'s ``_orig_mod``: a compiled model's names
            are those of the model it compiles), e.g. ``["backbone", "head.0"]``. Under
            DDP, parameters frozen while
            others train need ``find_unused_parameters=True`` (refused before the first
            step without it).
        until_epoch: unfreeze when this epoch begins (``None``: frozen throughout).
        eval_mode: also keep the frozen modules in ``eval()`` mode (BatchNorm, Dropout).
    """

    every_rank = True
    shared_across_loops = True  # it keeps no state of a run: one instance may serve many

    def __init__(
        self, names: Sequence[str], *, until_epoch: int | None = None, eval_mode: bool = True
    ) -> None:
        listed = [] if isinstance(names, str) or not isinstance(names, Iterable) else list(names)
        if not listed or not all(isinstance(name, str) for name in listed):
            raise ValueError(f"names must be a non-empty list of submodule names, got {names!r}")
        positive_int("until_epoch", until_epoch, allow_none=True, minimum=0)
        flag("eval_mode", eval_mode)
        self.names = listed
        self.until_epoch = until_epoch
        self.eval_mode = eval_mode

    def _modules(self, model: nn.Module) -> list[nn.Module]:
        found = plain_modules(model)  # the names of the model uncompiled
        missing = [name for name in self.names if name not in found]
        if missing:
            raise KeyError(
                f"FreezeModule: no submodule named {missing}; the model has "
                f"{sorted(n for n in found if n)[:20]}"
            )
        return [found[name] for name in self.names]

    def on_loop_begin(self, state: LoopState) -> None:
        modules = self._modules(state.loop.model)  # fail early on a wrong name
        # DDP's reducer waits for a gradient of every parameter that required one when it
        # was wrapped; freezing such a parameter later fails at the next backward with
        # torch's "Expected to have finished reduction in the prior iteration".
        trained_then = {id(p) for m in modules for p in m.parameters() if p.requires_grad}
        waiting = [
            wrapper for wrapper in state.model.modules()
            if isinstance(wrapper, nn.parallel.DistributedDataParallel)
            and not wrapper.find_unused_parameters
            and any(id(p) in trained_then for p in wrapper.module.parameters())
        ]  # fmt: skip
        if waiting:
            raise ValueError(
                f"FreezeModule({self.names!r}) under DDP needs "
                "DistributedDataParallelTrainer(..., find_unused_parameters=True): DDP "
                "waits for a gradient of every parameter it wrapped, and frozen ones get none"
            )

    def on_epoch_begin(self, state: LoopState) -> None:
        frozen = self.until_epoch is None or state.epoch < self.until_epoch
        # The unwrapped module's names: under DDP/DP `state.model` is the wrapper, whose
        # names carry a `module.` prefix.
        for module in self._modules(state.loop.model):
            module.requires_grad_(not frozen)
            if self.eval_mode and state.training:
                module.train(not frozen)
