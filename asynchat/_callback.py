"""Callbacks and the pipe that knows, per phase, which hooks run and on which thread."""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from asynchat._every import rule_of
from asynchat._phase import Phase

if TYPE_CHECKING:
    from asynchat._state import LoopState


class Callback:
    """Base class for callbacks: override any of the nine ``on_*`` hooks (see
    :class:`~asynchat.Phase`).

    A hook written as ``async def`` is awaited on the event loop thread, so it may do network
    or file I/O with ``await``; a plain ``def`` hook runs on the loop's compute thread, in
    order with the steps, and may do torch work on the model. Hooks that are not overridden
    cost nothing: the engine only calls what a callback defines.

    Two class attributes tell a :class:`~asynchat.CudaGraphBatchProcessor` what it needs to
    know: ``graph_safe`` (its ``on_before_update`` is a ``def`` hook that only launches
    sync-free kernels, so it may run inside a captured graph) and ``sets_lr`` (it changes
    the optimizer's learning rate while training).

    One instance serves one running loop at a time: most callbacks keep state for the run
    (a scheduler bound to its optimizer, an open file, counters), so a loop whose callback
    serves another running loop is refused when it starts, with an error naming both; so
    is one run inside the other (a Validation's predictor, a loop awaited in a hook), whose
    start would begin the callback's run anew in the middle of the other's. A callback
    whose one instance may serve several loops at once (it keeps no per-run state, or
    counts across them on purpose) says so with ``shared_across_loops = True`` on its
    class.

    In a distributed trainer a checkpoint holds the callbacks' states as rank 0 has them,
    and every rank resumes from those, unless the class says ``state_per_rank = True``:
    its state is each rank's own (a :class:`~asynchat.callbacks.MetricUpdater`'s counts of
    its shard, a :class:`~asynchat.callbacks.LossMonitor`'s sums of its losses), the
    checkpoint keeps every rank's, and each rank resumes its own.

    A distributed trainer requires a class that says ``every_rank = True`` on every rank,
    in the same order and on the same schedule (its ``every_n_steps``, ``every_n_epochs``,
    ``log_every_n_steps``, ``check_every_n_steps``, ``save_on_end``, ``interval`` where it
    has them; checked before training, with an error naming what each rank has):
    its hooks take part in collectives (:class:`~asynchat.callbacks.Checkpoint`,
    Validation, MetricUpdater, TerminateOnNaN) or change what each replica computes
    (GradClip, LRSchedule, FreezeModule, ExponentialMovingAverage). Set it on a callback
    of your own that calls ``loop.any_rank`` or ``loop.sum_over_ranks``.

    Within a phase, hooks run in the order the callbacks were given, except that those of a
    class with ``runs_last = True`` run after all others (:class:`~asynchat.callbacks.Checkpoint`:
    a checkpoint then holds what the phase's other hooks did, wherever it is listed).
    """

    graph_safe: ClassVar[bool] = False
    sets_lr: ClassVar[bool] = False
    shared_across_loops: ClassVar[bool] = False
    runs_last: ClassVar[bool] = False
    state_per_rank: ClassVar[bool] = False
    every_rank: ClassVar[bool] = False

    def on_loop_begin(self, state: LoopState) -> Awaitable[None] | None:
        """Before the first epoch."""

    def on_epoch_begin(self, state: LoopState) -> Awaitable[None] | None:
        """Before the first step of each epoch."""

    def on_step_begin(self, state: LoopState) -> Awaitable[None] | None:
        """Before the batch processor runs a step; ``state.batch`` is on the device."""

    def on_batch_begin(self, state: LoopState) -> Awaitable[None] | None:
        """Before each batch's forward pass, inside the batch processor."""

    def on_batch_end(self, state: LoopState) -> Awaitable[None] | None:
        """After each batch's forward (and backward), before the optimizer update."""

    def on_before_update(self, state: LoopState) -> Awaitable[None] | None:
        """When an optimizer update is due: gradients complete (and unscaled), before the step."""

    def on_step_end(self, state: LoopState) -> Awaitable[None] | None:
        """After the step's optimizer update (when one was due)."""

    def on_epoch_end(self, state: LoopState) -> Awaitable[None] | None:
        """After the last step of each epoch; also of an epoch cut short by ``stop()`` or
        ``num_steps``, with ``state.epoch_complete`` False (the resumed run finishes it)."""

    def on_loop_end(self, state: LoopState) -> Awaitable[None] | None:
        """On every way out of the loop; see the table in :class:`~asynchat.LoopBase`."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints; override it (with :meth:`load_state_dict`) to resume.

        Called on the compute thread. Return tensors, numbers, strings, lists and dicts only
        (checkpoints load with ``torch.load(weights_only=True)``). Callbacks are matched by
        class name (``Name#1`` for a second one of the same class).
        """
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, before the resumed loop begins."""

    def held_objects(self) -> Mapping[str, object]:
        """Objects given to this callback that keep the state of its run, by the name an
        error calls them (``{"metric": self.metric}``): a torchmetrics metric counts the
        run's batches, so it serves one place in one running loop. Override it in a callback
        of your own that is given such objects; one given twice in a loop (to two callbacks,
        or under two names) is then refused as the loop is made, and one given to loops
        running at once (or one inside the other: a Validation's callbacks) as the second
        starts: each would reset and add to the other's counts. None by default;
        ``MetricUpdater`` returns its metrics."""
        return {}

    def _run_begins(self, state: LoopState) -> None:
        """(The engine's.) A run of ``state.loop`` has taken this callback: its ``fit()``
        has begun, before ``on_loop_begin``. Requests made of the callback from now on (a
        Checkpoint's ``request_save()``) are this run's, as ``stop()`` and ``pause()`` are
        the loop's."""

    def _run_ended(self, error: BaseException | None) -> None:
        """(The engine's.) The run that took this callback is over, however it ended (by
        ``error``, if not None; its ``on_loop_end``, if the run came that far, is done)."""

    def on_checkpoint(self, state: LoopState) -> Iterable[str | os.PathLike[str]] | None:
        """Right before a :class:`~asynchat.callbacks.Checkpoint` takes its snapshot, on the
        compute thread (a plain ``def``): bring files of this callback's own up to date with
        the steps the checkpoint holds, so that a process killed after it loses none of
        them (a resumed run goes on after the checkpoint's step and does not write them
        again). The loggers write the values measured so far and flush.

        Return the paths of those files to have them survive a machine crash too: the
        checkpoint's writer thread syncs them to disk (``fsync``) before it writes the
        checkpoint, off the compute thread (the operating system otherwise keeps written
        data in memory for up to about 30 s).
        """
        return None


class Hook(NamedTuple):
    """One overridden hook: the bound method, where it runs, and when (``due``: None for
    every time its phase comes, else the test that :func:`~asynchat.every` made)."""

    callback: Callback
    fn: Callable[[LoopState], object]
    is_async: bool
    due: Callable[[LoopState], bool] | None = None

    def __repr__(self) -> str:
        where = "event loop" if self.is_async else "compute thread"
        return f"<hook {type(self.callback).__name__}.{self.fn.__name__} on the {where}>"


def _overridden_hook(callback: Callback, phase: Phase) -> Hook | None:
    attr = inspect.getattr_static(type(callback), phase.value, None)
    if attr is None or attr is getattr(Callback, phase.value):
        return None
    fn = getattr(callback, phase.value)
    if not callable(fn):
        raise TypeError(
            f"{type(callback).__name__}.{phase.value} must be a method taking `state`, got {fn!r}"
        )
    if inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"{type(callback).__name__}.{phase.value} is an async generator; hooks must be "
            "`def` or `async def` functions"
        )
    rule = rule_of(fn)
    name = f"{type(callback).__name__}.{phase.value}"
    due = rule.due(phase, name) if rule is not None else None
    return Hook(callback, fn, inspect.iscoroutinefunction(fn), due)


def objects_held(callbacks: Iterable[Callback]) -> Iterator[tuple[str, object]]:
    """What ``callbacks`` keep a run's state in (:meth:`Callback.held_objects`), each with
    where it is, as errors name it: ``"callbacks[2]'s metrics['acc']"``."""
    for i, callback in enumerate(callbacks):
        for name, obj in callback.held_objects().items():
            yield f"callbacks[{i}]'s {name}", obj


def checked_callbacks(callbacks: Iterable[Callback]) -> tuple[Callback, ...]:
    """``callbacks`` as a tuple, each checked to be a :class:`Callback` instance whose
    ``on_checkpoint`` is a plain ``def``, listed once, holding none of the others' objects
    (:meth:`Callback.held_objects`)."""
    if isinstance(callbacks, Callback):
        raise TypeError(
            f"callbacks must be a sequence of Callback instances, got the single callback "
            f"{callbacks!r}; pass callbacks=[{type(callbacks).__name__}(...)]"
        )
    if isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of Callback instances, got {callbacks!r}")
    checked: list[Callback] = []
    positions: dict[int, int] = {}  # id -> the first position of each instance
    for i, callback in enumerate(callbacks):
        if isinstance(callback, type) and issubclass(callback, Callback):
            raise TypeError(
                f"callbacks[{i}] is the class {callback.__name__}, not an instance; "
                f"pass {callback.__name__}() instead"
            )
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks[{i}] must be an asynchat.Callback instance, got "
                f"{callback!r} of type {type(callback).__name__}; subclass "
                "asynchat.Callback and override its on_* hooks"
            )
        if inspect.iscoroutinefunction(callback.on_checkpoint):
            raise TypeError(
                f"{type(callback).__name__}.on_checkpoint must be a plain def: it runs on "
                "the compute thread, right before a checkpoint's snapshot"
            )
        first = positions.setdefault(id(callback), i)
        if first != i:
            raise ValueError(
                f"callbacks[{first}] and callbacks[{i}] are one {type(callback).__name__} "
                "instance: its hooks would run twice at each phase (an LRSchedule stepped "
                "twice a step, and its learning rate decayed twice as fast); list it once"
            )
        checked.append(callback)
    held: dict[int, str] = {}  # id -> where the first of each held object is
    for where, obj in objects_held(checked):
        before = held.setdefault(id(obj), where)
        if before != where:
            raise ValueError(
                f"{before} and {where} are one {type(obj).__name__} instance, which keeps "
                "the counts of one place in a run: it would be updated twice a batch, and "
                "each reset the other's counts; give each its own"
            )
    return tuple(checked)


class PipeBase:
    """Holds the callbacks of a loop and, per :class:`Phase`, the hooks to run in order.

    The callbacks are checked when the pipe is built: each must be a :class:`Callback`
    instance. For each phase the pipe records which callbacks override the hook and whether
    the hook is ``async def`` (awaited on the event loop) or ``def`` (run on the compute
    thread). Within a phase, hooks run in the order the callbacks were given, those of
    ``runs_last`` callbacks after the others.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self._callbacks: tuple[Callback, ...] = checked_callbacks(callbacks)
        in_order = sorted(self._callbacks, key=lambda callback: callback.runs_last)  # stable
        self._hooks: dict[Phase, tuple[Hook, ...]] = {
            phase: tuple(
                hook
                for callback in in_order
                if (hook := _overridden_hook(callback, phase)) is not None
            )
            for phase in Phase
        }

    def _append_callback(self, callback: Callback) -> None:
        """Add a callback after the given ones (before the loop runs)."""
        self._callbacks += (callback,)
        for phase in Phase:
            hook = _overridden_hook(callback, phase)
            if hook is not None:
                self._hooks[phase] += (hook,)

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        """The callbacks, in the order they were given."""
        return self._callbacks

    def hooks(self, phase: Phase) -> tuple[Hook, ...]:
        """The hooks that run at ``phase``, in order."""
        return self._hooks[phase]

    def has_async_hooks(self, phase: Phase) -> bool:
        """Whether any hook at ``phase`` is ``async def`` (and so needs the event loop)."""
        return any(hook.is_async for hook in self._hooks[phase])
