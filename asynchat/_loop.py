"""LoopBase: the loop, written once, for trainers and predictors alike."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import reprlib
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio
import torch
import torch.distributed as dist

from asynchat import _transfer as transfer
from asynchat._callback import Callback, Hook, PipeBase
from asynchat._checkpoint_io import load_checkpoint
from asynchat._checks import path as check_path
from asynchat._checks import positive_int, positive_number
from asynchat._compute import ComputeThread, JobCancelled
from asynchat._control import Decision, LoopControl
from asynchat._data import check_data_loader, data_length, skip_batches, with_last
from asynchat._device import resolve_device
from asynchat._errors import add_note
from asynchat._events import EventHub, EventKind, EventStream, LoopSnapshot
from asynchat._handle import LoopHandle
from asynchat._heartbeat import beat
from asynchat._phase import Phase
from asynchat._prefetch import DeviceStager, InlineBatches, Interrupted, Prefetcher, Staged
from asynchat._processor import BatchProcessor
from asynchat._resume import DataTracker, ResumePoint, apply_checkpoint, build_checkpoint
from asynchat._rng import restore_rng
from asynchat._state import LoopState, LoopStatus
from asynchat._transfer import to_host
from asynchat._tree import batch_size

T = TypeVar("T")

_names = itertools.count()
_LOG = logging.getLogger("asynchat.loop")
_RUNNING = frozenset({LoopStatus.RUNNING, LoopStatus.PAUSED})


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
    .. [2] ``state.exception`` holds the error during ``on_loop_end``; then ``fit()`` raises
       it as itself. If ``on_loop_end`` raises too, that error propagates, chained to the
       first one (``__context__``). An error while preparing (before ``on_loop_begin``) runs
       no hook at all.

    .. [3] with ``state.epoch_complete`` False when the stop cut the epoch short; a run
       resumed from that checkpoint finishes the epoch and its ``on_epoch_end`` sees True.

    ``on_loop_end`` runs every callback's hook even if one raises; the first error propagates.
    After ``stop()`` ``fit()`` returns normally, with ``state.stop_reason`` set.
    """

    training: ClassVar[bool] = False

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Iterable[Any],
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
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_data_loader(data_loader, num_epochs)
        if not isinstance(batch_processor, BatchProcessor):
            raise TypeError(
                f"batch_processor must be an asynchat.BatchProcessor, got {batch_processor!r}"
            )
        _check_bounds(num_epochs, num_steps)
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(
                f"prefetch must be an int >= 0 (0: no prefetch thread), got {prefetch!r}"
            )
        self.model = model
        self.data_loader = data_loader
        self.batch_processor = batch_processor
        self.device = resolve_device(device)
        self.prefetch = prefetch
        self.name = name if name is not None else f"{type(self).__name__.lower()}-{next(_names)}"
        self.state = LoopState(
            loop=self,
            model=model,
            optimizer=None,
            device=self.device,
            training=self.training,
            num_epochs=num_epochs,
            num_steps=num_steps,
            steps_per_epoch=data_length(data_loader),
        )
        self._control = LoopControl(on_status=self._on_status)
        # Debug trace (the "asynchat.loop" logger, off unless configured): phases, status
        # changes, thread hops and boundary decisions, each line led by the loop's name.
        # One logger for all loops: a logger per loop would stay in logging's registry
        # forever. Whether the trace is on is read once per run.
        self._trace = False
        self._events = EventHub(self.snapshot)
        self._started_at: float | None = None
        self._steps_before_start = 0
        self._batch_size = 0  # of the current epoch's first batch, for samples/s
        self._compute: ComputeThread | None = None
        self._stager: DeviceStager | None = None  # made at the first epoch, kept for the run
        self._batches: Prefetcher[Staged] | InlineBatches[Staged] | None = None
        if resume_from is not None:
            check_path("resume_from", resume_from)
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.resumed_from: Path | None = None  # the checkpoint file actually loaded
        # Where the loop is in its data, for checkpoints: (epoch, steps done in it, whether
        # its data ran out), and the generator states its data order was drawn from.
        self._data = DataTracker()
        self._resume: ResumePoint | None = None

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
        elapsed = time.perf_counter() - self._started_at if self._started_at is not None else 0.0
        steps_per_s = (state.global_step - self._steps_before_start) / elapsed if elapsed else 0.0
        return LoopSnapshot(
            name=self.name,
            status=self._control.status,
            epoch=state.epoch,
            step=state.step,
            global_step=state.global_step,
            num_epochs=state.num_epochs,
            num_steps=state.num_steps,
            steps_per_s=steps_per_s,
            samples_per_s=steps_per_s * self._batch_size,
            metrics=dict(state.metrics),
            stop_reason=state.stop_reason,
            error=repr(state.exception) if state.exception is not None else None,
        )

    def events(self, *, buffer: int = 64, progress_every: float | None = 1.0) -> EventStream:
        """Subscribe to this loop's events: ``async for event in loop.events(): ...``.

        Status changes, each epoch's begin and end, and a ``progress`` event every
        ``progress_every`` seconds while nothing else happens (made for this subscriber, at
        its own pace); the ``end`` event (finished, failed or cancelled) is the last, and
        iteration stops there. The subscription starts when ``events()`` is called (from
        async code), so nothing after that is missed. Any number of subscribers may iterate
        at once and none can slow the loop down: each has a buffer of ``buffer`` events, and
        when a subscriber falls that far behind, its oldest unread events are dropped and the
        next event it reads says how many (``dropped``); ``end`` is never dropped.
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

    def any_rank(self, flag: bool) -> bool:
        """``flag`` agreed by the loop's ranks: True on every rank if it is True on any.

        In a distributed trainer this is a collective (every rank must call it at the same
        point); other loops, such as a Predictor over a rank's own shard, decide alone.
        """
        return flag

    def _on_status(self, status: LoopStatus) -> None:
        if self._trace:
            _LOG.debug("%s: status %s", self.name, status)
        self._events.publish(EventKind.END if status.done else EventKind.STATUS)

    def stop(self, reason: str | None = None) -> None:
        """End the loop after the step in progress; ``fit()`` then returns normally.

        Safe to call from any thread and from any hook. Called before ``fit()``, the loop
        runs ``on_loop_begin`` and ``on_loop_end`` and no step. Once the loop is done it is a
        no-op.
        """
        if self._control.request_stop(reason if reason is not None else "stop() called"):
            self.state.stop_reason = self._control.stop_reason
            self._interrupt_data_wait()

    def pause(self) -> None:
        """Hold the loop at the next step boundary until :meth:`resume` (from any thread).

        While paused, no step runs and the compute thread waits idle; the model, optimizer and
        data position stay as they are, and the status is ``paused``. ``stop()`` and
        cancellation still end a paused loop. Pausing before ``fit()`` holds it before its
        first step; pausing a loop that is done does nothing.
        """
        self._control.pause()

    def resume(self) -> None:
        """Let a paused loop go on (a no-op if it is not paused)."""
        self._control.resume()

    async def to_host(self, obj: T) -> T:
        """Host copies of the tensors in ``obj``, awaited without blocking the event loop.

        For ``async def`` hooks: ``loss = await state.loop.to_host(state.loss)``. On CUDA the
        copy is ordered after the work queued so far on the compute stream.
        """
        stream = self._compute.stream if self._compute is not None else None
        return await to_host(obj, after=stream)

    # -- the run, on the event loop ---------------------------------------------------------

    async def fit(self) -> LoopState:
        """Run the loop to its end and return the final :class:`~asynchat.LoopState`."""
        with self._lifecycle(cancelled=anyio.get_cancelled_exc_class()):
            async with ComputeThread(self.device, name=f"asynchat-{self.name}") as compute:
                self._compute = compute
                # asynchat.to_host() in this task (our async hooks) orders after our stream.
                token = transfer.compute_stream.set(compute.stream)
                try:
                    await compute.run(self._run, on_cancel=self._request_cancel)
                finally:
                    transfer.compute_stream.reset(token)
        return self.state

    def run_inline(self, parent: LoopHandle) -> LoopState:
        """Run this loop to its end on the compute thread of the running loop ``parent``.

        For ``def`` hooks that run a loop inside another, e.g. validation between a
        trainer's steps: no thread is started, the model stays on its device and stream, and
        this loop's ``async def`` hooks are awaited through ``parent``'s event loop. It ends
        early (raising the parent's cancellation) if ``parent`` is cancelled.
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
        with self._lifecycle(cancelled=JobCancelled):
            self._control.parent = parent._control
            if parent.device == self.device:
                self._stager = parent._stager  # its copy stream, if it has made one
            self._compute = compute
            self._run()
        return self.state

    @contextlib.contextmanager
    def _lifecycle(self, *, cancelled: type[BaseException]) -> Iterator[None]:
        """``created -> running``, then ``finished``, ``failed`` or ``cancelled`` by how the
        block ends."""
        control = self._control
        if control.status is not LoopStatus.CREATED:
            raise RuntimeError(
                f"{self.name} has already run (status {control.status}); a loop runs once, so "
                f"create a new {type(self).__name__} to run again"
            )
        self._trace = _LOG.isEnabledFor(logging.DEBUG)
        self._started_at = time.perf_counter()
        self._steps_before_start = self.state.global_step
        control.transition(LoopStatus.STOPPING if control.stop_requested else LoopStatus.RUNNING)
        try:
            yield
        except cancelled:
            control.transition(LoopStatus.CANCELLED)
            raise
        except GeneratorExit:  # a stream closed early: the loop was stopped
            control.transition(LoopStatus.FINISHED)
            raise
        except BaseException as exc:
            # Ctrl-C that reached the event loop (trio raises it there) wound the loop down
            # like a cancellation; one raised by a hook on the compute thread is an error.
            interrupted = isinstance(exc, KeyboardInterrupt) and control.cancel_requested
            control.transition(LoopStatus.CANCELLED if interrupted else LoopStatus.FAILED)
            raise
        finally:
            self._compute = None
        control.transition(LoopStatus.FINISHED)

    def _request_cancel(self) -> None:
        self._control.request_cancel()
        self.state.stop_reason = self._control.stop_reason
        self._interrupt_data_wait()

    def _interrupt_data_wait(self) -> None:
        """Wake a compute thread waiting for data, so a stop or cancellation needs no batch.
        Only alone: a rank of a group must run the step its peers run, then agree."""
        batches = self._batches
        if batches is not None and self._control.agree is None:
            batches.interrupt()

    async def _await_hook(
        self, hook: Hook, phase: Phase, ready: torch.cuda.Event | None
    ) -> torch.cuda.Event | None:
        if self._control.cancelling() and phase is not Phase.ON_LOOP_END:
            return None  # a cancelled loop skips the async hooks it has not started
        if ready is None:
            await hook.fn(self.state)  # type: ignore[misc]
            return None
        # On CUDA: whatever the hook queues on this thread's stream runs after the step's
        # work so far, and the compute stream will wait for it (device-side, both ways).
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        await hook.fn(self.state)  # type: ignore[misc]
        done: torch.cuda.Event = stream.record_event()
        return done

    # -- the run, on the compute thread ------------------------------------------------------

    def run_phase(self, phase: Phase) -> None:
        """Run the hooks of ``phase`` in order: ``def`` ones here, ``async def`` ones on the
        event loop (this thread waits for them). Called on the compute thread only.

        ``on_loop_end`` is teardown: every hook runs even when an earlier one raises (so each
        callback joins its threads and closes its files); the first error then propagates as
        itself, with the later ones attached to it as notes.
        """
        state = self.state
        state.phase = phase
        if self._trace:
            _LOG.debug(
                "%s: %s epoch=%d step=%d global_step=%d on %s", self.name, phase.value, state.epoch,
                state.step, state.global_step, threading.current_thread().name,
            )  # fmt: skip
        # Progress for launch(hang_timeout=...), on entering and on leaving the phase, so a
        # rank stuck in a hook is behind a rank that waits in the collective after it. A
        # no-op outside launched ranks.
        beat()
        if phase is Phase.ON_LOOP_END:
            self._run_every_hook(phase)
        else:
            for hook in self._hooks[phase]:
                self._call_hook(hook, phase)
        beat()

    def _call_hook(self, hook: Hook, phase: Phase) -> None:
        if not hook.is_async:
            hook.fn(self.state)
            return
        compute = self._compute
        assert compute is not None
        stream = compute.stream
        if self._trace:
            _LOG.debug("%s: %s: hop to the event loop for %r", self.name, phase.value, hook)
        ready = stream.record_event() if stream is not None else None
        done = compute.call_async(functools.partial(self._await_hook, hook, phase, ready))
        if stream is not None and done is not None:
            stream.wait_event(done)

    def _run_every_hook(self, phase: Phase) -> None:
        first: BaseException | None = None
        for hook in self._hooks[phase]:
            try:
                self._call_hook(hook, phase)
            except BaseException as exc:
                if first is None:
                    first = exc
                else:
                    trace = "".join(traceback.format_exception(exc)).rstrip()
                    add_note(first, f"{hook!r} also raised, at {phase.value}:\n{trace}")
        if first is not None:
            raise first

    def _prepare(self) -> None:
        """Get the model, optimizer and processor ready; on the compute thread, before hooks."""
        self.model.to(self.device)
        self._configure()
        self.batch_processor.setup(self)
        if self.resume_from is not None:
            checkpoint, self.resumed_from = load_checkpoint(self.resume_from)
            self.load_state_dict(checkpoint)

    # -- checkpoints: on the compute thread -------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this run, copied to host memory.

        Call it on the compute thread (from a ``def`` hook), where it cannot race a step:
        model, batch processor (grad scaler), callbacks with state, metrics, counters, the
        position in the data and every RNG state. :class:`~asynchat.Trainer` adds the
        optimizer. The result loads with ``torch.load(weights_only=True)``.
        """
        state = self.state
        return build_checkpoint(
            tracker=self._data,
            global_step=state.global_step,
            metrics=state.metrics,
            model=self.model,
            processor_state=self.batch_processor.state_dict(),
            callbacks=self.callbacks,
            data_loader=self.data_loader,
            extra=self._extra_state(),
        )

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the loop then resumes where it was taken."""
        self._resume = apply_checkpoint(
            checkpoint,
            model=self.model,
            load_processor=self.batch_processor.load_state_dict,
            callbacks=self.callbacks,
            data_loader=self.data_loader,
        )
        self._load_extra_state(checkpoint)
        state = self.state
        state.metrics.update(checkpoint["metrics"])
        state.global_step = checkpoint["progress"]["global_step"]
        state.epoch = checkpoint["progress"]["epoch"]

    def _configure(self) -> None:
        """Subclasses build what needs the model on its device (the Trainer: its optimizer)."""

    def _begin_epoch_data(self, epoch: int) -> None:
        """Subclasses prepare the data loader for ``epoch`` before its order is drawn."""

    def _extra_state(self) -> dict[str, Any]:
        """Subclasses add to the checkpoint here (the Trainer: its optimizer)."""
        return {}

    def _load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        """Subclasses restore what :meth:`_extra_state` added."""

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Train or eval mode and grad mode for the run (grad mode is per thread)."""
        was_training = self.model.training
        self.model.train(self.training)
        try:
            with torch.set_grad_enabled(self.training):
                yield
        finally:
            self.model.train(was_training)

    def _run(self) -> None:
        with self._mode():
            self._prepare()
            try:
                self.run_phase(Phase.ON_LOOP_BEGIN)
                self._run_epochs()
            except JobCancelled:
                raise
            except BaseException as exc:
                self.state.exception = exc
                if isinstance(exc, Exception):
                    state = self.state
                    phase = state.phase.value if state.phase is not None else "prepare"
                    add_note(
                        exc,
                        f"asynchat: raised in {self.name} at epoch {state.epoch}, step "
                        f"{state.step} (global step {state.global_step}), phase {phase}",
                    )
                raise
            finally:
                self._control.transition(LoopStatus.STOPPING, only_from=_RUNNING)
                self.run_phase(Phase.ON_LOOP_END)

    def _run_epochs(self) -> None:
        state = self.state
        resume, self._resume = self._resume, None
        epochs_done = resume.epoch if resume is not None else 0
        while not self._reached_bound(epochs_done):
            if self._decide() is not Decision.CONTINUE:  # the epoch boundary
                return
            state.epoch = epochs_done
            state.step = resume.steps_done if resume is not None else 0
            state.epoch_complete = False
            self.run_phase(Phase.ON_EPOCH_BEGIN)
            self._events.publish(EventKind.EPOCH_BEGIN)
            steps, ran_out, decision = self._run_steps(resume)
            if decision is Decision.PEER_CANCEL:
                return  # like the cancelled rank: no on_epoch_end
            if steps == 0 and resume is None and state.num_steps and decision is Decision.CONTINUE:
                raise RuntimeError(
                    f"{self.name}: data_loader yielded no batch in epoch {state.epoch}, so "
                    f"num_steps={state.num_steps} can never be reached"
                )
            resume = None  # only the first epoch of a resumed run is a partial one
            # Only now is the epoch over for a checkpoint: one taken before on_epoch_end ran
            # (a cancellation in the last step) resumes into this epoch and runs its end then.
            state.epoch_complete = ran_out
            if ran_out:
                self._data.epoch_ended()
            self.run_phase(Phase.ON_EPOCH_END)
            self._events.publish(EventKind.EPOCH_END)
            epochs_done += 1

    def _decide(self) -> Decision:
        """The decision at a boundary (agreed by all ranks in a distributed run); a
        cancellation of this loop raises JobCancelled."""
        decision = self._control.decide()
        if self._trace and decision is not Decision.CONTINUE:
            _LOG.debug(
                "%s: decision at global_step=%d: %s",
                self.name,
                self.state.global_step,
                decision.name,
            )
        if decision is Decision.CANCEL:
            raise JobCancelled
        if decision is not Decision.CONTINUE:
            self.state.stop_reason = self._control.stop_reason
        return decision

    def _reached_bound(self, epochs_done: int) -> bool:
        state = self.state
        if state.num_epochs is not None:
            return epochs_done >= state.num_epochs
        assert state.num_steps is not None
        return state.global_step >= state.num_steps

    def _run_steps(self, resume: ResumePoint | None) -> tuple[int, bool, Decision]:
        """Run the steps of one epoch (its remaining steps when resuming); return how many ran,
        whether the epoch's data ran out (rather than ``stop()`` or ``num_steps``), and the
        decision that ended them (``CONTINUE`` when the data or ``num_steps`` did)."""
        state = self.state
        skip = resume.steps_done if resume is not None else 0
        limit = None if state.num_steps is None else state.num_steps - state.global_step
        length = None if state.steps_per_epoch is None else max(0, state.steps_per_epoch - skip)
        self._begin_epoch_data(state.epoch)
        step_rng = self._data.begin_epoch(state.epoch, self.data_loader, resume)
        steps = 0
        ran_out = False
        decision = Decision.CONTINUE
        try:
            with self._open_batches(skip_batches(self.data_loader, skip)) as batches:
                self._batches = batches
                try:
                    decision = self._decide()  # before the first step
                    if decision is not Decision.CONTINUE:
                        return 0, False, decision
                    waiting_since = time.perf_counter()
                    for staged, is_last, ends_data in with_last(batches, limit, length):
                        state.data_time = time.perf_counter() - waiting_since
                        if step_rng is not None:  # the data order is drawn: now the step's RNG
                            restore_rng(step_rng)
                            step_rng = None
                        state.step = skip + steps
                        state.is_last_step = is_last
                        state.batch = DeviceStager.take(staged)
                        if steps == 0:
                            self._batch_size = batch_size(state.batch)
                        self._run_step()
                        steps += 1
                        ran_out = ends_data
                        decision = self._decide()  # the step boundary
                        if decision is not Decision.CONTINUE:
                            break
                        waiting_since = time.perf_counter()
                    else:  # the data ended, unless the loop's num_steps did
                        ran_out = ran_out or limit is None or steps < limit
                except Interrupted:  # stop() or cancellation while waiting for data (alone)
                    decision = self._decide()
                finally:
                    self._batches = None
                    state.batch = None
        finally:
            if step_rng is not None:  # no step ran: a checkpoint must hold the step's RNG
                restore_rng(step_rng)
            self._data.step_done(state.epoch, skip + steps)
        return steps, ran_out, decision

    def _run_step(self) -> None:
        state = self.state
        self.run_phase(Phase.ON_STEP_BEGIN)
        self.batch_processor.step(state, self.run_phase)
        state.global_step += 1
        self._data.step_done(state.epoch, state.step + 1)  # a checkpoint now resumes after it
        self.run_phase(Phase.ON_STEP_END)

    def _open_batches(self, source: Iterable[Any]) -> Prefetcher[Staged] | InlineBatches[Staged]:
        if self._stager is None:  # one copy stream for the run, not one per epoch
            self._stager = DeviceStager(self.device)
        stager = self._stager
        if self.prefetch == 0:
            return InlineBatches(source, stage=stager.stage)
        return Prefetcher(
            source,
            stage=stager.stage,
            depth=self.prefetch,
            name=f"asynchat-{self.name}-data",
            # Only if a warning needs it, and short: a repr of a list of batches would print
            # every tensor (measured: +1 ms a step for 500 ready batches when built eagerly).
            label=lambda: f"{self.name}'s data_loader {reprlib.repr(self.data_loader)}",
        )


def _check_bounds(num_epochs: int | None, num_steps: int | None) -> None:
    if (num_epochs is None) == (num_steps is None):
        raise ValueError(
            "pass exactly one of num_epochs and num_steps, got "
            f"num_epochs={num_epochs!r} and num_steps={num_steps!r}"
        )
    for name, value in (("num_epochs", num_epochs), ("num_steps", num_steps)):
        if value is not None:  # exactly one is given
            positive_int(name, value)
