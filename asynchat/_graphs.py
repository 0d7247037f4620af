"""CudaGraphBatchProcessor: a training step replayed as CUDA graphs, with no launch cost.

A step is two graphs sharing one memory pool, captured once after a few eager warm-up
steps and replayed on the compute stream from then on:

- **accumulate**: forward, loss and backward of the batch held in static input buffers
  (the staged batch is copied in, device to device), the gradients *added* into their
  static ``.grad`` tensors;
- **update**: for each optimizer in turn, unscale (fp16), the graph-safe
  ``on_before_update`` hooks (GradClip), its step and its gradients zeroed in place; then
  the grad scaler's update.

One step replays *accumulate*, then *update* when an update is due, so gradient
accumulation is the same two graphs. The eager steps (warm-up, and a batch of another
shape) run exactly the code the graphs hold.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from asynchat._capture import GATE
from asynchat._checks import loss_function, positive_int
from asynchat._every import rule_of
from asynchat._handle import LoopHandle
from asynchat._phase import Phase
from asynchat._processor import (
    _AMP_DTYPES,
    Amp,
    BasicBatchProcessor,
    LossFn,
    RunPhase,
    _forward,
    needs_closure,
    split_for,
    updated_in_turn,
)
from asynchat._state import LoopState
from asynchat._tree import iter_tensors, map_tensors


def signature(batch: Any) -> tuple[tuple[Any, ...], ...]:
    """What a graph's static inputs fix: each tensor's shape, dtype and device, in order."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in iter_tensors(batch))


def check_graphable(
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    callbacks: Sequence[Any],
    amp: Amp | None,
) -> None:
    """Refuse, with what to change, a setup whose step a CUDA graph would replay wrongly."""
    _check_model(model)
    updated_in_turn(model, optimizers)  # several: each its own parameters, no closure
    scheduled = any(getattr(c, "sets_lr", False) for c in callbacks)
    for name, optimizer in optimizers.items():
        kind = type(optimizer).__name__
        if len(optimizers) > 1:
            kind = f"{kind} (optimizer {name!r})"
        _check_optimizer(kind, optimizer, amp, scheduled)
    _check_update_hooks(callbacks)


def _check_optimizer(
    kind: str, optimizer: torch.optim.Optimizer, amp: Amp | None, scheduled: bool
) -> None:
    groups, defaults = optimizer.param_groups, optimizer.defaults
    if needs_closure(optimizer):
        raise ValueError(
            f"CudaGraphBatchProcessor: {kind} evaluates the loss again as it steps, as many "
            "times as its tests on the loss say, which a replayed graph cannot; train it with "
            "BasicBatchProcessor"
        )
    # Optimizers that keep a step counter (Adam, AdamW...) have a capturable variant that
    # keeps it on the device; without it the counter stays on the host and a replay
    # never advances it (torch refuses the capture).
    if "capturable" in defaults and not all(g["capturable"] for g in groups):
        raise ValueError(
            f"CudaGraphBatchProcessor: {kind} must be built with capturable=True (e.g. "
            f"{type(optimizer).__name__}(params, lr=..., capturable=True, fused=True)): "
            "otherwise its step counter lives on the host, and a replayed graph never "
            "advances it"
        )
    if amp == "fp16" and not all(g.get("fused") for g in groups):
        raise ValueError(
            f"CudaGraphBatchProcessor(amp='fp16') needs a fused optimizer ({kind} with "
            "fused=True): the grad scaler's step otherwise reads its inf check on the host, "
            "which a graph cannot"
        )
    if scheduled:
        _check_scheduled(kind, optimizer)


def _check_scheduled(kind: str, optimizer: torch.optim.Optimizer) -> None:
    """Under an LR schedule: a learning rate the graph reads from the device."""
    groups, defaults = optimizer.param_groups, optimizer.defaults
    if not all(isinstance(g["lr"], torch.Tensor) for g in groups):
        raise ValueError(
            f"CudaGraphBatchProcessor with an LR schedule needs a tensor learning rate "
            f"({kind}: lr=torch.tensor(1e-3, device='cuda')): a float lr is baked into the "
            "graph and the schedule would silently stop"
        )
    if "capturable" in defaults or all(g.get("fused") for g in groups):
        return
    if "fused" in defaults:
        raise ValueError(
            f"CudaGraphBatchProcessor with an LR schedule: {kind} reads a tensor learning "
            "rate on the host unless fused; build it with fused=True"
        )
    raise ValueError(
        f"CudaGraphBatchProcessor with an LR schedule: {kind} reads its learning rate on "
        "the host as it steps (it can be neither capturable nor fused), so a graph cannot "
        "follow the schedule; train it without one, or with BasicBatchProcessor"
    )


