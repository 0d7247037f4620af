"""Batch processors: one step of model work, run on the compute thread.

A step's item from the data loader is handed to :meth:`BatchProcessor.step` once. The
processor runs ``on_batch_begin``/``on_batch_end`` around each batch through the
``run_phase`` function it is given, and performs the optimizer update when one is due.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import reprlib
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import torch

from asynchat._checks import flag, loss_function, positive_int
from asynchat._errors import add_note
from asynchat._handle import LoopHandle
from asynchat._phase import Phase
from asynchat._state import LoopState
from asynchat._tree import batch_size

LossFn = Callable[[Any, Any], torch.Tensor]
RunPhase = Callable[[Phase], None]
Amp = Literal["bf16", "fp16"]

_AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

# What autocast() and no_sync() return when there is nothing to do: one instance (a
# nullcontext holds no state), not a new one per step.
_NOTHING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class BatchProcessor(abc.ABC):
    """What a loop calls once per step, on its compute thread; subclass it for custom steps.

    Subclasses implement :meth:`step`. :meth:`setup` is called once per run, on the compute
    thread, after the model is on its device and before ``on_loop_begin``; a subclass that
    overrides :meth:`setup`, :meth:`state_dict` or :meth:`load_state_dict` calls ``super()``'s
    (they hold the grad scaler).

    **The step API.** A custom :meth:`step` makes its updates with the same machinery as the
    built-in processors, so mixed precision, gradient accumulation, DDP's gradient sync and
    the ``on_before_update`` phase behave the same in every step::

        def step(self, state, run_phase):
            run_phase(Phase.ON_BATCH_BEGIN)
            with self.no_sync(state), self.autocast():
                loss = ...
            self.backward(state, loss)      # scaled for fp16, divided for accumulation
            self.update(state, run_phase, "d")   # on_before_update, step, zero_grad
            ...
            run_phase(Phase.ON_BATCH_END)

    Args:
        amp: ``None``, ``"bf16"`` or ``"fp16"``: :meth:`autocast` runs under
            ``torch.autocast`` with that dtype; ``"fp16"`` scales losses with one
            ``torch.amp.GradScaler`` for all optimizers when training (its scale is updated
            once per step, after the step's last update, as PyTorch's AMP recipe for several
            optimizers says).
        grad_accumulation_steps: :meth:`update` steps the optimizer every this many steps
            (and at the last step of each epoch); :meth:`backward` divides each loss by it.
        set_to_none: passed to ``optimizer.zero_grad`` after each update.
        samples: ``samples(batch) -> int``, how many samples a batch holds, for throughput
            (``samples_per_s``) and sample-weighted means such as Validation's loss; default:
            the first dimension of the batch's first tensor. For time-major batches
            (``seq_len x batch``) pass ``lambda batch: batch[0].shape[1]``.
    """

    # Class-level defaults: a subclass that does not call __init__ gets plain fp32 steps.
    amp: Amp | None = None
    grad_accumulation_steps: int = 1
    set_to_none: bool = True
    samples: Callable[[Any], int] | None = None
    scaler: torch.amp.GradScaler | None = None
    _device_type: str = "cpu"
    _scaler_stepped: bool = False

    def __init__(
        self,
        *,
        amp: Amp | None = None,
        grad_accumulation_steps: int = 1,
        set_to_none: bool = True,
        samples: Callable[[Any], int] | None = None,
    ) -> None:
        positive_int("grad_accumulation_steps", grad_accumulation_steps)
        flag("set_to_none", set_to_none)
        if amp is not None and (not isinstance(amp, str) or amp not in _AMP_DTYPES):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        if samples is not None and not callable(samples):
            raise TypeError(f"samples must be a function samples(batch) -> int, got {samples!r}")
        self.amp = amp
        self.grad_accumulation_steps = grad_accumulation_steps
        self.set_to_none = set_to_none
        self.samples = samples

    def samples_in(self, batch: Any) -> int:
        """How many samples ``batch`` holds (see ``samples``)."""
        if self.samples is None:
            return batch_size(batch)
        count = self.samples(batch)
        # Checked at every batch (cheap): "8" failed only in snapshot() (a service's status
        # route) and Validation's weighting; -1 made samples/s negative, silently.
        if type(count) is not int:
            if isinstance(count, bool) or not hasattr(count, "__index__"):  # (float: none)
                raise TypeError(
                    f"samples(batch) must return the batch's number of samples, an int; it "
                    f"returned {count!r}"
                )
            count = count.__index__()  # (a numpy integer)
        if count < 0:
            raise ValueError(
                f"samples(batch) must return the batch's number of samples, an int >= 0; it "
                f"returned {count}"
            )
        return count

    def on_epoch_begin(self, state: LoopState) -> None:  # noqa: B027 - optional
        """Called by the loop at each epoch's begin, before the callbacks' ``on_epoch_begin``
        (e.g. to reset the hidden state a stateful step carries across batches)."""

    def on_epoch_end(self, state: LoopState) -> None:  # noqa: B027 - optional
        """Called by the loop at each epoch's end, after the callbacks' ``on_epoch_end``."""

    def setup(self, loop: LoopHandle) -> None:
        """Prepare for a run of ``loop``: the grad scaler when training in fp16."""
        self._device_type = loop.device.type
        self._in_turn = None
        if self.amp == "fp16" and loop.training:
            self.scaler = torch.amp.GradScaler(self._device_type)

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (the grad scaler's)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; called after :meth:`setup`."""
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])

    @abc.abstractmethod
    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        """Run one step on ``state.batch``.

        Call ``run_phase(Phase.ON_BATCH_BEGIN)`` and ``run_phase(Phase.ON_BATCH_END)`` around
        each batch, set ``state.outputs`` and ``state.loss`` (and ``state.losses`` for a step
        with several updates), and, when ``state.training``, make the updates with
        :meth:`update`.
        """

    def end_step(self, state: LoopState) -> None:
        """Called by the loop after :meth:`step`: updates the grad scale once per step."""
        if self._scaler_stepped:
            assert self.scaler is not None
            self.scaler.update()
            self._scaler_stepped = False

    # -- the step API ----------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The configured mixed precision for a forward pass (a no-op without ``amp``)."""
        if self.amp is None:
            return _NOTHING
        return torch.autocast(self._device_type, dtype=_AMP_DTYPES[self.amp])

    def update_due(self, state: LoopState) -> bool:
        """Whether this step ends an accumulation (and so :meth:`update` steps)."""
        return state.is_last_step or (state.step + 1) % self.grad_accumulation_steps == 0

    def no_sync(
        self, state: LoopState, model: torch.nn.Module | None = None, *, final: bool = True
    ) -> contextlib.AbstractContextManager[Any]:
        """Hold DDP's gradient all-reduce for a forward and backward that no update follows.

        Wrap the forward *and* the backward (DDP prepares its reducer in the forward; an
        FSDP2 module then neither reduce-scatters nor reshards). ``model`` defaults to
        ``state.model``; ``final=False`` holds the sync even when an update is due (for all
        but the last of several backwards before one update). A no-op for a model that is
        not distributed, and when not training.
        """
        model = state.model if model is None else model
        sync = final and self.update_due(state)
        if not state.training or sync:
            return _NOTHING
        return _held_sync(model)

    def backward(self, state: LoopState, loss: torch.Tensor) -> None:
        """``loss.backward()``, divided by ``grad_accumulation_steps`` and scaled for fp16.

        A loss that cannot be trained on is refused with a ``ValueError`` saying why (torch's
        own errors name neither the loss nor the likely cause): one of several elements (a
        loss with ``reduction="none"``), or one that depends on no parameter that trains;
        one that is no tensor (a loss function that returns ``loss.item()``), with a
        ``TypeError`` (it was ``'float' object has no attribute 'backward'``). Asked only
        once torch's backward has failed: the step pays nothing for it."""
        try:
            k = self.grad_accumulation_steps
            scaled = loss / k if k > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        except RuntimeError as exc:
            _refuse_untrainable(loss, exc)
            raise
        except Exception as exc:
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"the loss to train on must be a tensor computed from the model's outputs, "
                    f"got {type(loss).__name__} {reprlib.repr(loss)}: does the loss function "
                    "return a number (.item(), float()) or None?"
                ) from exc
            raise

    def update(
        self,
        state: LoopState,
        run_phase: RunPhase,
        optimizer: str | None = None,
        *,
        closure: Callable[[], Any] | None = None,
    ) -> bool:
        """Step the optimizer named ``optimizer`` if an update is due; return whether it did.

        Unscales its gradients (fp16), sets ``state.optimizer``/``state.optimizer_name`` to
        it, runs ``on_before_update`` (so clipping sees true gradients), steps it (through
        the grad scaler for fp16) and zeroes its gradients. ``optimizer`` may be left out
        when the loop has a single optimizer. Gradients that a backward left on parameters
        of *other* optimizers are not touched: clear them where your step needs it.

        ``closure`` goes to ``optimizer.step`` (``torch.optim.LBFGS`` needs one: it zeroes the
        gradients, computes the loss again, backward, returns it; not with fp16).
        """
        name, chosen = _pick_optimizer(state, optimizer)
        if not self.update_due(state):
            return False
        state.optimizer, state.optimizer_name = chosen, name
        if self.scaler is not None:
            # Hooks at on_before_update see true gradients (clipping needs them); scaler.step
            # knows they are unscaled already and does not unscale them again.
            self.scaler.unscale_(chosen)
        run_phase(Phase.ON_BEFORE_UPDATE)
        if self.scaler is not None:
            if closure is not None:
                kind = type(chosen).__name__
                raise ValueError(f"{kind} steps with a closure, which the grad scaler of "
                                 "amp='fp16' cannot do: use amp='bf16' or None")  # fmt: skip
            self.scaler.step(chosen)
            self._scaler_stepped = True
        elif closure is not None:
            chosen.step(closure)
        else:
            try:
                chosen.step()
            except TypeError as exc:
                if needs_closure(chosen):
                    raise TypeError(
                        f"{type(chosen).__name__} steps with a closure that evaluates the loss "
                        "again: pass one, self.update(state, run_phase, closure=...) (the "
                        "BasicBatchProcessor passes its own)"
                    ) from exc
                raise
        chosen.zero_grad(set_to_none=self.set_to_none)
        return True

    _in_turn: tuple[str, ...] | None = None  # what update_each steps (None: not known)

    def update_each(self, state: LoopState, run_phase: RunPhase) -> bool:
        """:meth:`update` of each of the loop's optimizers in turn, in the order they were
        given, for a step whose one loss trains them all: each holds parameters of its own
        (AdamW for some, Muon or SparseAdam for others), each update runs
        ``on_before_update`` (``GradClip`` clips each over its own parameters). Refused at
        the first step, saying why, where two optimizers hold one parameter (it would be
        updated twice) or one evaluates the loss again as it steps (LBFGS). Returns whether
        an update was due."""
        if self._in_turn is None:
            self._in_turn = updated_in_turn(state.model, state.optimizers)
        if not self._in_turn:
            return self.update(state, run_phase)
        due = False
        for name in self._in_turn:
            due = self.update(state, run_phase, name)
        return due


