"""Which models running loops use, and the train/eval mode each loop puts them in.

Two loops that run on one model at the same time must not step on each other. Two trainers
updating the same parameters from two compute threads crash the process (a segmentation
fault in the optimizer, seen with two Trainers over one ``nn.Linear``), and a predictor's
``eval()`` turns dropout and BatchNorm statistics off under a trainer that is still
training. Modes are set on modules, not per thread, so the same is true of two predictors:
the first to end would put the model back in ``train()`` mode under the other, whose
BatchNorm layers then update their running statistics from its batches.

So a loop *claims* its model for its run (:func:`claim`, from ``fit()``), module by module
and parameter by parameter, so that models sharing a submodule or a tied weight conflict
too. A claim is refused, with an error naming both loops, when the model is in use by a
loop that trains it (or predicts in ``train()`` mode), unless the new loop runs *inside*
that one: from one of its ``async def`` hooks while the hook runs (the holder's compute
thread waits for the hook, which waits for the loops started in it to end: see
:class:`HookCall`) or through ``run_inline`` from one of its ``def`` hooks. Predictors in
``eval()`` mode on the same device share a model.

The claim is taken on the event loop (a refused loop stays unstarted); the modes are set on
the compute thread, where the run begins (:meth:`Claim.modes`): the model in the loop's
mode, then, when the run ends, every submodule's own mode put back as it was, so layers a
user froze in ``eval()`` stay so after a validation. Runs that overlap form a stack per
module: one that ends while a later one still runs on a module hands what it saved for that
module to the later one, which puts it back when it ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import torch

from asynchat._callback import Callback, objects_held
from asynchat._data import has_persistent_workers, is_read_once
from asynchat._errors import InUseError
from asynchat._weights import plain_name

NESTED_GRACE_S = 10.0
"""How long a loop's ``async def`` hook, returned, waits for the loops started in it that
still run (a stream left early without ``aclosing`` ends once its generator is collected)."""


class HookCall:
    """One call of an ``async def`` hook of ``loop``, which ``loop`` waits for: a loop
    started while it runs, in its task or in one started from it (the context is inherited),
    runs inside ``loop``, provided it ends by the time the hook has returned."""

    __slots__ = ("claims", "loop", "running")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.running = True
        self.claims: list[Claim] = []  # of the loops started inside it

    def within(self) -> tuple[Any, ...]:
        """What a loop started in it runs inside: ``loop``, and what ``loop`` runs inside (a
        Validation's predictor runs inline in its trainer, which waits for it too)."""
        holder: Claim | None = getattr(self.loop, "_claim", None)
        return (*holder.within, self.loop) if holder is not None else (self.loop,)

    async def outlived(self, hook: Any) -> None:
        """Once the hook has returned: wait, up to :data:`NESTED_GRACE_S`, for the loops
        started in it to end, and raise an :class:`InUseError` naming one that has not
        (``loop`` would go on beside it, on the model, the callbacks or the data it let it
        share: a task the hook left running, in a task group that outlives it, ran a
        second trainer of the model beside the first)."""
        with anyio.move_on_after(NESTED_GRACE_S):
            while any(_REGISTRY.holds(claim) for claim in self.claims):  # noqa: ASYNC110
                await anyio.sleep(0.01)  # (rare: a claim left running; polled, not signalled)
        running = [claim.loop for claim in self.claims if _REGISTRY.holds(claim)]
        if running:
            name = f"{type(hook.callback).__name__}.{hook.fn.__name__}"  # (a Hook's)
            raise InUseError(
                f"{running[0].name}, started in {name} (an async def hook of "
                f"{self.loop.name}), still runs {NESTED_GRACE_S:g} s after the hook returned: "
                "a loop started in a hook runs inside the hook's loop (on its model, with its "
                "callbacks and data) only while the hook waits for it. Await its fit() in the "
                "hook, or in a task group the hook opens"
            )


#: The hook calls running in this task, or that were when it was started (innermost last).
_awaiting: contextvars.ContextVar[tuple[HookCall, ...]] = contextvars.ContextVar(
    "asynchat_awaiting_hooks_of", default=()
)


@contextlib.contextmanager
def in_hook_of(loop: Any) -> Iterator[HookCall]:
    """Around an ``async def`` hook of ``loop``: loops started in it run inside ``loop``
    (see :meth:`HookCall.outlived` for those still running once it returned)."""
    call = HookCall(loop)
    token = _awaiting.set((*_awaiting.get(), call))
    try:
        yield call
    finally:
        _awaiting.reset(token)
        call.running = False


class Claim:
    """One loop's use of its model, from :func:`claim` to :meth:`release`; in between, on the
    compute thread, :meth:`modes` puts the model in the loop's mode and back."""

    def __init__(
        self,
        loop: Any,
        model: torch.nn.Module,
        device: torch.device,
        *,
        trains: bool,
        updates: bool,
        within: tuple[Any, ...],
        callbacks: Iterable[Callback] = (),
        processor: object = None,
        data: object = None,
        reading: Callable[[], bool] = lambda: False,
        collective: bool = False,
    ) -> None:
        self.loop = loop  # the LoopBase (its name, for errors; its identity, for nesting)
        self.model = model
        self.device = device
        self.trains = trains  # the model in train() mode (a Trainer; a train_mode Predictor)
        self.updates = updates  # it changes parameters (a Trainer)
        self.within = within  # the loops it runs inside, outermost first
        self.modules, self.keys = _walk(model)
        # id -> (position in the loop's callbacks, callback), for those that serve one loop
        callbacks = tuple(callbacks)
        self.callbacks = {
            id(c): (i, c) for i, c in enumerate(callbacks) if not c.shared_across_loops
        }
        # id -> (where, object), for what the callbacks keep a run's state in (metrics)
        self.held = {id(obj): (where, obj) for where, obj in objects_held(callbacks)}
        self.processor = processor  # its batch processor, which keeps state for the run
        # Data that every reader reads from one position, which is then this loop's alone.
        self.data = data if _read_once(data) else None
        self.reading = reading  # whether the loop is in an epoch's reading now
        self.collective = collective  # it steps with other ranks, through the process group
        self.saved: list[bool] | None = None  # each module's mode before modes() set it

    def inside(self, other: Claim) -> bool:
        """Whether one of the two loops runs inside the other (which waits for it)."""
        return other.loop in self.within or self.loop in other.within

    def shares_model_with(self, other: Claim) -> bool:
        """Whether both may run on the model at once: predictors in eval() mode, on one
        device, or one inside the other."""
        if self.inside(other):
            return True
        return not (self.trains or other.trains) and self.device == other.device

    def release(self) -> None:
        """Let other loops use the model (once the run is over; a second call does nothing)."""
        _REGISTRY.release(self)

    @contextlib.contextmanager
    def modes(self) -> Iterator[None]:
        """The model in the loop's mode for the run, then every module's mode put back."""
        _REGISTRY.set_modes(self)
        try:
            yield
        finally:
            _REGISTRY.restore_modes(self)


class _Registry:
    """The claims of the process's running loops, and those whose modes are set, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: list[Claim] = []
        self._moded: list[Claim] = []  # claims whose modes are set, oldest first

    def claim(self, new: Claim) -> None:
        with self._lock:
            for other in self._claims:
                if not new.keys.isdisjoint(other.keys) and not new.shares_model_with(other):
                    _refuse(new, other)
                # Inside the other too: its hooks would start the callback's run anew
                # (counters reset, a file opened twice) in the middle of the other's.
                both = new.callbacks.keys() & other.callbacks.keys()
                if both:
                    _refuse_callback(new, other, *min(new.callbacks[key] for key in both))
                held = new.held.keys() & other.held.keys()
                if held:  # inside the other too: each run resets the counts
                    _refuse_held(new, other, min(held, key=lambda key: new.held[key][0]))
                if new.processor is other.processor is not None and _processor_clash(new, other):
                    _refuse_processor(new, other)
                # A loop inside the other may read its data between its epochs, not in one.
                same_data = new.data is not None and new.data is other.data
                if same_data and (not new.inside(other) or other.reading()):
                    _refuse_data(new, other)
                if new.collective and other.collective and not new.inside(other):
                    _refuse_collectives(new, other)
            self._claims.append(new)

    def release(self, claim: Claim) -> None:
        with self._lock:
            if claim in self._claims:
                self._claims.remove(claim)

    def holds(self, claim: Claim) -> bool:
        """Whether ``claim``'s loop still runs (it has not released it)."""
        with self._lock:
            return claim in self._claims

    def set_modes(self, claim: Claim) -> None:
        with self._lock:
            claim.saved = [module.training for module in claim.modules]
            self._moded.append(claim)
        try:
            _set_mode(claim.model, train=claim.trains)  # may run a module's own train()
        except BaseException:
            self.restore_modes(claim)
            raise

    def restore_modes(self, claim: Claim) -> None:
        """Put back what ``claim`` saved; where a later claim's modes are still set on a
        module, hand it the saved mode instead, to put back when it ends."""
        with self._lock:
            if claim.saved is None:
                return
            saved, claim.saved = claim.saved, None
            at = self._moded.index(claim)
            later = self._moded[at + 1 :]
            del self._moded[at]
            heirs = [
                (other.saved, {id(module): i for i, module in enumerate(other.modules)})
                for other in later
                if other.saved is not None and not claim.keys.isdisjoint(other.keys)
            ]
            for module, mode in zip(claim.modules, saved, strict=True):
                for heir, index in heirs:
                    i = index.get(id(module))
                    if i is not None:
                        heir[i] = mode
                        break
                else:
                    if module.training is not mode:
                        module.training = mode

    def forget(self) -> None:
        """In a forked child: the parent's loops do not run here (the models are copies),
        and the lock may have been held by a thread the child does not have."""
        self._lock = threading.Lock()
        self._claims = []
        self._moded = []


_REGISTRY = _Registry()
os.register_at_fork(after_in_child=_REGISTRY.forget)


def claim(
    loop: Any,
    model: torch.nn.Module,
    device: torch.device,
    *,
    trains: bool,
    updates: bool,
    inside: Claim | None = None,
    callbacks: Iterable[Callback] = (),
    processor: object = None,
    data: object = None,
    reading: Callable[[], bool] = lambda: False,
    collective: bool = False,
) -> Claim:
    """Claim ``model``, ``callbacks``, the batch ``processor`` and ``data`` for a run of
    ``loop``; raise :class:`InUseError` if a running loop uses the model (or part of it) in a
    way this run cannot share, one of the callbacks (unless the callback is
    ``shared_across_loops``), the processor (unless one loop runs inside the other), or the
    data, where its readers share one position (an iterator; a DataLoader with
    persistent workers): a loop inside the one reading it may read it only between that
    one's epochs (``reading``: whether ``loop`` is in an epoch's reading now).

    ``collective``: the loop steps with the other ranks of the process group (a
    distributed trainer); two such loops cannot run at once, unless one inside the other.

    ``inside``: the claim of the loop this one runs inline in (``run_inline``); a loop
    started from an ``async def`` hook runs inside that hook's loop without saying so.
    """
    if inside is not None:
        calls, within = [], (*inside.within, inside.loop)
    else:
        calls = [call for call in _awaiting.get() if call.running]  # (not one that returned)
        within = tuple(dict.fromkeys(outer for call in calls for outer in call.within()))
    new = Claim(
        loop, model, device, trains=trains, updates=updates, within=within,
        callbacks=callbacks, processor=processor, data=data, reading=reading,
        collective=collective,
    )  # fmt: skip
    _REGISTRY.claim(new)
    for call in calls:
        call.claims.append(new)
    return new


def _walk(model: torch.nn.Module) -> tuple[list[torch.nn.Module], frozenset[int]]:
    """The modules of ``model`` (each once), and the ids of them and of their parameters.

    On the event loop, once per run: read from the modules' own tables, which is 4-5x faster
    than ``modules()`` and ``parameters()`` (measured: 2 ms against 9 ms for 3000 modules).
    """
    seen = {id(model)}
    modules, stack = [model], [model]
    while stack:
        for child in stack.pop()._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                modules.append(child)
                stack.append(child)
    for module in modules:
        seen.update(id(p) for p in module._parameters.values() if p is not None)
    return modules, frozenset(seen)


def _set_mode(model: torch.nn.Module, *, train: bool) -> None:
    """eval() for a predictor. For a loop in train() mode: ``train()`` on a model in eval()
    mode (one just loaded, or after a predictor); a model already in train() mode is left as
    it is, so submodules the user put in eval() (frozen layers) stay there."""
    if not train:
        model.eval()
    elif not model.training:
        model.train()


def _refuse(new: Claim, other: Claim) -> None:
    doing = (
        "training" if other.updates else "predicting with, in train() mode," if other.trains
        else "predicting with"
    )  # fmt: skip
    raise InUseError(
        f"{new.loop.name} cannot run: {other.loop.name} is {doing} "
        f"{_what(new, other)} (on {other.device}). Two loops may use one model "
        "at once only if both predict in eval() mode on one device: a trainer's updates, or "
        "a change of mode, would corrupt the other's run. Await the other loop's fit() first, "
        "run this one from its hooks (loop.run_inline(state.loop) in a def hook, await fit() "
        "in an async def hook), or give it a copy of the model (copy.deepcopy)"
        + _streaming_hint(other)
    )


def _streaming_hint(other: Claim) -> str:
    """A predictor whose stream a consumer left with ``break`` runs until its generator is
    closed, which the garbage collector does when it gets to it."""
    if not getattr(other.loop, "streaming", False):
        return ""
    return (
        f". {other.loop.name} streams its outputs: a consumer that left its `async for` early "
        "ends it only when the generator is closed; wrap the stream in "
        "contextlib.aclosing(predictor.stream()) to close it on leaving"
    )


def _refuse_callback(new: Claim, other: Claim, position: int, callback: Callback) -> None:
    raise InUseError(
        f"{new.loop.name} cannot run: its callbacks[{position}] "
        f"({type(callback).__name__}) serves {other.loop.name}, {_running(new, other)}. "
        "A callback keeps state for its run (LRSchedule its scheduler, a logger its open "
        "file, LossMonitor its sums), which a second run would start anew in the middle of "
        "the first: give each loop instances of its own. A callback whose one instance may "
        "serve several loops at once (it keeps no per-run state, or counts across them) "
        "says so with `shared_across_loops = True` on its class"
    )


def _refuse_held(new: Claim, other: Claim, key: int) -> None:
    where, obj = new.held[key]
    raise InUseError(
        f"{new.loop.name} cannot run: its {where} ({type(obj).__name__}) is "
        f"{other.loop.name}'s {other.held[key][0]} too, {_running(new, other)}. It keeps "
        "the counts of one run, which the other would reset and add to: give each loop "
        "an instance of its own"
    )


def _running(new: Claim, other: Claim) -> str:
    return "which it runs inside" if other.loop in new.within else "which is running"


def _processor_clash(new: Claim, other: Claim) -> bool:
    """Whether two loops cannot share a batch processor: a trainer's run keeps state in it
    (the grad scaler, which optimizers it steps, a CudaGraphBatchProcessor's graphs and
    stream), which another loop's setup would replace. Predictors may share one, and a loop
    run inside the other (a Validation given its trainer's processor) may too: the
    trainer's next step finds its state again."""
    return (new.updates or other.updates) and not new.inside(other)


def _refuse_processor(new: Claim, other: Claim) -> None:
    raise InUseError(
        f"{new.loop.name} cannot run: its batch_processor "
        f"({type(new.processor).__name__}) serves {other.loop.name}, which is running. A "
        "batch processor keeps state for a training run (the grad scaler, which optimizers "
        "it steps, a CudaGraphBatchProcessor's graphs), which a second run would replace in "
        "the middle of the first: give each loop one of its own (a processor given to the "
        "next loop once the first is done reuses its compiled steps)"
    )


def _read_once(data: object) -> bool:
    """Whether the readers of ``data`` share one position: an iterator (a generator) is read
    once, and a DataLoader with persistent workers hands every ``iter()`` the same iterator,
    reset to the start (measured: a second reader restarted the first one's epoch)."""
    return is_read_once(data) or has_persistent_workers(data)


def _refuse_data(new: Claim, other: Claim) -> None:
    what = (
        "an iterator, which is read once"
        if is_read_once(new.data)
        else "a DataLoader with persistent workers, whose every iter() is the same iterator, "
        "reset to the start"
    )
    raise InUseError(
        f"{new.loop.name} cannot run: its data_loader is the one {other.loop.name} reads, "
        f"which is running, and it is {what}: the two would split (or restart) each other's "
        "epochs. Give each loop a data loader of its own (a DataLoader over the same "
        "dataset), or run this one between the other's epochs (at on_epoch_end)"
    )


def _refuse_collectives(new: Claim, other: Claim) -> None:
    raise InUseError(
        f"{new.loop.name} cannot run while {other.loop.name} runs: both step with the other "
        "ranks through the one process group (gradient all-reduces, agreements), and the "
        "collectives of two running at once pair up wrongly across the ranks (gloo aborted "
        "the job; NCCL would hang, or reduce one job's tensors into the other's). Run them "
        "one after the other (await the first's fit()), or this one from the other's "
        "async def hooks"
    )


def _what(new: Claim, other: Claim) -> str:
    """What the other loop uses of the new loop's model: all of it, a submodule, a weight."""
    model, both = new.model, new.keys & other.keys
    if id(model) in both:
        return "its model"
    for name, module in model.named_modules():
        if id(module) in both:  # (named as uncompiled: a compiled model's is the one it runs)
            plain = plain_name(name)
            return f"its model's submodule {plain!r}" if plain else "its model"
    name = next(n for n, p in model.named_parameters() if id(p) in both)
    return f"its model's parameter {plain_name(name)!r}"