def _check_update_hooks(callbacks: Sequence[Any]) -> None:
    """``on_before_update`` runs inside the update graph: only graph-safe ``def`` hooks."""
    for callback in callbacks:
        hook = getattr(type(callback), "on_before_update", None)
        if hook is None or _not_overridden(callback, "on_before_update"):
            continue
        if inspect.iscoroutinefunction(hook) or not getattr(callback, "graph_safe", False):
            raise ValueError(
                f"CudaGraphBatchProcessor: {type(callback).__name__}.on_before_update would "
                "run inside the captured graph (once, at capture, for its Python side). Only "
                "def hooks that launch sync-free kernels may (set graph_safe = True on the "
                "class, as GradClip does); move other work to on_step_end"
            )
        if rule_of(hook) is not None:
            raise ValueError(
                f"CudaGraphBatchProcessor: {type(callback).__name__}.on_before_update has "
                "@every(...), but it runs inside the captured graph, which replays it at every "
                "update or never; drop @every, or move the work to on_step_end"
            )


def _check_model(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, FSDPModule)) or any(
        isinstance(m, FSDPModule) for m in model.modules()
    ):
        raise ValueError(
            "CudaGraphBatchProcessor does not capture DDP's or FSDP's collectives yet; use "
            "it with Trainer on one device, or BasicBatchProcessor(compile=...) on several"
        )


def _not_overridden(callback: Any, name: str) -> bool:
    from asynchat._callback import Callback

    return getattr(type(callback), name) is getattr(Callback, name)