def updated_in_turn(
    model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]
) -> tuple[str, ...]:
    """The names of ``optimizers`` a step whose one loss trains them all steps in turn, as
    :meth:`BatchProcessor.update_each` does (none for one optimizer); refused, saying why,
    where one evaluates the loss again as it steps or two hold one parameter of ``model``."""
    if len(optimizers) < 2:
        return ()
    parameter_names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    for name, optimizer in optimizers.items():
        if needs_closure(optimizer):
            raise ValueError(
                f"{type(optimizer).__name__} (optimizer {name!r}) evaluates the loss again as it "
                "steps, which a step updating several optimizers on one loss cannot give it: "
                "train with it alone, or write the step (see Custom steps)"
            )
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                first = owner.setdefault(id(parameter), name)
                if first != name:
                    shape = f"of shape {tuple(parameter.shape)}"
                    shared = parameter_names.get(id(parameter), shape)
                    raise ValueError(
                        f"the optimizers {first!r} and {name!r} both hold the parameter "
                        f"{shared!r}: a step whose one loss trains several optimizers updates "
                        "each in turn, and would update it twice; give each parameter to one "
                        "optimizer"
                    )
    return tuple(optimizers)


def _as_is(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` averaged over the ranks of the default process group, DDP's (one all-reduce
    of a scalar), detached."""
    import torch.distributed as dist

    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.div_(dist.get_world_size())


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` must be given a closure (``torch.optim.LBFGS``)."""
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # (no signature to read)
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _refuse_untrainable(loss: torch.Tensor, error: RuntimeError) -> None:
    """A ValueError saying why, where ``error`` (torch's, from ``loss``'s backward) is one
    that names neither the loss nor the likely cause; else nothing."""
    if loss.numel() != 1:
        raise ValueError(
            f"the loss to train on must be a single number, got a tensor of shape "
            f"{tuple(loss.shape)}: reduce it in the loss function (e.g. its "
            "reduction='mean', not 'none')"
        ) from error
    if not loss.requires_grad:
        raise ValueError(
            "the loss depends on no parameter that trains: is every parameter frozen "
            "(requires_grad_(False), FreezeModule), or was the loss computed under "
            "torch.no_grad() or from detached outputs?"
        ) from error


def _held_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The context that holds ``model``'s gradient sync: DDP's ``no_sync``, FSDP2's flags,
    or each model's own for several models (a ``ModuleDict`` of wrappers)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (not imported: no model is sharded)
    if fsdp is not None and isinstance(model, fsdp.FSDPModule):
        return _fsdp_accumulating(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()  # type: ignore[no-any-return, operator]
    if isinstance(model, torch.nn.ModuleDict):
        stack = contextlib.ExitStack()
        for each in model.values():
            stack.enter_context(_held_sync(each))
        return stack
    return _NOTHING


@contextlib.contextmanager
def _fsdp_accumulating(model: Any) -> Iterator[None]:
    """An FSDP2 backward that neither reduce-scatters nor reshards: gradients accumulate
    unsharded until the micro-batch that updates."""
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)


def _pick_optimizer(state: LoopState, name: str | None) -> tuple[str, torch.optim.Optimizer]:
    optimizers = state.optimizers
    if name is None:
        if len(optimizers) == 1:
            return next(iter(optimizers.items()))
        if not optimizers:
            raise RuntimeError("update() needs a Trainer: this loop has no optimizer")
        raise ValueError(
            f"this Trainer has several optimizers, {sorted(optimizers)}: name the one to "
            "update, e.g. self.update(state, run_phase, 'g')"
        )
    if name not in optimizers:
        raise ValueError(f"no optimizer named {name!r}; the Trainer has {sorted(optimizers)}")
    return name, optimizers[name]


def check_processor(value: object) -> None:
    """``value`` (a ``batch_processor=`` argument) must be a :class:`BatchProcessor`."""
    if not isinstance(value, BatchProcessor):
        raise TypeError(f"batch_processor must be an asynchat.BatchProcessor, got {value!r}")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a pair, a 1-sequence, a tensor, or a dict.

    A dict's ``"targets"`` (or ``"target"``/``"labels"``) entry is the targets and the rest is
    passed to the model as keyword arguments.
    """
    if type(batch) in (tuple, list) and len(batch) == 2:  # the common case, checked cheaply
        return batch[0], batch[1]
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


def model_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """``loss_fn=model_loss``: the model computes its own loss (a Hugging Face model given
    ``labels``, a nanoGPT-style ``forward(idx, targets=None)``). The batch, a dict, goes to
    the model whole, its targets or labels too, as keyword arguments; the loss is the one in
    the model's outputs: their ``"loss"`` entry (a dict, a Hugging Face ``ModelOutput``),
    their ``loss`` attribute, the outputs themselves if a scalar tensor, or the one scalar
    tensor in a tuple (``(logits, loss)``, ``(loss, logits)``). ``state.outputs`` holds the
    outputs as the model returned them.

    ::

        trainer = Trainer(model, loader, optimizer, loss_fn=model_loss)
    """
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        if isinstance(outputs, torch.Tensor):
            loss = outputs
        elif isinstance(outputs, tuple):
            scalars = [o for o in outputs if isinstance(o, torch.Tensor) and o.dim() == 0]
            loss = scalars[0] if len(scalars) == 1 else None
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise ValueError(
            f"loss_fn=model_loss: the model returned {described(outputs)}, with no loss in it: "
            "a model that computes its own loss returns it as a scalar tensor, alone, in a "
            "'loss' entry or attribute, or as the one scalar in a tuple (does the batch hold "
            "the labels the model needs to compute it, under the name its forward takes?)"
        )
    return loss


def described(outputs: Any) -> str:
    """A value as an error names it: a tensor by its shape, a mapping by its keys, else its
    type."""
    if isinstance(outputs, torch.Tensor):
        return f"a tensor of shape {tuple(outputs.shape)}"
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with the keys {list(outputs)}"
    return f"a {type(outputs).__name__}"


def split_for(batch: Any, loss_fn: LossFn | None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of ``batch`` for ``loss_fn``: :func:`split_batch`'s, or with
    :func:`model_loss` the whole batch as the model's keyword arguments."""
    if loss_fn is not model_loss:
        return split_batch(batch)
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"loss_fn=model_loss needs batches that are dicts, whose entries (the labels "
            f"too) the model takes as keyword arguments; got a {type(batch).__name__}"
        )
    return dict(batch), batch


class BasicBatchProcessor(BatchProcessor):
    """One batch per step: forward, loss, backward, and an optimizer update when due.

    Written on the step API of :class:`BatchProcessor` (one path for every update).

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``, or :func:`model_loss` for a
            model that computes its own. Needed to train; optional to predict (then
            ``state.loss`` is computed only when the batch has targets).
        grad_accumulation_steps, amp, set_to_none, samples: as for :class:`BatchProcessor`.
            A loop of several optimizers has each step in turn on the one loss
            (:meth:`~BatchProcessor.update_each`).
        compile: ``True`` or a dict of ``torch.compile`` options (``{"mode":
            "max-autotune"}``) to compile the forward and the loss (their backward is
            compiled with them); the optimizer step stays eager. Compilation happens on the
            compute thread at the first batch (expect seconds to minutes); the options are
            checked against ``torch.compile``'s signature here. With
            ``mode="reduce-overhead"`` on CUDA each step is marked for CUDA-graph trees.
            Each processor compiles into a cache of its own (and its own limit of
            recompiles); reuse the processor to reuse its compiled step.
    """

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        *,
        grad_accumulation_steps: int = 1,
        amp: Amp | None = None,
        set_to_none: bool = True,
        samples: Callable[[Any], int] | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if loss_fn is not None:
            loss_function("loss_fn", loss_fn)
        super().__init__(
            amp=amp,
            grad_accumulation_steps=grad_accumulation_steps,
            set_to_none=set_to_none,
            samples=samples,
        )
        self.loss_fn = loss_fn
        self.compile_options = _compile_options(compile)
        self._compiled: dict[tuple[int, int], Callable[[Any, Any], Any]] = {}

    _again: bool | None = None  # whether the optimizer steps with a closure (None: not known)

    def setup(self, loop: LoopHandle) -> None:
        super().setup(loop)
        self._again = None

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        state.batch_idx = 0
        self.run_batch(state, state.batch, self.loss_fn, run_phase)
        if state.training:
            if self._again is None:
                self._again = self._steps_with_closure(state)
                self._in_turn = updated_in_turn(state.model, state.optimizers)
            if self._again:
                self.update(state, run_phase, closure=self._evaluation(state))
            elif self._in_turn:  # several optimizers, each stepped in turn
                self.update_each(state, run_phase)
            else:
                self.update(state, run_phase)

    def _steps_with_closure(self, state: LoopState) -> bool:
        """Whether the loop's optimizer evaluates the loss again as it steps (LBFGS); refused
        where the evaluations cannot be the batch's alone, or alike on every rank (each
        rank's gradient is its own shard's under FSDP; DDP's are the same on every rank)."""
        optimizer = state.optimizer
        if optimizer is None or not needs_closure(optimizer):
            return False
        kind = type(optimizer).__name__
        if self.grad_accumulation_steps > 1:
            raise ValueError(
                f"{kind} evaluates the loss of the batch again as it steps: it cannot "
                f"accumulate gradients over grad_accumulation_steps={self.grad_accumulation_steps}"
                " batches (use a larger batch instead)"
            )
        if state.loop.shards_state:
            raise ValueError(
                f"{kind} evaluates the loss again as it steps, as many times as its own tests "
                "on the gradient say, and under FSDP each rank holds its own shard of it: the "
                "ranks would step apart; train with it under DistributedDataParallelTrainer"
            )
        return True

    def _evaluation(self, state: LoopState) -> Callable[[], torch.Tensor]:
        """The closure for an optimizer that evaluates the loss again (LBFGS): its first call
        returns the loss of the step's batch, whose gradients are there (after the hooks of
        ``on_before_update``); each later one computes it again at the new weights. Over
        several (DDP) ranks it returns the loss averaged over them, as DDP averages the
        gradients: every rank's optimizer then tests the same numbers, and takes the same
        decisions (how many evaluations, which step size)."""
        loss = state.loss
        assert loss is not None
        inputs, targets = split_for(state.batch, self.loss_fn)
        first = True
        answer = _mean_over_ranks if state.loop.spans_ranks else _as_is

        def evaluate() -> torch.Tensor:
            nonlocal first
            if first:
                first = False
                return answer(loss)
            assert state.optimizer is not None
            state.optimizer.zero_grad(set_to_none=self.set_to_none)
            with self.autocast():
                if self.compile_options is None:
                    _, again = _forward(state.model, self.loss_fn, inputs, targets)
                else:
                    _, again = self._compiled_forward(state, self.loss_fn)(inputs, targets)
            assert again is not None
            again.backward()
            return answer(again)

        return evaluate

    def run_batch(
        self,
        state: LoopState,
        batch: Any,
        loss_fn: LossFn | None,
        run_phase: RunPhase,
        *,
        final: bool = True,
    ) -> None:
        """``on_batch_begin``, forward, loss, backward (when training), ``on_batch_end``.

        ``final=False`` holds DDP's gradient all-reduce even when an update is due: for every
        backward of an update but its last (sub-batches); see :meth:`no_sync`.
        """
        run_phase(Phase.ON_BATCH_BEGIN)
        inputs, targets = split_for(batch, loss_fn)
        with self.no_sync(state, final=final):
            with self.autocast():
                if self.compile_options is None:
                    outputs, loss = _forward(state.model, loss_fn, inputs, targets)
                else:
                    outputs, loss = self._compiled_forward(state, loss_fn)(inputs, targets)
            state.outputs = outputs
            state.loss = loss
            if state.training:
                if loss is None and (loss_fn is None or targets is None):
                    raise ValueError(
                        "cannot train on a batch without a loss: BasicBatchProcessor needs "
                        "loss_fn=... and batches with targets"
                    )
                self.backward(state, cast(torch.Tensor, loss))  # (loss_fn's None: refused)
        run_phase(Phase.ON_BATCH_END)

    def _compiled_forward(
        self, state: LoopState, loss_fn: LossFn | None
    ) -> Callable[[Any, Any], Any]:
        """The forward and loss of ``state.model`` compiled, once per model and loss."""
        model, options = state.model, self.compile_options
        assert options is not None
        key = (id(model), id(loss_fn))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = torch.compile(_own_forward(model, loss_fn), **options)
            self._compiled[key] = compiled
        if options.get("mode") == "reduce-overhead" and state.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new step for cudagraph trees
        return compiled


def _forward(
    model: torch.nn.Module, loss_fn: LossFn | None, inputs: Any, targets: Any
) -> tuple[Any, torch.Tensor | None]:
    if type(inputs) is not torch.Tensor and isinstance(inputs, Mapping):  # (an ABC: slower)
        outputs = model(**inputs)
    else:
        outputs = model(inputs)
    if loss_fn is None or targets is None:
        return outputs, None
    try:
        return outputs, loss_fn(outputs, targets)
    except TypeError as exc:
        if not isinstance(outputs, torch.Tensor):  # (a tuple, a dict, a ModelOutput...)
            add_note(
                exc,
                f"asynchat: the model returned a {type(outputs).__name__}, which loss_fn got "
                "as it is: take the tensor to score out of it in loss_fn (e.g. lambda "
                "outputs, targets: F.cross_entropy(outputs[0], targets)), or in a batch "
                "processor of your own",
            )
        raise


def _own_forward(model: torch.nn.Module, loss_fn: LossFn | None) -> Callable[[Any, Any], Any]:
    """``_forward`` bound to ``model`` and ``loss_fn``, as a function with a code object of
    its own, for ``torch.compile``.

    Dynamo keeps its compiled graphs, and its recompile limit (8), per code object. Bound with
    ``functools.partial`` (compiled through torch's one wrapper function) or a closure (one
    code object for all), every compiled step of the process would share a single cache:
    in a service that trains a ninth model architecture with ``compile=True``, that step
    would silently run eager. With its own code object, each batch processor's compiled
    step has its own cache and limit, and its graphs go when the processor does.
    """

    def forward(inputs: Any, targets: Any) -> tuple[Any, torch.Tensor | None]:
        return _forward(model, loss_fn, inputs, targets)

    return types.FunctionType(
        forward.__code__.replace(),  # a copy: a new code object
        forward.__globals__,
        forward.__name__,
        forward.__defaults__,
        forward.__closure__,
    )


def _compile_options(compile: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``None`` (eager) or the keyword arguments for ``torch.compile``, checked."""
    if isinstance(compile, bool):
        return {} if compile else None
    if not isinstance(compile, Mapping):
        raise TypeError(
            f"compile must be True, False or a dict of torch.compile options, got {compile!r}"
        )
    options = dict(compile)
    try:
        inspect.signature(torch.compile).bind(_forward, **options)
    except TypeError as exc:
        raise TypeError(f"compile={options!r}: not torch.compile's options ({exc})") from None
    return options


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
        samples: Callable[[Any], int] | None = None,
    ) -> None:
        loss_fns: tuple[LossFn, ...] | None = None
        if isinstance(loss_fn, Sequence):
            loss_fns = tuple(loss_fn)
            for i, fn in enumerate(loss_fns):
                loss_function(f"loss_fn[{i}]", fn)
            loss_fn = None
        super().__init__(
            loss_fn,
            grad_accumulation_steps=grad_accumulation_steps,
            amp=amp,
            set_to_none=set_to_none,
            samples=samples,
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
                last = i == len(item) - 1
                self.run_batch(state, batch, loss_fn, run_phase, final=last)
                outputs.append(state.outputs)
                if state.loss is not None:
                    losses.append(state.loss.detach())
        finally:
            state.batch = item
        state.outputs = tuple(outputs)
        state.loss = torch.stack(losses).sum() if losses else None
        if state.training:
            self.update_each(state, run_phase)
