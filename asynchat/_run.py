"""LoopRun: one run of a loop, on its compute thread.

:class:`~asynchat.LoopBase` is the half of a loop that the event loop and other threads touch
(configuration, ``stop``/``pause``, events, ``fit``); :class:`LoopRun` is the other half, and
everything in it runs on the compute thread: the phases, the epochs and their steps, and the
decision at every boundary. It is made for one run and given the loop's collaborators (its
control, hook runner, event hub, data tracker) explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import reprlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from asynchat._async_data import AsyncBatches, is_async_source
from asynchat._compute import JobCancelled
from asynchat._control import Decision, LoopControl
from asynchat._data import (
    READ_NOTE,
    DataSource,
    EpochReads,
    Reading,
    data_length,
    is_read_once,
    reading,
    retire,
    skip_batches,
    start_workers_as_before,
    with_last,
    workers_stop_with_loader,
)
from asynchat._errors import add_note
from asynchat._events import EventHub, EventKind, LoopStatus, Throughput
from asynchat._handle import LoopHandle
from asynchat._hooks import HookRunner
from asynchat._phase import Phase
from asynchat._prefetch import DeviceStager, InlineBatches, Interrupted, Prefetcher
from asynchat._processor import BatchProcessor
from asynchat._resume import DataTracker, ResumePoint
from asynchat._step_watch import StepWatch
from asynchat._worker_seeds import seeded_per_batch

_LOG = logging.getLogger("asynchat.loop")
Batches = Prefetcher[Any] | InlineBatches | AsyncBatches  # an epoch's batch source

# How long a rank's read of data without a len() goes on waiting after a stop() or a
# cancellation before it ends as the end of the rank's data (a loop alone: at once). The
# ranks end the epoch with it; a peer's batch read ahead meanwhile is dropped, so a stream
# whose batches come sooner ends a step later with every batch trained instead.
RANK_READ_PATIENCE_S = 1.0

_RUNNING = frozenset({LoopStatus.RUNNING, LoopStatus.PAUSED})
# The phases inside a step after whose hooks the batch processor's own work goes on (the
# forward, loss and backward after on_batch_begin; the update after on_before_update...).
_IN_STEP = frozenset(
    {Phase.ON_STEP_BEGIN, Phase.ON_BATCH_BEGIN, Phase.ON_BATCH_END, Phase.ON_BEFORE_UPDATE}
)


@dataclasses.dataclass(slots=True)
class _EpochRun:
    """How one epoch's steps went: written by the step loop, read when the epoch ends."""

    skip: int  # steps of this epoch done before (a resumed epoch)
    unread: bool = False  # this rank's data has more steps than its group agreed to run
    steps: int = 0  # steps run now
    ran_out: bool = False  # the epoch's data ran out (rather than stop() or num_steps)
    decision: Decision = Decision.CONTINUE  # what ended the steps
    reads: EpochReads[Any] | None = None  # the epoch's items, as the step loop reads them


