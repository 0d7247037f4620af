"""Profiler: ``torch.profiler`` over chosen steps of a loop, traced where the steps run."""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity

from asynchat._callback import Callback
from asynchat._checkpoint_io import atomic_file, temporary_for
from asynchat._checks import flag, positive_int
from asynchat._checks import path as check_path
from asynchat._errors import ProfilerError
from asynchat._handle import LoopHandle
from asynchat._mailbox import AwaitableFuture
from asynchat._state import LoopState
from asynchat.callbacks._asked import (
    answered_after_hooks,
    fail,
    how_it_ended,
    refused,
    settle,
)
from asynchat.callbacks._op_table import op_rows
from asynchat.callbacks._op_table import table as op_table
from asynchat.callbacks._writer import BackgroundWriter

_LOG = logging.getLogger("asynchat.profiler")
TABLE_ROWS = 30
"""How many ops the table written beside each trace lists (the most self time first)."""
_CLEARS_EVENTS = "Warning: Profiler clears events at the end of each cycle"  # (_start_if_due)
# torch's profiler records one session per process: two at once (loops running side by
# side, each with a Profiler) wrote no trace at all, neither of them, without an error.
_SESSION = threading.Lock()
_profiled: str | None = None  # the loop that holds _SESSION
TraceFuture = AwaitableFuture[Path]


def _take_session(name: str) -> bool:
    global _profiled
    if not _SESSION.acquire(blocking=False):
        return False
    _profiled = name
    return True


def _give_session_back() -> None:
    _SESSION.release()