class CudaGraphBatchProcessor(BasicBatchProcessor):
    """One batch per step, replayed as CUDA graphs after ``warmup_steps`` eager steps: the
    whole step (forward, loss, backward, optimizer update) costs two graph launches.

    Several optimizers on the one loss step in turn, as with :class:`BasicBatchProcessor`
    (each holds parameters of its own), all in the update graph.

    Requirements, checked at the first step with what to change: CUDA; of each optimizer,
    ``capturable=True`` if it has the option (Adam, AdamW: their step counter must live on
    the device), no closure (LBFGS); with an LR schedule a tensor learning rate
    (``lr=torch.tensor(1e-3, device="cuda")``: a float is baked into the graph), and
    ``fused=True`` for an optimizer without ``capturable`` (SGD; one with neither, Muon,
    cannot follow a schedule in a graph); ``amp="fp16"`` only with fused optimizers;
    ``on_before_update`` hooks only from callbacks marked ``graph_safe`` (GradClip is; they
    run inside the graph, their Python side once, at capture).

    What changes for callbacks: ``on_batch_begin``/``on_batch_end`` and every step- and
    epoch-level hook run eagerly around the replay, as usual. ``state.outputs``,
    ``state.loss`` and the gradients are static buffers that the next replay overwrites:
    read them in the step they belong to (loggers and metrics do), and copy what you keep.

    A batch of another shape (the last, partial one; use ``drop_last=True`` to avoid it)
    runs eagerly, with a warning once. :meth:`invalidate` re-warms and re-captures: call it
    after parameters, gradients or optimizer state were replaced; a change of which
    parameters require gradients (FreezeModule) is noticed by itself. Prediction and
    validation steps run eagerly. One device: a DDP or FSDP model is refused (their
    collectives are not captured yet).

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        warmup_steps: eager optimizer updates before the capture (they create the
            optimizer's state and the grad scale).
        amp, grad_accumulation_steps, samples: as for :class:`BasicBatchProcessor`.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        warmup_steps: int = 3,
        amp: Amp | None = None,
        grad_accumulation_steps: int = 1,
        samples: Callable[[Any], int] | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "CudaGraphBatchProcessor needs CUDA (torch.cuda.is_available() is False); "
                "on this machine use BasicBatchProcessor, or BasicBatchProcessor(compile=True)"
            )
        loss_function("loss_fn", loss_fn)
        positive_int("warmup_steps", warmup_steps)
        super().__init__(
            loss_fn, amp=amp, grad_accumulation_steps=grad_accumulation_steps,
            set_to_none=False, samples=samples,
        )  # fmt: skip
        self.warmup_steps = warmup_steps
        self._stream: torch.cuda.Stream | None = None
        self._graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self._static: tuple[Any, Any, torch.Tensor] | None = None  # batch, outputs, loss
        self._signature: tuple[tuple[Any, ...], ...] = ()  # of the static batch
        self._checked = False
        self._warm = 0
        self._params: tuple[bool, ...] = ()
        self._warned_shape = False

    def setup(self, loop: LoopHandle) -> None:
        if loop.device.type != "cuda":
            raise ValueError(
                f"CudaGraphBatchProcessor runs on a CUDA device; the loop's is {loop.device}"
            )
        super().setup(loop)
        self._stream = torch.cuda.Stream(loop.device)  # type: ignore[no-untyped-call]
        self._checked, self._params = False, ()  # a new run: its optimizer, its model
        self.invalidate()

    def invalidate(self) -> None:
        """Drop the graphs: the next steps warm up again, then capture anew."""
        self._graphs, self._static, self._warm = None, None, 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        # A cast cached in one step would be a stale buffer in the graph: no cache.
        return torch.autocast("cuda", dtype=_AMP_DTYPES[self.amp], cache_enabled=False)

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        if not state.training:
            super().step(state, run_phase)
            return
        if not self._checked:
            check_graphable(state.model, state.optimizers, state.loop.callbacks, self.amp)
            self._checked = True
        self._notice_changes(state)
        state.batch_idx = 0
        run_phase(Phase.ON_BATCH_BEGIN)
        if self._graphs is None and self._warm >= self.warmup_steps:
            self._capture(state, run_phase)
        due = self.update_due(state)
        if self._graphs is not None and self._fits(state.batch):
            self._replay_accumulate(state)
            run_phase(Phase.ON_BATCH_END)
            if due:
                self._select_optimizer(state)
                self._graphs[1].replay()
            return
        self._eager_step(state, run_phase, due)

    def _notice_changes(self, state: LoopState) -> None:
        params = tuple(p.requires_grad for p in state.model.parameters())
        if params != self._params:
            if self._params:
                self.invalidate()  # FreezeModule (or another hook) changed what trains
            self._params = params

    def _fits(self, batch: Any) -> bool:
        shapes = signature(batch)
        if shapes == self._signature:
            return True
        if not self._warned_shape:
            self._warned_shape = True
            warnings.warn(
                f"CudaGraphBatchProcessor: a batch of shapes {shapes} does not fit "
                f"the graph's {self._signature}; such batches run eagerly "
                "(slower). drop_last=True avoids the last, partial one",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    def _eager_step(self, state: LoopState, run_phase: RunPhase, due: bool) -> None:
        state.outputs, state.loss = self._accumulate(state, state.batch)
        run_phase(Phase.ON_BATCH_END)
        if due:
            self._update(state, run_phase)
            # Warm-up counts updates: the optimizer's state (and the grad scale) must exist
            # before the capture, or the graph would hold their initialisation and replay it.
            if self._graphs is None:
                self._warm += 1

    def _accumulate(self, state: LoopState, batch: Any) -> tuple[Any, torch.Tensor]:
        """What the accumulate graph holds: forward, loss, backward into ``.grad``."""
        inputs, targets = split_for(batch, self.loss_fn)
        with self.autocast():
            outputs, loss = _forward(state.model, self.loss_fn, inputs, targets)
        if loss is None:
            raise ValueError("CudaGraphBatchProcessor trains on batches with targets")
        self.backward(state, loss)
        return outputs, loss

    def _update(self, state: LoopState, run_phase: RunPhase) -> None:
        """What the update graph holds, for each optimizer in turn (as
        :meth:`~BatchProcessor.update_each`): unscale, on_before_update, step, zero its
        gradients; then the grad scaler's update."""
        for name, optimizer in state.optimizers.items():
            state.optimizer, state.optimizer_name = optimizer, name
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            run_phase(Phase.ON_BEFORE_UPDATE)
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # in place: the graphs hold these tensors
        if self.scaler is not None:
            self.scaler.update()  # in the step, so in the graph (end_step has nothing to do)

    def _select_optimizer(self, state: LoopState) -> None:
        """``state.optimizer`` as an update leaves it: the last one stepped."""
        *_, (name, optimizer) = state.optimizers.items()
        state.optimizer, state.optimizer_name = optimizer, name

    def _replay_accumulate(self, state: LoopState) -> None:
        assert self._graphs is not None and self._static is not None
        static_batch, outputs, loss = self._static
        batch = iter_tensors(state.batch)
        for target, source in zip(iter_tensors(static_batch), batch, strict=True):
            target.copy_(source, non_blocking=True)  # device to device, on the compute stream
        self._graphs[0].replay()
        state.outputs, state.loss = outputs, loss

    def _capture(self, state: LoopState, run_phase: RunPhase) -> None:
        """Capture both graphs from this step's batch, on the private stream (every thread
        of asynchat's that stages batches held meanwhile); nothing runs until a replay."""
        assert self._stream is not None
        compute = torch.cuda.current_stream()
        static_batch = map_tensors(lambda t: t.clone(), state.batch)
        for p in state.model.parameters():
            if p.requires_grad and p.grad is None:  # the graph adds into existing .grad
                p.grad = torch.zeros_like(p)
        self._stream.wait_stream(compute)
        accumulate, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with GATE.capturing():
            with torch.cuda.graph(
                accumulate, stream=self._stream, capture_error_mode="thread_local"
            ):
                outputs, loss = self._accumulate(state, static_batch)
            with torch.cuda.graph(
                update, pool=accumulate.pool(), stream=self._stream,
                capture_error_mode="thread_local",
            ):  # fmt: skip
                self._update(state, run_phase)
        compute.wait_stream(self._stream)
        self._graphs = (accumulate, update)
        self._static = (static_batch, outputs, loss)
        self._signature = signature(static_batch)