class LoopRun:
    """Runs a loop from preparation to ``on_loop_end``: :meth:`run`, on the compute thread.

    ``prepare`` gets the model, optimizer and processor ready (no hook has run yet) and
    returns where a resumed run starts; ``modes`` puts the model in the loop's train/eval
    mode for the run and every module's mode back afterwards (``asynchat._in_use``;
    gradients are on only in a training loop); ``begin_epoch_data`` prepares the data loader
    for an epoch before its order is drawn (a distributed sampler's epoch) and returns the
    epoch's steps.

    Fields, who writes them and from where:

    - ``batches``: the current epoch's batch source; set and cleared by the compute thread
      around each epoch's steps, read by :meth:`interrupt` from any thread.
    - ``stager``: the copy stream's owner, made at the first epoch (or the parent run's, for
      ``run_inline`` on the same device) and kept for the run; compute thread only.
    """

    def __init__(
        self,
        loop: LoopHandle,
        *,
        data_loader: DataSource,
        batch_processor: BatchProcessor,
        prefetch: int,
        modes: Callable[[], contextlib.AbstractContextManager[None]],
        prepare: Callable[[], ResumePoint | None],
        begin_epoch_data: Callable[[int], int | None],
        control: LoopControl,
        hooks: HookRunner,
        events: EventHub,
        data: DataTracker,
        throughput: Throughput,
        stager: DeviceStager | None = None,
    ) -> None:
        self.loop = loop
        self.state = hooks.state
        self.data_loader = data_loader
        self.batch_processor = batch_processor
        self.prefetch = prefetch
        self.modes = modes
        self.prepare = prepare
        self.begin_epoch_data = begin_epoch_data
        self.control = control
        self.hooks = hooks
        self.events = events
        self.data = data
        self.throughput = throughput
        self.stager = stager
        self.batches: Batches | None = None
        self.held_to_update = False  # said why an end waits for the accumulation window
        self.warned_no_batch = False  # said that an epoch's data yielded no batch
        self.watch: StepWatch | None = None  # the first steps, checked; then None
        self.read_once = is_read_once(data_loader)  # an item read cannot be read again

    def interrupt(self) -> None:
        """Wake the compute thread if it waits for data, so a stop or cancellation needs no
        batch. A rank of a group must run the step its peers run, then agree: only where
        they agree the epoch's end before each step (data without a ``len()``), which takes
        the read as the end of its data, and only after it has waited
        :data:`RANK_READ_PATIENCE_S` (the batch may be on its way; the peers' batches read
        meanwhile are not trained)."""
        batches, control = self.batches, self.control
        if batches is not None and (control.agree is None or control.agree_last is not None):
            batches.interrupt()

    def run(self) -> None:
        self.hooks.begin()
        batch_hooks = self.hooks.hooks[Phase.ON_BATCH_BEGIN] or self.hooks.hooks[Phase.ON_BATCH_END]
        watch = StepWatch(
            self.batch_processor, batch_hooks=bool(batch_hooks), training=self.loop.training
        )
        self.watch = None if watch.done else watch  # (nothing to watch: no step wrapped)
        with self.modes(), torch.set_grad_enabled(self.loop.training):  # grad: per thread
            resume = self.prepare()
            try:
                self.hooks.run_phase(Phase.ON_LOOP_BEGIN)
                self._run_epochs(resume)
                self.control.settle()  # the last step's agreement: every rank started it
            except JobCancelled:  # (agreed at a boundary: every rank started the last one)
                self.control.settle()
                raise
            except BaseException as exc:
                self.state.exception = exc
                self._note_where(exc)
                raise
            finally:
                self.control.transition(LoopStatus.STOPPING, only_from=_RUNNING)
                self.hooks.run_phase(Phase.ON_LOOP_END)

    def _note_where(self, exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            return
        state = self.state
        notes = getattr(exc, "__notes__", [])
        if READ_NOTE in notes:  # the data loader's: between two steps, in no phase
            notes[notes.index(READ_NOTE)] = (
                f"asynchat: raised in {self.loop.name} reading its data, in epoch "
                f"{state.epoch} after global step {state.global_step}"
            )
            return
        phase = state.phase.value if state.phase is not None else "prepare"
        where = f"phase {phase}"
        if state.phase in _IN_STEP and not self.hooks.raised_in_a_hook(exc):
            # (It said "phase on_batch_begin" of a shape error in the model's forward, as if
            # a callback's on_batch_begin had raised it.)
            processor = type(self.batch_processor).__name__
            where = f"in {processor}'s step, after the hooks of {where}"
        add_note(
            exc,
            f"asynchat: raised in {self.loop.name} at epoch {state.epoch}, step "
            f"{state.step} (global step {state.global_step}), {where}",
        )

    def _run_epochs(self, resume: ResumePoint | None) -> None:
        state = self.state
        epochs_done = resume.epoch if resume is not None else 0
        while not self._reached_bound(epochs_done):
            if self._decide() is not Decision.CONTINUE:  # the epoch boundary
                return
            state.epoch = epochs_done
            state.step = resume.steps_done if resume is not None else 0
            state.epoch_complete = False
            self.batch_processor.on_epoch_begin(state)
            self.hooks.run_phase(Phase.ON_EPOCH_BEGIN)
            self.events.publish(EventKind.EPOCH_BEGIN)
            steps, ran_out, decision = self._run_steps(resume)
            if decision is Decision.PEER_CANCEL:
                return  # like the cancelled rank: no on_epoch_end
            if steps == 0 and resume is None and decision is Decision.CONTINUE:
                self._no_batch()
            resume = None  # only the first epoch of a resumed run is a partial one
            # Only now is the epoch over for a checkpoint: one taken before on_epoch_end ran
            # (a cancellation in the last step) resumes into this epoch and runs its end then.
            state.epoch_complete = ran_out
            if ran_out:
                self.data.epoch_ended()
                if state.accumulating:
                    self._warn_window_left_open(steps)
            self.hooks.run_phase(Phase.ON_EPOCH_END)
            self.batch_processor.on_epoch_end(state)
            self.events.publish(EventKind.EPOCH_END)
            epochs_done += 1

    def _no_batch(self) -> None:
        """An epoch's data yielded no batch: with ``num_steps`` the bound is out of reach; with
        ``num_epochs`` the run goes on, said once (an empty dataset, or a filter or sampler
        that leaves nothing, would otherwise end in a run that did nothing, silently)."""
        where = f"{self.loop.name}: data_loader yielded no batch in epoch {self.state.epoch}"
        if self.state.num_steps:
            raise RuntimeError(f"{where}, so num_steps={self.state.num_steps} can never be reached")
        if not self.warned_no_batch:
            self.warned_no_batch = True
            done = "nothing was trained on" if self.state.training else "nothing ran"
            warnings.warn(
                f"{where}: {done} (is its dataset empty, or does a sampler or filter leave "
                "nothing?)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _warn_window_left_open(self, steps: int) -> None:
        """The data ran out before the step its ``len()`` promised, which would have
        updated: the last window's gradients carry into the next epoch's first update."""
        warnings.warn(
            f"{self.loop.name}: the data ran out after {steps} steps of epoch "
            f"{self.state.epoch}, whose len() promised {self.state.steps_per_epoch}: the last "
            "gradient-accumulation window was not updated at the epoch's end (its gradients "
            "carry into the next update). Give the data loader a len() that counts its "
            "batches",
            RuntimeWarning,
            stacklevel=2,
        )

    def _decide(
        self, *, window_open: bool = False, lagged: bool = False, carried: bool = False
    ) -> Decision:
        """The decision at a boundary (agreed by all ranks in a distributed run; ``lagged``,
        after a step: perhaps on the agreement of the boundary before; ``carried``: on the
        one made with the next item's read, see ``asynchat._control``); a cancellation of
        this loop raises JobCancelled. Inside an accumulation window (``window_open``) only
        a forced exit ends the loop."""
        decision = self.control.decide(window_open=window_open, lagged=lagged, carried=carried)
        if self.control.holding and not self.held_to_update:
            self.held_to_update = True
            _LOG.warning(
                "%s: ending after the gradient-accumulation window in progress (global step "
                "%d): its gradients would be lost (interrupt again to end now)",
                self.loop.name, self.state.global_step,
            )  # fmt: skip
        if self.hooks.trace and decision is not Decision.CONTINUE:
            _LOG.debug("%s: decision at global_step=%d: %s", self.loop.name,
                       self.state.global_step, decision.name)  # fmt: skip
        if decision is Decision.CANCEL:
            raise JobCancelled
        if decision is not Decision.CONTINUE:
            self.state.stop_reason = self.control.stop_reason
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
        state.steps_per_epoch = steps = self.begin_epoch_data(state.epoch)
        reader = seeded_per_batch(self.data_loader)
        loader = skip_batches(reader, skip, self.data.skipped)
        if state.epoch > 0:
            start_workers_as_before(loader)  # (a resumed run's; a run from the start has them)
        self.data.begin_epoch(state.epoch, self.data_loader, resume)
        own = None if steps is None else data_length(self.data_loader)
        epoch = _EpochRun(skip, unread=steps is not None and own is not None and own > steps)
        try:
            source = workers_stop_with_loader(loader)
            with self._open_batches(source) as batches:
                self.batches = batches
                try:
                    self._steps_of(batches, epoch)
                finally:
                    self.batches = None
                    state.batch = None
            if loader is not reader and batches.finished:
                retire(loader)  # (skip_batches's clone: this epoch's only)
        finally:
            self.data.steps_ended(state.epoch, skip + epoch.steps)
        return epoch.steps, epoch.ran_out, epoch.decision

    def _steps_of(self, batches: Batches, epoch: _EpochRun) -> None:
        """The epoch's steps over ``batches``, from the decision before the first; a stop
        that leaves items of data read once read (on some rank) runs their steps too, and
        then, where it ended a read that waited (alone), the step of the item that read
        was for if it comes in time (a stream's, taken from it as the loop stopped)."""
        interrupted = False
        try:
            epoch.decision = self._decide()  # before the first step
            if epoch.decision is Decision.CONTINUE:
                self._step_through(iter(batches), epoch)
        except Interrupted:  # stop() or cancellation while waiting for data (alone)
            interrupted = True
            epoch.decision = self._decide()
        agreed = self.control.agree_last  # (ranks: agreed, so all or none run them)
        read_once = self.read_once if agreed is None else agreed.read_once
        if epoch.decision is Decision.STOP and read_once:
            held = epoch.reads.held if epoch.reads is not None else None
            self._run_last(held or (), epoch)
            if interrupted:
                self._run_last(batches.settle(), epoch)

    def _step_through(self, batches: Iterator[Any], epoch: _EpochRun) -> None:
        """The epoch's steps, one per batch, each followed by the boundary's decision.

        The per-step path of every run: what it does for a loop alone on the CPU without
        hooks is all the engine adds to a hand-written loop (``benchmarks/paired_overhead.py``).
        """
        state, control = self.state, self.control
        take = self._take()
        limit = None if state.num_steps is None else state.num_steps - state.global_step
        length = state.steps_per_epoch
        length = None if length is None else max(0, length - epoch.skip)
        waiting_since = time.perf_counter()
        read = with_last(batches, limit, length, control.agree_last, unread=epoch.unread)
        epoch.reads = read
        for item, is_last, ends_data in read:
            if control.carried is not None:  # the boundary, agreed as the item was read
                epoch.decision = self._decide(window_open=state.accumulating, carried=True)
                if epoch.decision is not Decision.CONTINUE:
                    read.held = (item, *(read.held or ()))  # (read on every rank)
                    return
            state.data_time = time.perf_counter() - waiting_since
            self._step_on(item if take is None else take(item), is_last, epoch)
            epoch.ran_out = ends_data
            # (idle: alone and asked nothing, the boundary is a no-op; agree_last agrees it
            # with the next item's read, unless this step was the last)
            if not control.idle and (control.agree_last is None or is_last):
                epoch.decision = self._decide(window_open=state.accumulating, lagged=True)
                if epoch.decision is not Decision.CONTINUE:
                    return
            waiting_since = time.perf_counter()
        if control.carried is not None:  # agreed with a first read that found no item on
            epoch.decision = self._decide(carried=True)  # some rank (or a request ended it)
            if epoch.decision is not Decision.CONTINUE:
                return
        # The data ended, unless the loop's num_steps did.
        epoch.ran_out = epoch.ran_out or limit is None or epoch.steps < limit

    def _take(self) -> Callable[[Any], Any] | None:
        """What makes a batch read usable on the compute stream (None: it is as read)."""
        return DeviceStager.take if self.stager is not None and self.stager.moves else None

    def _step_on(self, batch: Any, is_last: bool, epoch: _EpochRun) -> None:
        state = self.state
        state.step = epoch.skip + epoch.steps
        state.is_last_step = is_last
        state.batch = batch
        if epoch.steps == 0:
            self.data.order_drawn()
            self.throughput.batch_size = self.batch_processor.samples_in(batch)
        self._run_step()
        epoch.steps += 1

    def _run_last(self, items: Sequence[Any], epoch: _EpochRun) -> None:
        """``stop()`` ended the steps with ``items`` read (data without ``len()`` is read one
        ahead) from data read once (an iterator: a stream's item read cannot be read
        again): their steps run, the last as the epoch's, rather than the items be dropped.
        A loop alone holds the item read ahead; ranks, which agree a stop as they read it,
        the item before it too (or that one only, where some rank's data ended with it),
        the same on every rank."""
        take = self._take()
        for count, item in enumerate(items, start=1):
            self.state.data_time = 0.0
            self._step_on(item if take is None else take(item), count == len(items), epoch)

    def _run_step(self) -> None:
        state, run_phase = self.state, self.hooks.run_phase
        if state.losses:
            state.losses = {}  # a new dict: a hook may still hold the last step's
        run_phase(Phase.ON_STEP_BEGIN)
        if self.watch is None:
            self.batch_processor.step(state, run_phase)
        else:
            self.watch.step(state, run_phase)
            if self.watch.done:
                self.watch = None
        self.batch_processor.end_step(state)
        state.accumulating = state.training and not self.batch_processor.update_due(state)
        state.global_step += 1
        self.data.step_done(state.epoch, state.step + 1)  # a checkpoint now resumes after it
        run_phase(Phase.ON_STEP_END)

    def _open_batches(self, source: DataSource) -> Batches:
        name = self.loop.name
        if self.stager is None:  # one copy stream for the run, not one per epoch
            self.stager = DeviceStager(self.loop.device)
        how = Reading.INLINE if self.prefetch == 0 else reading(self.data_loader, self.loop.device)
        stage = self.stager.stage if self.stager.moves else None  # (Staged items, or batches)
        # Inside an accumulation window a stop waits for the window's batches.
        interruptible = lambda: not self.state.accumulating or self.control.forcing()  # noqa: E731
        patience = 0.0 if self.control.agree is None else RANK_READ_PATIENCE_S
        if is_async_source(source):
            assert self.hooks.compute is not None
            return AsyncBatches(source, compute=self.hooks.compute, stage=stage,
                                interruptible=interruptible, patience=patience)  # fmt: skip
        assert isinstance(source, Iterable)  # (checked as the loop was made)
        if how is Reading.INLINE:
            return InlineBatches(source, stage=stage)
        return Prefetcher(
            source,
            stage=stage,
            depth=self.prefetch,
            ahead=how is Reading.AHEAD,
            name=f"asynchat-{name}-data",
            # Only if a warning needs it, and short: a repr of a list of batches would print
            # every tensor (measured: +1 ms a step for 500 ready batches when built eagerly).
            label=lambda: f"{name}'s data_loader {reprlib.repr(self.data_loader)}",
            interruptible=interruptible,
            patience=patience,
        )
