"""LoopBase: the loop, written once, for trainers and predictors alike."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio
import torch
import torch.distributed as dist

from asynchat import _hold as hold
from asynchat import _transfer as transfer
from asynchat._callback import Callback, PipeBase
from asynchat._checkpoint_io import read_checkpoint
from asynchat._checks import path as check_path
from asynchat._checks import positive_int, positive_number
from asynchat._compute import ComputeThread, JobCancelled
from asynchat._control import LoopControl
from asynchat._data import DataSource, check_data_loader, data_length
from asynchat._dcp import load_sharded, sharded_state, start_save
from asynchat._device import resolve_device
from asynchat._errors import CheckpointError, add_note
from asynchat._events import EventHub, EventKind, EventStream, LoopSnapshot, Throughput
from asynchat._handle import LoopHandle
from asynchat._hooks import LOG as _LOG
from asynchat._hooks import HookRunner
from asynchat._in_use import Claim, claim
from asynchat._mailbox import current_task
from asynchat._phase import Phase
from asynchat._processor import BatchProcessor, check_processor
from asynchat._ranks import RankGroup
from asynchat._resume import (
    DataTracker,
    ResumePoint,
    apply_checkpoint,
    build_checkpoint,
    callback_states,
    own_part,
    rank_state,
)
from asynchat._run import LoopRun
from asynchat._state import LoopState, LoopStatus, Metrics
from asynchat._weights import load_portable

T = TypeVar("T")

_names = itertools.count()


class LoopBase(PipeBase):
    """The execution flow shared by :class:`~asynchat.Trainer` and :class:`~asynchat.Predictor`.

    ``await loop.fit()`` prepares the run on the compute thread (model to its device, the
    optimizer, the batch processor's setup, the ``resume_from`` checkpoint; no hook runs yet)
    and then runs the phases as :class:`~asynchat.Phase` draws them.

    The event loop owns the run: it starts and joins the compute thread, awaits every
    ``async def`` hook when the compute thread reaches it, and turns :meth:`stop` and
    cancellation into requests that the compute thread honours at step boundaries. A step is
    never abandoned half-way except by an error.

    Which phases run on each way out:

    ==================  ====================  ===================  ==============  ===========
    way out             step in progress      its on_step_end      on_epoch_end    on_loop_end
    ==================  ====================  ===================  ==============  ===========
    normal end          (none)                yes                  yes             yes
    ``stop()``          completes             yes                  yes [3]_        yes
    cancellation        completes             ``def`` hooks only   no              yes [1]_
    error               abandoned at error    no                   no              yes [2]_
    ==================  ====================  ===================  ==============  ===========

    .. [1] Once cancellation is requested, ``async def`` hooks not yet started are skipped
       (one already running is cancelled); ``on_loop_end``'s ``async def`` hooks run shielded
       from the cancellation, so keep them short. ``fit()`` then re-raises the cancellation.
       It waits for the step in progress; one still running 10 s later is reported once on
       the ``asynchat.loop`` logger, with where the compute thread is.
    .. [2] ``state.exception`` holds the error during ``on_loop_end``; then ``fit()`` raises
       it as itself. If ``on_loop_end`` raises too, that error propagates, chained to the
       first one (``__context__``). An error while preparing (before ``on_loop_begin``) runs
       no hook at all.

    .. [3] with ``state.epoch_complete`` False when the stop cut the epoch short; a run
       resumed from that checkpoint finishes the epoch and its ``on_epoch_end`` sees True.

    Inside a gradient-accumulation window (``state.accumulating``), ``stop()`` and
    cancellation take effect after the window's last step, the one that updates: the
    window's gradients are in no checkpoint. The steps between run as usual (with ``def``
    hooks only, once cancelled), and a log line on ``asynchat.loop`` says why the loop goes
    on. A forced exit (a second Ctrl-C) does not wait for the window.

    ``on_loop_end`` runs every callback's hook even if one raises; the first error propagates.
    After ``stop()`` ``fit()`` returns normally, with ``state.stop_reason`` set.

    **One model, several loops.** A loop holds its model from ``fit()`` to its end (a paused
    loop too). Another loop on the same model, or on a model sharing a submodule or a weight
    with it, is refused with a ``RuntimeError`` naming both, and stays unstarted to run
    later, unless both predict in ``eval()`` mode on one device, or the new loop runs inside
    the holder: from its ``def`` hooks with :meth:`run_inline`, or awaited in its ``async
    def`` hooks (the holder's compute thread waits for the hook). Two trainers updating one
    model from two threads would crash the process; a mode change under a running loop
    would silently change what it computes. Each loop puts back every submodule's own
    ``train()``/``eval()`` mode when it ends (the last of several predictors sharing a
    model does), so layers frozen in ``eval()`` stay frozen through a validation. A loop's
    callbacks are held the same way (see :class:`~asynchat.Callback`), and its data loader
    where its readers share one position (an iterator; a DataLoader with persistent workers).
    """

    training: ClassVar[bool] = False
    #: Whether each rank holds only shards of the model (FSDP): checkpoints are then written
    #: by every rank with torch.distributed.checkpoint, as a directory (see ``asynchat._dcp``).
    shards_state: ClassVar[bool] = False

    def __init__(
        self,
        model: Models,
        data_loader: DataSource,
        *,
        batch_processor: BatchProcessor,
        device: str | torch.device | int | None = None,
        num_epochs: int | None = None,
        num_steps: int | None = None,
        callbacks: Iterable[Callback] = (),
        prefetch: int = 2,
        name: str | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(callbacks)
        model = as_module(model)
        _check_arguments(model, data_loader, batch_processor, num_epochs, num_steps, prefetch)
        _check_name(name)
        if resume_from is not None:
            check_path("resume_from", resume_from)
        self.model = model
        self.data_loader = data_loader
        self.batch_processor = batch_processor
        self.device = resolve_device(device)
        self.prefetch = prefetch
        self._train_mode = self.training  # the model's mode in the run (a Predictor may differ)
        self.name = name if name is not None else f"{type(self).__name__.lower()}-{next(_names)}"
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.resumed_from: Path | None = None  # the checkpoint file actually loaded
        self.damaged_at_resume: tuple[Path, ...] = ()  # newer ones it was loaded instead of
        self.run_id = uuid.uuid4().hex  # this run's across its resumes (LoopHandle.run_id)
        self.state = LoopState(
            loop=self, model=model, optimizer=None, device=self.device, training=self.training,
            num_epochs=num_epochs, num_steps=num_steps, steps_per_epoch=data_length(data_loader),
        )  # fmt: skip
        self.state.metrics = Metrics(lambda: self.state.global_step)
        self._control = LoopControl(on_status=self._on_status)
        self._events = EventHub(self.snapshot)
        self._throughput = Throughput()
        # Runs the phases' hooks; its `trace` switches the debug trace (the "asynchat.loop"
        # logger, read once per run): phases, status changes, thread hops and decisions.
        self._hooks_runner = HookRunner(self.name, self._hooks, self.state, self._cancelling)
        self._compute: ComputeThread | None = None
        self._run: LoopRun | None = None  # the compute thread's half, during the run
        self._data = DataTracker()  # where the loop is in its data, for checkpoints
        self._resume: ResumePoint | None = None  # where a resumed run starts
        self._claim: Claim | None = None  # this loop's use of its model, during the run
        self._inline_parent: LoopBase | None = None  # the loop run_inline runs this one in
        self._ranks: RankGroup | None = None  # set by _span_ranks

    def _span_ranks(self, *, sharded_model: bool, pipelined: bool = False) -> None:
        """Make this loop one rank of a job whose ranks act together; every rank calls it at
        the same point (as it builds the loop, or starts it). ``sharded_model``: its model's
        forward is a collective, so loops run inline in it step together too.
        ``pipelined``: the agreement after a step is pipelined (``control_lag=1``)."""
        self._ranks = RankGroup(sharded_model=sharded_model)
        self._control.agree_later = self._ranks.agree_later if pipelined else None
        self._control.agree = self._ranks.agree

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._control.status}>"

    # -- control, from the event loop or from hooks ---------------------------------------

    @property
    def status(self) -> LoopStatus:
        """Where the loop is in its life; see :class:`~asynchat.LoopStatus`."""
        return self._control.status

    def snapshot(self) -> LoopSnapshot:
        """Where the loop is now: status, counters, throughput and the last metrics."""
        state = self.state
        steps_per_s, samples_per_s = self._throughput.rates(state.global_step)
        return LoopSnapshot(
            name=self.name,
            run_id=self.run_id,
            status=self._control.status,
            epoch=state.epoch,
            step=state.step,
            global_step=state.global_step,
            num_epochs=state.num_epochs,
            num_steps=state.num_steps,
            steps_per_s=steps_per_s,
            samples_per_s=samples_per_s,
            metrics=dict(state.metrics),
            stop_reason=state.stop_reason,
            error=repr(state.exception) if state.exception is not None else None,
            paused_s=self._throughput.paused_s(),
        )

    @property
    def paused_s(self) -> float:
        """Seconds this run has been held by :meth:`pause` so far (the current hold too),
        which the snapshot's rates and :class:`~asynchat.callbacks.StatsMonitor` leave out."""
        return self._throughput.paused_s()

    def events(self, *, buffer: int = 64, progress_every: float | None = 1.0) -> EventStream:
        """Subscribe to this loop's events: ``async for event in loop.events(): ...``.

        Status changes, each epoch's begin and end, and a ``progress`` event every
        ``progress_every`` seconds while nothing else happens (made for this subscriber, at
        its own pace); the ``end`` event (finished, failed or cancelled) is the last, and
        iteration stops there. The subscription starts when ``events()`` is called (from
        async code), so nothing after that is missed. Any number of subscribers may iterate
        at once and none can slow the loop down: each has a buffer of ``buffer`` events, and
        when a subscriber falls that far behind, its oldest unread events are dropped and the
        next event it reads says how many (``dropped``); ``end`` is never dropped. A
        subscription ends at ``end``, when the stream is closed (``async with
        loop.events() as events:``), or when a stream left early is garbage-collected.
        """
        positive_int("buffer", buffer)
        positive_number("progress_every", progress_every, allow_none=True)
        return self._events.subscribe(buffer, progress_every)

    @property
    def rank(self) -> int:
        """This process's rank in the default process group (0 without one).

        A property of the process, not of the loop's class: a Predictor under ``launch``, or
        Validation's inside a distributed trainer, knows its rank too.
        """
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        """The number of processes in the default process group (1 without one)."""
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def is_rank_zero(self) -> bool:
        """Whether this loop should do what only one process of a job does (write files)."""
        return self.rank == 0

    @property
    def spans_ranks(self) -> bool:
        """Whether the loop is one rank of a job whose ranks act together (a distributed
        trainer; a Predictor over a model sharded over the ranks): :meth:`any_rank`,
        :meth:`sum_over_ranks` and :meth:`gather_to_rank_zero` are collectives, and a
        checkpoint holds each rank's :meth:`rank_state_dict`."""
        return self._ranks is not None

    def any_rank(self, flag: bool) -> bool:
        """``flag`` agreed by the loop's ranks: True on every rank if it is True on any.

        When the loop :attr:`spans_ranks` this is a collective (every rank must call it at
        the same point); other loops, such as a Predictor over a rank's own shard, decide
        alone.
        """
        return self._ranks.any(flag) if self._ranks is not None else flag

    def sum_over_ranks(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over the loop's ranks (in float64), e.g. a loss
        total and a sample count, for a mean over every rank's data.

        When the loop :attr:`spans_ranks` this is a collective, like :meth:`any_rank`;
        elsewhere ``values`` themselves.
        """
        if self._ranks is not None:
            return self._ranks.sum(values)
        return [float(v) for v in values]

    def gather_to_rank_zero(self, obj: T) -> list[T] | None:
        """``obj`` of every rank, by rank, on rank 0 (None on the others); picklable.

        When the loop :attr:`spans_ranks` this is a collective, like :meth:`any_rank`;
        elsewhere ``[obj]``.
        """
        return self._ranks.gather_to_rank_zero(obj) if self._ranks is not None else [obj]

    def _waits_for_caller(self) -> bool:
        """(The asks' futures'.) Whether the loop waits for its caller: called in one of its
        ``def`` hooks (on its compute thread), or in a task serving one of its ``async
        def`` hooks or those of a loop run inline in it (the compute thread waits for it)."""
        compute = self._compute
        if compute is None:
            return False
        if compute.on_thread():
            return True
        return compute.serving is not None and compute.serving is current_task()

    def _waits_for_a_hook(self) -> bool:
        """(The asks' futures'.) Whether the loop waits for one of its ``async def`` hooks
        now (or for one of a loop run inline in it)."""
        compute = self._compute
        return compute is not None and compute.serving is not None

    def _save_slot(self) -> int:
        """(Checkpoint's, at ``on_loop_begin`` of a loop that spans ranks.) A flag of its
        own in the agreements of the run, for :meth:`_ask_ranks_to_save`."""
        return self._control.save_slot()

    def _ask_ranks_to_save(self, slot: int) -> None:
        """(Checkpoint's, on the compute thread.) Ask every rank to save: the ask goes with
        the next boundary's agreement (no collective of its own)."""
        self._control.save_asks[slot] = True

    def _ranks_agreed_to_save(self, slot: int) -> bool:
        """(Checkpoint's, on the compute thread.) Whether an agreement since the last call
        carried some rank's ask to save: the same on every rank at each step's end."""
        agreed = self._control.saves_agreed
        asked, agreed[slot] = agreed[slot], False
        return asked

    def stop(self, reason: str | None = None) -> None:
        """End the loop after the step in progress; ``fit()`` then returns normally.

        Inside a gradient-accumulation window, after the window's last step (whose update
        uses its gradients; no checkpoint holds them). Data without ``len()`` is read one
        batch ahead: where it is read once (an iterator, sync or async: a stream), the batch
        read ahead is trained too, as the epoch's last step, rather than dropped (on ranks,
        the batch before it too). A read that waits on the data thread or the event loop (a
        stream; outside a window) is ended: on a rank of a group, only for data without
        ``len()``, after 1 s, as the end of the rank's data. Safe to call from any thread and from
        any hook. Called before ``fit()``, the loop runs ``on_loop_begin`` and
        ``on_loop_end`` and no step. Once the loop is done it is a no-op.

        Also from a signal handler of your own (``signal.signal``), though
        :func:`~asynchat.stop_on_signals` is simpler: such a handler runs between two
        bytecodes of the main thread, perhaps in the middle of a status change made there; the
        request is then made by a thread of its own as soon as the change is done.
        """
        if reason is not None and not isinstance(reason, str):  # (logged, saved, shown)
            raise TypeError(f"reason must be a str or None, got {reason!r}")
        if self._control.interrupted_inside():
            _later(self.stop, reason)
            return
        if self._control.request_stop(reason if reason is not None else "stop() called"):
            self.state.stop_reason = self._control.stop_reason
            self._interrupt_data_wait()

    def pause(self) -> None:
        """Hold the loop at the next step boundary until :meth:`resume` (from any thread).

        While paused, no step runs and the compute thread waits idle; the model, optimizer and
        data position stay as they are, and the status is ``paused``. ``stop()`` and
        cancellation still end a paused loop. Pausing before ``fit()`` holds it before its
        first step; pausing a loop that is done does nothing. From a signal handler too
        (see :meth:`stop`).
        """
        if self._control.interrupted_inside():
            _later(self.pause)
        else:
            self._control.pause()

    def resume(self) -> None:
        """Let a paused loop go on (a no-op if it is not paused); from any thread, and from a
        signal handler (see :meth:`stop`)."""
        if self._control.interrupted_inside():
            _later(self.resume)
        else:
            self._control.resume()

    def to_host(self, obj: T) -> Coroutine[Any, Any, T]:
        """Host copies of the tensors in ``obj``, awaited without blocking the event loop.

        For ``async def`` hooks: ``loss = await state.loop.to_host(state.loss)``. On CUDA the
        copy is ordered after the work queued so far on the compute stream. Called in a
        ``def`` hook (no event loop runs there) it raises, saying to read the tensor there.
        """
        transfer.awaited_here("loop.to_host()")
        stream = self._compute.stream if self._compute is not None else None
        return transfer.copy_to_host(obj, stream)

    def samples_in(self, batch: Any) -> int:
        """How many samples ``batch`` holds, as the batch processor counts them (its
        ``samples`` function; by default the first dimension of the first tensor)."""
        return self.batch_processor.samples_in(batch)

    def _on_status(self, status: LoopStatus) -> None:
        self._throughput.held(status is LoopStatus.PAUSED)
        if self._hooks_runner.trace:
            _LOG.debug("%s: status %s", self.name, status)
        self._events.publish(EventKind.END if status.done else EventKind.STATUS)

    def _cancelling(self) -> bool:
        return self._control.cancelling()

    def _request_cancel(self) -> None:
        self._control.request_cancel()
        self.state.stop_reason = self._control.stop_reason
        self._interrupt_data_wait()

    def _force_cancel(self) -> None:
        """A second interrupt: end even inside an accumulation window (nobody waits)."""
        self._control.request_cancel(now=True)
        self._interrupt_data_wait()

    def _interrupt_data_wait(self) -> None:
        run = self._run
        if run is not None:
            run.interrupt()

    # -- the run, on the event loop ---------------------------------------------------------

    async def fit(self) -> LoopState:
        """Run the loop to its end and return the final :class:`~asynchat.LoopState`."""
        with self._lifecycle(cancelled=anyio.get_cancelled_exc_class()):
            async with ComputeThread(self.device, name=f"asynchat-{self.name}") as compute:
                run = self._attach(compute)
                # asynchat.to_host() in this task (our async hooks) orders after our stream.
                token = transfer.compute_stream.set(compute.stream)
                try:
                    await compute.run(
                        run.run, on_cancel=self._request_cancel, on_force=self._force_cancel
                    )
                finally:
                    transfer.compute_stream.reset(token)
        return self.state

    def run_inline(self, parent: LoopHandle) -> LoopState:
        """Run this loop to its end on the compute thread of the running loop ``parent``.

        For ``def`` hooks that run a loop inside another, e.g. validation between a
        trainer's steps: no thread is started, the model stays on its device and stream, and
        this loop's ``async def`` hooks are awaited through ``parent``'s event loop. It is
        part of ``parent``'s step: if ``parent`` is cancelled it still runs to its end (with
        its ``def`` hooks only, as a cancelled loop does), so the step completes; a forced
        exit (a second Ctrl-C) ends it at its next step.
        """
        if not isinstance(parent, LoopBase):
            raise TypeError(f"run_inline needs the running loop (state.loop), got {parent!r}")
        compute = parent._compute
        if compute is None or not compute.on_thread():
            raise RuntimeError(
                f"{self.name}.run_inline({parent.name}) must be called from a def hook of the "
                f"running loop {parent.name} (on its compute thread); from async code use "
                "`await loop.fit()`"
            )
        with self._lifecycle(cancelled=JobCancelled, inside=parent._claim):
            self._control.parent = parent._control
            self._inline_parent = parent
            run = self._attach(compute)
            if parent.device == self.device and parent._run is not None:
                run.stager = parent._run.stager  # its copy stream, if it has made one
            run.run()
        return self.state

    @contextlib.contextmanager
    def _lifecycle(
        self, *, cancelled: type[BaseException], inside: Claim | None = None
    ) -> Iterator[None]:
        """The run's status from start to end (see :meth:`LoopControl.running`); runs once.

        The model is claimed first (``asynchat._in_use``): a run refused because another loop
        uses the model leaves this loop unstarted, to run once the other is done. ``inside``:
        the claim of the loop this one runs inline in.
        """
        status = self._control.status
        if status is not LoopStatus.CREATED:
            raise RuntimeError(
                f"{self.name} is running now (status {status.value}); await that run"
                if not status.done
                else f"{self.name} has already run (status {status.value}); a loop runs "
                f"once, so create a new {type(self).__name__} to run again"
            )
        if inside is None and self._ranks is None and self._steps_with_ranks():
            self._span_ranks(sharded_model=True)  # every rank runs it at the same point
        use = claim(
            self, self.model, self.device, trains=self._train_mode, updates=self.training,
            inside=inside, callbacks=self.callbacks, processor=self.batch_processor,
            data=self.data_loader,
            reading=lambda: self._run is not None and self._run.batches is not None,
            collective=self.spans_ranks and self.world_size > 1,
        )  # fmt: skip
        self._claim = use
        self._hooks_runner.trace = _LOG.isEnabledFor(logging.DEBUG)
        self._throughput.start(self.state.global_step)
        ended_by: BaseException | None = None
        try:
            for callback in self.callbacks:
                callback._run_begins(self.state)
            with hold.running(self), self._control.running(cancelled=cancelled):
                yield
        except BaseException as exc:
            ended_by = exc
            raise
        finally:
            self._throughput.stop()
            self._detach()
            self._claim = None
            use.release()  # other loops may use the model (its modes: Claim.modes, in the run)
            for callback in self.callbacks:
                callback._run_ended(ended_by)

    def _attach(self, compute: ComputeThread) -> LoopRun:
        """The run's compute-thread half, going through ``compute``."""
        assert self._claim is not None, "attached in _lifecycle, which claims the model"
        self._compute = self._hooks_runner.compute = compute
        self._run = LoopRun(
            self,
            data_loader=self.data_loader,
            batch_processor=self.batch_processor,
            prefetch=self.prefetch,
            modes=self._claim.modes,
            prepare=self._prepare,
            begin_epoch_data=self._begin_epoch_data,
            control=self._control,
            hooks=self._hooks_runner,
            events=self._events,
            data=self._data,
            throughput=self._throughput,
        )
        return self._run

    def _detach(self) -> None:
        self._compute = self._hooks_runner.compute = None
        self._run = None

    # -- the run, on the compute thread ------------------------------------------------------

    def run_phase(self, phase: Phase) -> None:
        """Run the hooks of ``phase`` in order: ``def`` ones here, ``async def`` ones on the
        event loop (this thread waits for them). Called on the compute thread only.

        ``on_loop_end`` is teardown: every hook runs even when an earlier one raises; the
        first error then propagates as itself, with the later ones attached as notes.
        """
        self._hooks_runner.run_phase(phase)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this run, copied to host memory.

        Call it on the compute thread (from a ``def`` hook), where it cannot race a step:
        model, batch processor (grad scaler), callbacks with state, metrics, counters, the
        position in the data and every RNG state. :class:`~asynchat.Trainer` adds the
        optimizer. The result loads with ``torch.load(weights_only=True)``.

        When the state is sharded (:attr:`shards_state`), the model and the optimizers are
        left out: they are :meth:`sharded_state_dict`'s, which every rank saves with DCP.
        When the loop :attr:`spans_ranks`, the random states and metrics are this rank's,
        and callbacks with ``state_per_rank`` are left out: a checkpoint adds every rank's
        :meth:`rank_state_dict` as ``ranks`` (as :class:`~asynchat.callbacks.Checkpoint`
        does), from which each rank resumes its own.
        """
        return build_checkpoint(
            tracker=self._data,
            run_id=self.run_id,
            global_step=self.state.global_step,
            world_size=self.world_size,
            spans_ranks=self.spans_ranks,
            metrics=self.state.metrics,
            model=None if self.shards_state else self.model,
            processor_state=self.batch_processor.state_dict(),
            callbacks=self.callbacks,
            data_loader=self.data_loader,
            extra=self._extra_state(),
        )

    def rank_state_dict(self) -> dict[str, Any]:
        """What of the run is this rank's own, copied to host memory: its RNG and data
        loader generator states, its metrics, and the callbacks with ``state_per_rank``.
        Call it on the compute thread, like :meth:`state_dict`."""
        return rank_state(
            tracker=self._data,
            metrics=self.state.metrics,
            callbacks=self.callbacks,
            data_loader=self.data_loader,
        )

    def sharded_state_dict(self) -> dict[str, Any]:
        """The model's and the optimizers' state as this rank holds it (``DTensor`` shards
        when :attr:`shards_state`), and the DTensors in the callbacks' states (an
        EMA's average), for ``torch.distributed.checkpoint``; not copied."""
        return sharded_state(self.model, self._optimizer_map(), callback_states(self.callbacks))

    def save_shards(self, directory: Path) -> Future[Any]:
        """Every rank, on the compute thread: copy this rank's :meth:`sharded_state_dict` to
        host memory now and write it into ``directory`` with DCP on a thread of DCP's; the
        future is done when it is written (on rank 0: when every rank's is)."""
        return start_save(self.sharded_state_dict(), directory, self._checkpoint_group())

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the loop then resumes where it was taken.

        A sharded checkpoint (``checkpoint["sharded"]``, as :func:`load_checkpoint` reads
        one) loads its model and optimizers from its directory with DCP, resharded to this
        job's ranks; call it on every rank then. With every rank's part (``ranks``), this
        rank resumes from its own.
        """
        rank, world_size = (self.rank, self.world_size) if self.spans_ranks else (0, 1)
        checkpoint = own_part(
            checkpoint, rank=rank, world_size=world_size, callbacks=self.callbacks
        )
        self._check_checkpoint(checkpoint)  # before anything is overwritten
        self._resume = apply_checkpoint(
            checkpoint,
            load_model=self._load_model_state,
            load_processor=self.batch_processor.load_state_dict,
            callbacks=self.callbacks,
            data_loader=self.data_loader,
            world_size=self.world_size,
        )
        self._load_extra_state(checkpoint)
        self._data.resumed(checkpoint)
        self.state.global_step = checkpoint["progress"]["global_step"]
        self.state.metrics.restore(
            checkpoint["metrics"], step=self.state.global_step,
            steps=checkpoint.get("metric_steps"),
        )  # fmt: skip
        self.state.epoch = checkpoint["progress"]["epoch"]
        self.run_id = checkpoint["progress"].get("run", self.run_id)  # (older ones: none)

    def _prepare(self) -> ResumePoint | None:
        """The model, optimizer and processor ready, and the resume checkpoint loaded (no
        hook has run yet); returns where a resumed run starts."""
        self._agree_with_ranks()
        self.model.to(self.device)
        self._configure()
        self.batch_processor.setup(self)
        if self.resume_from is not None:
            damaged: list[Path] = []
            checkpoint, self.resumed_from = read_checkpoint(
                self.resume_from, "resume_from", damaged=damaged
            )
            self.damaged_at_resume = tuple(damaged)
            try:
                self.load_state_dict(checkpoint)
            except Exception as exc:  # a model or optimizer that does not fit it
                add_note(exc, f"asynchat: while resuming from {self.resumed_from}")
                raise
        resume, self._resume = self._resume, None
        if resume is not None:
            self._warn_past_bound(resume)
        return resume

    def _warn_past_bound(self, resume: ResumePoint) -> None:
        """A run resumed beyond its own ``num_steps`` or ``num_epochs`` trains nothing: said,
        as it is most likely a typo (resumed exactly at its bound, a run that had finished,
        such as an elastic job's last restart, ends quietly)."""
        state, bound = self.state, ""
        if state.num_steps is not None and state.global_step > state.num_steps:
            bound = f"global step {state.global_step}, past num_steps={state.num_steps}"
        started = resume.epoch + (resume.steps_done > 0)  # epochs begun by the checkpoint
        if state.num_epochs is not None and started > state.num_epochs:
            bound = f"epoch {resume.epoch}, past num_epochs={state.num_epochs}"
        if bound:
            warnings.warn(
                f"{self.name}: resumed from {self.resumed_from} at {bound}: there is nothing "
                "to train, and the run ends at once",
                RuntimeWarning,
                stacklevel=2,
            )

    # Template hooks for subclasses, called on the compute thread.

    def _steps_with_ranks(self) -> bool:
        """Whether this loop, run on its own, must step together with its peers on the other
        ranks though it was not built to span them (a Predictor over a sharded model); run
        inline, it follows the loop it runs in."""
        return False

    def _agree_with_ranks(self) -> None:
        """Refuse to start a loop whose ranks would not act alike (other bounds or
        processors, or callbacks with ``every_rank`` missing on some rank): one all-gather,
        when the loop spans ranks; and take rank 0's :attr:`run_id` (one broadcast)."""
        if self._ranks is not None:
            together = "step and update together" if self.training else "step together"
            name = type(self).__name__
            self._ranks.refuse_unlike(name, self._settings(), self.callbacks, together)
            self.run_id = self._ranks.rank_zeros(self.run_id)

    def _settings(self) -> str:
        """What must be alike on every rank for the ranks to step together."""
        processor = self.batch_processor
        return (
            f"batch_processor={type(processor).__qualname__}(grad_accumulation_steps="
            f"{getattr(processor, 'grad_accumulation_steps', None)}, "
            f"amp={getattr(processor, 'amp', None)!r})"
        )

    def _configure(self) -> None:
        """Build what needs the model on its device (the Trainer: its optimizer)."""

    def _begin_epoch_data(self, epoch: int) -> int | None:
        """Prepare the data loader for ``epoch`` before its order is drawn, and return the
        epoch's steps, as its ``len()`` says now (a batch sampler's may change from epoch to
        epoch); None: unknown until the data ends. A loop that spans ranks agrees them with
        its peers, as does one run inline in a loop whose model's forward is a collective
        (FSDP: its Validation)."""
        ranks, parent = self._ranks, self._inline_parent
        if ranks is None and parent is not None and parent._ranks is not None:
            ranks = parent._ranks if parent._ranks.sharded_model else None
        if ranks is None:
            return data_length(self.data_loader)
        return ranks.agreed_length(self.state, self.data_loader, self._control)

    def _extra_state(self) -> dict[str, Any]:
        """Add to the checkpoint (the Trainer: its optimizer)."""
        return {}

    def _check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint this loop cannot go on from, before anything is loaded (the
        Trainer: other optimizers)."""

    def _optimizer_map(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers by name (none for a loop that does not train)."""
        return {}

    def _checkpoint_group(self) -> dist.ProcessGroup | None:
        """The CPU group sharded checkpoints' collectives use (None: the default one)."""
        return None

    def _load_model_state(self, checkpoint: dict[str, Any]) -> None:
        """The model's weights, and a sharded checkpoint's optimizers and the callbacks'
        sharded tensors, from ``checkpoint``."""
        sharded = checkpoint.get("sharded")
        if sharded is None:
            if self.shards_state:
                raise CheckpointError(
                    f"{self.resumed_from or 'the checkpoint'} holds the whole model (written "
                    f"by a trainer that does not shard); {type(self).__name__} resumes from "
                    "sharded checkpoints (step-*.dcp). To start from its weights, "
                    "asynchat.callbacks.load_weights(model, path) before training"
                )
            load_portable(self.model, checkpoint["model"])
            return
        # The callbacks' sharded tensors too: in place of their placeholders, for the
        # callbacks to load next (apply_checkpoint).
        checkpoint["callbacks"] = load_sharded(
            Path(sharded["path"]), self.model, self._optimizer_map(),
            list(sharded["optimizers"]), self._checkpoint_group(), checkpoint["callbacks"],
        )  # fmt: skip

    def _load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` added."""


Models = torch.nn.Module | Mapping[str, torch.nn.Module]


def as_module(model: Models) -> torch.nn.Module:
    """The loop's model: a module, or a mapping of names to modules (several models, e.g. a
    GAN's ``{"generator": ..., "discriminator": ...}``) made one ``nn.ModuleDict``, whose
    checkpoint keys are ``<name>.<parameter>`` and whose models ``state.model.<name>``
    reaches."""
    if isinstance(model, Mapping) and not isinstance(model, torch.nn.Module):
        if not model:
            raise ValueError("model must not be an empty mapping: name at least one model")
        for name, module in model.items():
            if not isinstance(name, str) or not name or "." in name:
                raise TypeError(f"model names must be non-empty strings without dots, got {name!r}")
            if not isinstance(module, torch.nn.Module):
                raise TypeError(
                    f"model[{name!r}] must be a torch.nn.Module, got {type(module).__name__}"
                )
        return torch.nn.ModuleDict(dict(model))
    return model  # checked with the other arguments


def _check_name(name: object) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")
    if name is not None and not name.strip():
        raise ValueError(f"name must not be blank (it leads every log line), got {name!r}")


def _check_arguments(
    model: object,
    data_loader: DataSource,
    batch_processor: BatchProcessor,
    num_epochs: int | None,
    num_steps: int | None,
    prefetch: int,
) -> None:
    if not isinstance(model, torch.nn.Module):
        got = (
            f"the class {model.__name__}, not an instance"
            if isinstance(model, type)
            else type(model).__name__
        )
        raise TypeError(
            f"model must be a torch.nn.Module or a mapping of names to modules, got {got}"
        )
    check_data_loader(data_loader, num_epochs)
    check_processor(batch_processor)
    if (num_epochs is None) == (num_steps is None):
        raise ValueError(
            "pass exactly one of num_epochs and num_steps, got "
            f"num_epochs={num_epochs!r} and num_steps={num_steps!r}"
        )
    for name, value in (("num_epochs", num_epochs), ("num_steps", num_steps)):
        if value is not None:  # exactly one is given
            positive_int(name, value)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0 (0: no prefetch thread), got {prefetch!r}")


def _later(request: Callable[..., None], *args: Any) -> None:
    """Make ``request`` from a thread of its own: a signal handler interrupted this thread
    in the middle of a change of the loop's control state, which the request must follow
    (made here, it would run inside the change)."""
    threading.Thread(
        target=request, args=args, name="asynchat-request-after-signal", daemon=True
    ).start()