class Profiler(Callback):
    """Record steps of the loop with ``torch.profiler`` and write each recorded stretch as a
    Chrome trace, with a table of the ops that took the most time beside it.

    The profiler runs on the compute thread, where the steps and the ``def`` hooks run (on
    CUDA it also records the device's kernels), so a trace shows what a step costs and
    nothing of the event loop. Its schedule counts steps from the run's first: after
    ``skip_first`` steps, each cycle skips ``wait`` steps, warms up for ``warmup`` (recorded
    and thrown away: the first steps of a recording cost more) and records ``active``;
    ``repeat`` cycles (0: until the loop ends). :meth:`request_trace` asks for a recording
    of the next steps, from any thread, while the loop runs (a service profiles a job when
    asked), and answers a future of its trace; with ``on_demand=True`` there is no
    schedule, only those. A loop that ends in the middle
    of a recording (its bound, ``stop()``, an error, a cancellation) writes what it recorded
    (if it recorded a step: not in the warm-up).

    Each recording is written by a thread the callback owns, never by the compute thread
    or the event loop (turning the recorded events into a trace takes as long as many
    steps): ``<out_dir>/<loop name>-<run id>-rank<r>-step<n>.pt.trace.json`` (the name's
    characters other than letters, digits, ``.``, ``_`` and ``-`` as ``_``; ``n``: the
    global step its recording ended at; open it in https://ui.perfetto.dev or
    ``chrome://tracing``) and ``...-step<n>.txt``, a table of the :data:`TABLE_ROWS` ops
    with the most self time (on the device on CUDA), with the figures of torch's
    ``key_averages().table()`` (grouped by input shapes with ``record_shapes``, with memory
    columns with ``profile_memory``) but made without its Python object per recorded event,
    whose garbage collections held up the event loop for 160-700 ms at a time (see
    ``benchmarks/RESULTS.md``). :attr:`traces` lists the traces written;
    one that cannot be written is warned of, and the training goes on. In a distributed
    trainer each rank that has a Profiler records its own steps and writes its own files.

    The profiler is stopped as the loop ends, however it ends: compute threads outlive their
    loops (the next loop on the device runs on the same one), and one still profiling would
    record the next loop's steps, and hold their events in memory, for good. One loop of a
    process records at a time (torch's profiler has one session per process: two loops
    side by side, each with a profiler, lost both their traces without an error); a
    recording due while another loop records is skipped, with a ``RuntimeWarning`` naming
    that loop. Its ``on_step_end`` runs after the other callbacks' (``runs_last``), so a
    step's trace holds all its hooks.

    torch's profiler library (Kineto) writes lines of its own on stderr: with torch 2.13
    ``profiler_start`` and ``profiler_stop`` at each recording and, at a process's first
    recording off its main thread, ``ERROR: External init callback must run in same thread
    as registerClient``; the traces are whole all the same. ``KINETO_LOG_LEVEL=6`` in the
    environment (set before the process's first recording) silences the first two, and
    with them Kineto's own errors (on CUDA: CUPTI's), so it is left to the user.

    Args:
        out_dir: the directory for the traces (created if missing).
        wait, warmup, active, repeat, skip_first: the schedule, in steps
            (``torch.profiler.schedule``'s); ``warmup`` and ``active`` also shape the
            recordings :meth:`request_trace` asks for.
        on_demand: record only what :meth:`request_trace` asks for (no schedule).
        record_shapes: record the shapes of each op's inputs (grouped by shape in the table).
        profile_memory: record the memory each op allocates and frees.
        with_stack: record the Python stack of each op (larger traces).
    """

    runs_last = True

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        skip_first: int = 0,
        on_demand: bool = False,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        check_path("out_dir", out_dir)
        for name, value, least in (("wait", wait, 0), ("warmup", warmup, 0),
                                   ("active", active, 1), ("repeat", repeat, 0),
                                   ("skip_first", skip_first, 0)):  # fmt: skip
            positive_int(name, value, minimum=least)
        for name, value in (("on_demand", on_demand), ("record_shapes", record_shapes),
                            ("profile_memory", profile_memory),
                            ("with_stack", with_stack)):  # fmt: skip
            flag(name, value)
        self.out_dir = Path(out_dir)
        self.wait, self.warmup, self.active = wait, warmup, active
        self.repeat, self.skip_first, self.on_demand = repeat, skip_first, on_demand
        self.options: dict[str, Any] = {
            "record_shapes": record_shapes, "profile_memory": profile_memory,
            "with_stack": with_stack,
        }  # fmt: skip
        self._writer = BackgroundWriter("asynchat-profiler-writer")
        self._profile: torch.profiler.profile | None = None  # the recording in progress
        self._traces: list[Path] = []
        self._stem = ""
        self._name = ""  # the loop's
        self._activities: list[ProfilerActivity] = []
        self._steps = 0  # steps of this run so far
        self._started_at = 0  # (of self._steps) where the recording in progress began
        self._length = 0  # its steps, warm-up included
        self._recorded: Any = None  # the recording that has just ended, for the writer
        self._step = 0  # the global step
        self._device: str | None = None  # the loop's device type, but for the CPU
        # Steps request_trace() asked for and its future, with the process's session taken
        # for them; whether a run is on (it asks only then). Both under _asking: any
        # thread asks.
        self._asked: tuple[int, TraceFuture] | None = None
        self._loop: LoopHandle | None = None  # the run's, while one runs
        self._asking = threading.Lock()
        self._promised: TraceFuture | None = None  # the asked recording's, once begun (the
        # compute thread's, then the writer's)

    @property
    def traces(self) -> list[Path]:
        """The traces written so far, oldest first (complete once the loop has ended)."""
        return list(self._traces)

    def request_trace(self, steps: int | None = None) -> AwaitableFuture[Path]:
        """Record the loop's next steps: ``warmup`` steps, then ``steps`` (``active`` by
        default) recorded and written like a scheduled recording. From any thread, while the
        loop runs (from its ``fit()`` on).

        Answers an :class:`~asynchat.AwaitableFuture` (``trace = await
        profiler.request_trace()`` on any event loop; a ``concurrent.futures.Future`` for
        threads): the trace's path once written (the table is written beside it); the
        ``OSError`` that kept it from being written; or a :class:`ProfilerError` saying why
        nothing was recorded: asked while no loop runs with the callback, while a loop of
        this process records or is asked to (this one included: torch's profiler records
        one loop at a time), or the loop ended before the recording's first step or in its
        warm-up. A refused ask is answered at once and asks nothing. Once asked, the
        process's profiling session is this loop's (a schedule's recording due meanwhile in
        another loop is skipped; a paused loop holds it until it is resumed and has
        recorded). The recording begins after the loop's hooks of the moment: waited for in
        a hook of the loop (awaited or by ``result()``), the future raises a
        ``RuntimeError`` saying so."""
        positive_int("steps", steps, allow_none=True)
        with self._asking:
            if self._loop is None:
                why = "no loop runs with it"
            elif self._asked is not None:
                why = f"{self._name} has been asked to record already"
            elif not _take_session(self._name):
                why = f"{_profiled} of this process records (one loop records at a time)"
            else:
                future: TraceFuture = answered_after_hooks(self._loop, "the recording asked for")
                self._asked = (steps if steps is not None else self.active, future)
                return future
        return refused(self._error(f"no recording asked for: {why}"))

    def record(self, steps: int | None = None) -> bool:
        """:meth:`request_trace`, answering whether it asked: True once the process's
        profiling session is this loop's for the recording, False where the future would
        be refused at once (no loop runs with the callback; a loop of this process records
        or is asked to, this one included)."""
        future = self.request_trace(steps)
        return not future.done() or future.exception() is None

    def on_loop_begin(self, state: LoopState) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"out_dir={str(self.out_dir)!r} cannot be created: {exc}") from exc
        loop = state.loop
        self._name = loop.name
        self._stem = f"{_in_a_file_name(loop.name)}-{loop.run_id[:8]}-rank{loop.rank}"
        self._activities = [ProfilerActivity.CPU]
        self._device = None
        if loop.device.type == "cuda":
            self._activities.append(ProfilerActivity.CUDA)
            self._device = loop.device.type
        self._steps, self._step = 0, state.global_step
        self._start_if_due()

    def on_step_end(self, state: LoopState) -> None:
        self._writer.raise_if_failed()
        self._steps, self._step = self._steps + 1, state.global_step
        if self._profile is not None:
            self._profile.step()
            if self._steps - self._started_at == self._length:
                self._stop()
        if self._profile is None:
            self._start_if_due()

    def on_loop_end(self, state: LoopState) -> None:
        try:
            self._stop()  # writes a recording in progress
        finally:
            self._writer.wait()  # on every way out: no write outlives the loop

    def _run_begins(self, state: LoopState) -> None:
        with self._asking:
            self._loop, self._name = state.loop, state.loop.name  # (asks from fit() on)

    def _run_ended(self, error: BaseException | None) -> None:
        with self._asking:
            self._loop = None
            asked, self._asked = self._asked, None
        if asked is not None:  # asked for, never begun: its session back (also where the
            _give_session_back()  # run failed before its on_loop_begin)
            how = how_it_ended(error)
            lost = self._error(f"the recording asked for was not made: the loop {how} first")
            lost.__cause__ = error
            fail([asked[1]], lost)

    def _error(self, message: str) -> ProfilerError:
        return ProfilerError(f"Profiler(out_dir={str(self.out_dir)!r}): {message}")

    def _start_if_due(self) -> None:
        """Start a recording if the next step is the first of one (its warm-up): one asked
        for, or the schedule's. Each recording has a profiler of its own: torch's, run over
        several cycles, warns at the second that it clears the first's events (a
        ``UserWarning`` meant for ``profile.events()``, which nobody here reads), and
        torch 2.11's at the first, as it starts: kept quiet (``acc_events=True``, which
        the warning suggests, would build the events' Python objects as it stops; the
        filter is the process's for that moment, as ``catch_warnings`` has it)."""
        with self._asking:
            asked, self._asked = self._asked, None  # (its session is taken)
        if asked is not None:
            active, self._promised = asked
        elif self._scheduled() and self._take_session():
            active = self.active
        else:
            return
        self._started_at, self._length = self._steps, self.warmup + active
        try:
            self._profile = torch.profiler.profile(
                activities=self._activities, on_trace_ready=self._ready,
                schedule=torch.profiler.schedule(
                    wait=0, warmup=self.warmup, active=active, repeat=1
                ),
                **self.options,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _CLEARS_EVENTS, UserWarning)
                self._profile.start()
        except BaseException as exc:
            self._profile = None
            _give_session_back()
            self._fail(exc)
            raise

    def _scheduled(self) -> bool:
        """Whether the schedule starts a recording with the next step."""
        cycle = self.wait + self.warmup + self.active
        since = self._steps - self.skip_first - self.wait
        if self.on_demand or since < 0 or since % cycle:
            return False
        return not self.repeat or since // cycle < self.repeat

    def _take_session(self) -> bool:
        if _take_session(self._name):
            return True
        warnings.warn(
            f"Profiler(out_dir={str(self.out_dir)!r}): the recording of {self._name}'s steps "
            f"from global step {self._step + 1} is skipped: {_profiled} of this process "
            "records, and torch's profiler records one loop at a time",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def _stop(self) -> None:
        """Stop the recording in progress, give the session back, and hand what it
        recorded to the writer (one cut short too, unless the loop ended before it recorded
        a step, in its warm-up)."""
        profile, self._profile = self._profile, None
        if profile is None:
            return
        try:
            profile.stop()
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            _give_session_back()
        recorded, self._recorded = self._recorded, None
        if recorded is None or self._steps - self._started_at <= self.warmup:
            self._fail(self._error("the loop ended in the recording's warm-up"))
            return
        step, promised = self._step, self._promised
        trace = self.out_dir / f"{self._stem}-step{step}.pt.trace.json"
        self._writer.submit(lambda: self._write(recorded, trace, step, promised))
        self._promised = None  # (the writer's now)

    def _fail(self, error: BaseException) -> None:
        """Fail the asked recording in progress, if it is one."""
        promised, self._promised = self._promised, None
        fail([promised] if promised else [], error)

    def _ready(self, profile: torch.profiler.profile) -> None:
        """A recording has ended (on the compute thread, in its last ``step()`` or in
        ``stop()``): :meth:`_stop` hands it to the writer once the session is given back."""
        self._recorded = profile.profiler

    def _write(self, recorded: Any, trace: Path, step: int, promised: TraceFuture | None) -> None:
        """On the writer thread: the trace, then the table; ``promised`` (an asked
        recording's future) is answered with either. A file that cannot be written, or a
        table that cannot be made, is warned of: the training goes on (the error of
        anything else is raised at the next step)."""
        answered = [promised] if promised is not None else []
        try:
            self._write_files(recorded, trace)
        except OSError as exc:
            warnings.warn(
                f"Profiler(out_dir={str(self.out_dir)!r}): the recording that ended at global "
                f"step {step} was not written: {exc}",
                RuntimeWarning,
                stacklevel=1,
            )
            fail(answered, exc)
            return
        except BaseException as exc:
            fail(answered, exc)
            raise
        self._traces.append(trace)
        _LOG.info("%s: profiled into %s", self._stem, trace)
        settle(answered, trace)

    def _write_files(self, recorded: Any, trace: Path) -> None:
        temporary = temporary_for(trace)  # (the exporter writes to a path of its own)
        table = trace.with_name(trace.name.removesuffix(".pt.trace.json") + ".txt")
        try:
            recorded.export_chrome_trace(str(temporary))
            os.replace(temporary, trace)
        finally:
            temporary.unlink(missing_ok=True)
        by_shapes = self.options["record_shapes"]
        try:  # (read off torch's events as this torch has them: a summary, not the trace)
            rows = op_rows(recorded.kineto_results.events(), by_shapes=by_shapes)
            text = op_table(rows, limit=TABLE_ROWS, device=self._device)
        except Exception as exc:
            warnings.warn(
                f"Profiler(out_dir={str(self.out_dir)!r}): no table of ops was made beside "
                f"{trace.name} (the trace is written): {exc!r}",
                RuntimeWarning,
                stacklevel=1,
            )
            return
        with atomic_file(table) as file:
            file.write(text.encode())


def _in_a_file_name(name: str) -> str:
    """A loop's name as part of a file name in ``out_dir``: any name is allowed, and one
    such as ``"runs/a"`` or ``"../x"`` named a file in another directory."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._")[:64] or "loop"
