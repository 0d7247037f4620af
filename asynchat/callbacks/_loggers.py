"""Loggers: TensorBoard event files and JSON Lines, fed without per-step host syncs, that
a full disk does not stop."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import itertools
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asynchat._callback import Callback
from asynchat._checkpoint_io import (
    NONBLOCK,
    DirectoryLock,
    atomic_file,
    finite,
    is_run_id,
    temporaries_of,
)
from asynchat._checks import flag, positive_int, text
from asynchat._checks import path as check_path
from asynchat._errors import InUseError
from asynchat._every import every_n_steps
from asynchat._state import LoopState
from asynchat._transfer import HostCopy
from asynchat.callbacks._monitor import measured_at
from asynchat.callbacks._stats import step_losses


class ScalarLogger(Callback):
    """Base for loggers: the step's losses every ``every_n_steps`` steps (``loss``, and
    ``loss/<name>`` for each of ``state.losses``), and each value of ``state.metrics`` once,
    at the step it was measured at (a Validation every n steps, or a MetricUpdater's interval,
    reach the log as they are published; an epoch without a validation logs no old value
    again). Metrics a resumed run restores were logged by the run that measured them.

    In a distributed run only rank 0 logs.

    A resumed run goes on from its checkpoint's step: what it logged after that step before
    (it crashed, or was killed, after the checkpoint) is dropped from the log before it logs
    those steps again, so the log reads as one uninterrupted run. That happens when it
    first writes to the log: a run that logged nothing (refused at its begin, or failed at
    its first step) changed nothing. A log is one run's while it runs: a second live logger
    on it (this process or another) is refused at its loop's begin.

    The loss is brought to the host with a non-blocking copy started on the compute thread and
    written once it has landed (checked without blocking at later steps, and waited for at
    the end of each epoch), so logging costs no host/device sync per step. Subclasses
    implement :meth:`write` and :meth:`close`.
    """

    def __init__(self, *, every_n_steps: int = 10, prefix: str = "train/") -> None:
        positive_int("every_n_steps", every_n_steps)
        text("prefix", prefix)
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._pending: list[tuple[int, HostCopy[dict[str, torch.Tensor]]]] = []
        self._logged: dict[str, int] = {}  # metric -> the step of its last value logged
        self._version = -1  # of state.metrics when last looked at
        self._open = False  # between on_loop_begin and on_loop_end, on rank 0
        self._held: DirectoryLock | None = None  # the output's, while it is open

    def write(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Hand what :meth:`write` wrote to the operating system (at each checkpoint)."""

    def files(self) -> list[Path]:
        """The files :meth:`write` writes, synced to disk with each checkpoint (after
        :meth:`flush`, on the checkpoint's writer thread)."""
        return []

    def _lock(self, directory: Path, name: str, subject: str) -> DirectoryLock:
        """The lock of this logger's output (``directory/name``), taken: a second live
        logger there, in this process or another, is refused before it writes a line."""
        directory.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(
            directory, name=name, subject=f"{type(self).__name__}({subject})",
            writer="logger",
            in_use="two runs logging there would mix their lines, and a resumed one drops "
            "what is logged after its checkpoint's step, the other run's lines too. Give "
            "each run a log of its own",
            refused=InUseError, error=RuntimeError,
        )  # fmt: skip
        lock.acquire()
        return lock

    def close(self) -> None:
        """Flush and close the output (on the compute thread, at ``on_loop_end``)."""

    def _output_removed(self) -> bool:
        """Whether the output this logger writes was removed (or replaced) under it."""
        return False

    def _reopen(self) -> None:
        """Open the output anew at its path, after it was removed (:meth:`_follow`)."""

    def _follow(self) -> None:
        """At each flush: an output removed under the live run (by hand; its directory with
        it) is opened anew at its path, with a warning. Else the rest of the run's values
        went into a file that no longer had a name, lost without a word."""
        held = self._held
        if held is None or not self._output_removed():
            return
        directory_gone = not held.directory.is_dir()
        held.check()  # the directory made again (with its warning), the lock taken again
        held.directory.mkdir(parents=True, exist_ok=True)  # (where there is no flock too)
        self._reopen()
        if not directory_gone:
            warnings.warn(
                f"{held.subject}: the log was removed while this run wrote it; a new one "
                "is begun at its path (what the removed one held is gone)",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_loop_begin(self, state: LoopState) -> None:
        # What is there already (restored by a resume) was logged when it was measured.
        metrics = state.metrics
        self._logged = {name: measured_at(state, name) for name in metrics}
        self._version = metrics.version
        self._open = state.loop.is_rank_zero

    def on_step_end(self, state: LoopState) -> None:
        if not state.loop.is_rank_zero:
            return
        if every_n_steps(state, self.every_n_steps):
            losses = step_losses(state)
            if losses:
                self._pending.append((state.global_step, HostCopy(losses)))
        self._flush(wait=False)
        self._write_new_metrics(state)

    def on_epoch_end(self, state: LoopState) -> None:
        if not state.loop.is_rank_zero:
            return
        self._follow()
        self._flush(wait=True)
        self._write_new_metrics(state)

    def _write_new_metrics(self, state: LoopState) -> None:
        metrics = state.metrics
        if metrics.version == self._version:  # the common case at a step: nothing new
            return
        self._version = metrics.version
        new: dict[int, dict[str, float]] = {}
        for name, value in metrics.items():
            step = measured_at(state, name)
            if self._logged.get(name, -1) < step:
                self._logged[name] = step
                new.setdefault(step, {})[name] = float(value)
        for step in sorted(new):
            self.write(step, new[step])

    def on_checkpoint(self, state: LoopState) -> list[Path]:
        # The log holds every value of the steps the checkpoint holds: a resumed run logs
        # from the step after it, and assumes the values it restores were logged. Hooks
        # listed after this logger may have published metrics at this phase, and the last
        # losses may still be copying: waited for here, as the checkpoint's snapshot waits.
        # The Checkpoint syncs the files to disk before it writes (a machine crash too).
        if not self._open:
            return []
        self._follow()
        self._flush(wait=True)
        self._write_new_metrics(state)
        self.flush()
        return self.files()

    def on_loop_end(self, state: LoopState) -> None:
        try:
            self._flush(wait=True)
        finally:
            self._open = False
            try:
                self.close()
            finally:
                held, self._held = self._held, None
                if held is not None:
                    held.release()

    def _flush(self, *, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][1].ready()):
            step, copy = self._pending.pop(0)
            self.write(step, {self.prefix + k: float(v) for k, v in copy.wait().items()})


#: A log's waiting records are written once this many bytes wait (and at each flush).
_CHUNK = 8192
#: While a log's file takes no writes, at most this much of it waits in memory; the records
#: logged beyond it are dropped (and counted), so a disk full for days costs no more memory.
_MAX_WAITING = 64 << 20


class _LogFile:
    """A log file records are appended to, written in chunks from the loop's compute thread.

    Records wait in memory until written. A write that fails (a full disk) does not end the
    training: the records wait on and are written once the file takes them again, with a
    ``RuntimeWarning`` when the writes begin to fail and one when they succeed again. A
    write may take part of what waits; the rest follows it, so a record cut by a full disk
    is completed later. At most ``max_waiting`` bytes wait: later records are dropped,
    counted, until the file takes writes again.

    The file is opened at the first write (or :meth:`open`): ``before_open`` runs first
    (a resumed run's trim of the lines it logs again), and ``prologue`` is written first
    (an event file's header), so that a run that wrote no record changed nothing.
    """

    def __init__(
        self,
        path: Path,
        owner: str,
        *,
        before_open: Callable[[], None] | None = None,
        prologue: bytes = b"",
    ) -> None:
        self.path, self.owner = path, owner
        self._before_open, self._prologue = before_open, prologue
        self._file: io.FileIO | None = None  # unbuffered: what it took is known
        self._unwritten = bytearray()
        self._sizes: collections.deque[int] = collections.deque()  # of the records waiting
        self._cut = 0  # bytes of the first waiting record already written
        self._failing: OSError | None = None  # while writes fail: the last one's error
        self._dropped = 0  # records dropped since the writes began to fail
        self.max_waiting = _MAX_WAITING

    def append(self, record: bytes) -> None:
        if len(self._unwritten) + len(record) > self.max_waiting:
            if not self._dropped:
                self._warn(f"{len(self._unwritten)} bytes of the log wait to be written; the "
                           "values logged from now on are dropped until it takes writes "
                           "again")  # fmt: skip
            self._dropped += 1
            return
        self._unwritten += record
        self._sizes.append(len(record))
        if len(self._unwritten) >= _CHUNK:
            self.write_out()

    def open(self) -> None:
        """Open the file, after ``before_open`` (retried at the next write if either fails),
        with the prologue to be written first."""
        if self._before_open is not None:
            self._before_open()
            self._before_open = None
        self._file = _open_to_append(self.path, self.owner)
        if self._prologue:
            self._unwritten[:0] = self._prologue
            self._sizes.appendleft(len(self._prologue))
            self._prologue = b""

    def write_out(self) -> None:
        """Write what waits, as far as the file takes it."""
        while self._unwritten:
            try:
                if self._file is None:
                    self.open()
                    assert self._file is not None
                written = self._file.write(self._unwritten)
                if not written:  # (a regular file takes some or raises; never loop on none)
                    raise OSError(f"the file took none of {len(self._unwritten)} bytes")
            except OSError as exc:
                if self._failing is None:
                    self._warn(f"cannot write the log ({exc}); its values are kept in memory "
                               "and written when it takes them again")  # fmt: skip
                self._failing = exc
                return
            del self._unwritten[:written]
            self._cut += written
            while self._sizes and self._cut >= self._sizes[0]:
                self._cut -= self._sizes.popleft()
        if self._failing is not None:
            dropped, self._failing, self._dropped = self._dropped, None, 0
            lost = f"{dropped} record(s) were dropped meanwhile" if dropped else "no value was lost"
            self._warn(f"the log is written again; {lost}")

    def removed(self) -> bool:
        """Whether the file was removed (or replaced) under this writer; before its first
        write, whether its directory was (where it would be made)."""
        if self._file is None:
            return not self.path.parent.is_dir()
        try:
            return not os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return True

    def moved_to(self, path: Path, *, prologue: bytes = b"") -> _LogFile:
        """This log's waiting records, now to be written to a new file at ``path`` (this one
        was removed); a record cut short by a failed write went with the removed file."""
        if self._file is not None:
            self._file.close()
        moved = _LogFile(path, self.owner, prologue=prologue)
        dropped = self._dropped
        if self._cut:
            del self._unwritten[: self._sizes.popleft() - self._cut]
            dropped += 1
        moved._unwritten, moved._sizes = self._unwritten, self._sizes
        moved._failing, moved._dropped = self._failing, dropped
        moved.max_waiting = self.max_waiting
        return moved

    def close(self) -> None:
        """Write what waits and close; what cannot be written is lost, with a warning."""
        try:
            self.write_out()
            if self._sizes or self._dropped:
                lost = len(self._sizes) + self._dropped
                self._warn(f"its last {lost} record(s) could not be written before the loop "
                           f"ended, and are lost ({self._failing})")  # fmt: skip
        finally:
            if self._file is not None:
                self._file.close()

    def _warn(self, what: str) -> None:
        warnings.warn(f"{self.owner}: {what}", RuntimeWarning, stacklevel=4)


def _open_to_append(path: Path, owner: str) -> io.FileIO:
    """``path`` opened to append to, created if need be. A FIFO no process reads is refused
    at once (an open to write waits for a reader, forever)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        raise RuntimeError(
            f"{owner}: {path} is a FIFO that no process reads; start its reader first"
        ) from None
    if NONBLOCK:
        os.set_blocking(fd, True)  # (a stream's writes wait for its reader, as a file's do)
    return io.FileIO(fd, "ab")


class _FileLogger(ScalarLogger):
    """A logger whose records go to a :class:`_LogFile`, written out at each epoch's end and
    checkpoint. On rank 0 the subclass takes its output at ``on_loop_begin`` (:meth:`_take`:
    the lock, refusing a live run's log, and the log, opened at its first write: a run that
    wrote nothing, refused at its begin or failed at its first step, changed nothing), and
    says how to begin anew where the log was removed (:meth:`_reopen`)."""

    def __init__(self, *, every_n_steps: int, prefix: str, overwrite: bool) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix)
        flag("overwrite", overwrite)
        self.overwrite = overwrite
        self._log: _LogFile | None = None
        self._run = ""  # the loop's run_id, while it runs

    def on_loop_begin(self, state: LoopState) -> None:
        super().on_loop_begin(state)
        self._run = state.loop.run_id
        if state.loop.is_rank_zero:
            self._log = self._take(state)

    def _take(self, state: LoopState) -> _LogFile:
        """The output's lock taken, and its log, on rank 0 at the loop's begin."""
        raise NotImplementedError

    def _logged_again_from(self, state: LoopState) -> int | None:
        """The first step whose values this run logs again, so that what the log holds of
        it and later steps goes: a resumed run's first step; with ``overwrite``, a fresh
        run's step 0 (all of it); otherwise, for a fresh run, none (it appends)."""
        if state.global_step:
            return state.global_step + 1
        return 0 if self.overwrite else None

    def _output_removed(self) -> bool:
        return self._log is not None and self._log.removed()

    def on_epoch_end(self, state: LoopState) -> None:
        super().on_epoch_end(state)
        if self._log is not None:
            self.flush()

    def flush(self) -> None:
        assert self._log is not None
        self._log.write_out()

    def close(self) -> None:
        if self._log is not None:
            log, self._log = self._log, None
            log.close()


# A TensorBoard log directory's lock (another name than a Checkpoint's: both may share one).
_LOG_LOCK = ".asynchat-log.lock"
_EVENT_FILES = itertools.count()


class TensorBoardLogger(_FileLogger):
    """Writes scalars to TensorBoard event files in ``log_dir``.

    Writes the event files itself, as :class:`JSONLinesLogger` writes its lines (in chunks
    of 8 KiB, and at each epoch's end and checkpoint; a write that fails, on a full disk,
    does not end the training: see there), in TensorBoard's format (needs the
    ``tensorboard`` package). A resumed run's event file makes TensorBoard drop what the
    earlier files hold for the steps it logs again; with ``overwrite=True`` a fresh run's
    makes it drop every step of the earlier runs there (once the log is this run's: never
    a live run's). Without it, a fresh run's values are shown beside the earlier runs'.
    An event file's name ends in its run's :attr:`~asynchat.LoopHandle.run_id`; as
    TensorBoard shows a directory as one run, a resume hides another run's steps after its
    checkpoint's too, and a ``UserWarning`` names that run (its files keep them).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        every_n_steps: int = 10,
        prefix: str = "train/",
        overwrite: bool = False,
    ) -> None:
        check_path("log_dir", log_dir)
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise ValueError(f"log_dir={os.fspath(log_dir)!r} is a file, not a directory")
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, overwrite=overwrite)
        self.log_dir = Path(log_dir)

    def _take(self, state: LoopState) -> _LogFile:
        self._held = self._lock(self.log_dir, _LOG_LOCK, f"log_dir={str(self.log_dir)!r}")
        # Resumed (from a checkpoint at global_step), or begun anew: TensorBoard drops
        # what the event files hold for the steps this run logs again.
        step = state.global_step
        warn = functools.partial(self._warn_of_other_runs, step) if step else None
        return _LogFile(
            self._event_file(), self._held.subject, before_open=warn,
            prologue=self._prologue(purge=self._logged_again_from(state)),
        )  # fmt: skip

    def _event_file(self) -> Path:
        """A new event file's path, ending in the run's id. TensorBoard reads a directory's
        files in the order of their names, and a resumed run's purge acts on the files
        before its own: the process and the count are zero-padded, so that names of one
        second sort as they were made (a count of 10 sorted before one of 9, and TensorBoard
        showed the resumed run's steps before the ones it had replaced)."""
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        return self.log_dir / f"{name}.{os.getpid():07d}.{next(_EVENT_FILES):06d}.{self._run}"

    def _warn_of_other_runs(self, step: int) -> None:
        """TensorBoard shows a directory as one run: a resumed run's purge hides what every
        earlier event file holds of the steps it logs again, another run's too (a fresh run
        that logged there meanwhile). Said, naming them; their files keep those steps."""
        others = sorted({run for run in map(_run_of, self.files()) if run not in ("", self._run)})
        if others:
            warnings.warn(
                f"{type(self).__name__}(log_dir={str(self.log_dir)!r}) holds the event files "
                f"of another run ({', '.join(others)}): TensorBoard shows a directory as one "
                f"run, and this resumed run hides any of their steps after {step} there (their "
                "files keep them). Give each run a log_dir of its own",
                UserWarning,
                stacklevel=2,
            )

    def _prologue(self, purge: int | None = None) -> bytes:
        """What an event file begins with: its version, and where this run's steps begin."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        records = self._record(Event(step=purge or 0, file_version="brain.Event:2"))
        if purge is not None:
            records += self._record(
                Event(step=purge, session_log=SessionLog(status=SessionLog.START))
            )
        return records

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._follow()
        values = [Summary.Value(tag=name, simple_value=value) for name, value in scalars.items()]
        assert self._log is not None
        self._log.append(self._record(Event(step=step, summary=Summary(value=values))))

    @staticmethod
    def _record(event: Any) -> bytes:
        from tensorboard.summary.writer.record_writer import RecordWriter

        event.wall_time = time.time()
        record = io.BytesIO()
        RecordWriter(record).write(event.SerializeToString())
        return record.getvalue()

    def _reopen(self) -> None:
        assert self._log is not None
        self._log = self._log.moved_to(self._event_file(), prologue=self._prologue())

    def files(self) -> list[Path]:
        # This run's event files and any earlier run's (synced already: costs nothing).
        return sorted(self.log_dir.glob("events.out.tfevents.*"))


class JSONLinesLogger(_FileLogger):
    """Appends one JSON object per log to ``path``.

    Each line is like ``{"step": 10, "time": 1764150000.0, "run": "3f9c...", "train/loss":
    0.25}``, strict JSON: ``run`` is the loop's :attr:`~asynchat.LoopHandle.run_id` (the
    same across its resumes), and a value that is not finite (a diverged loss's NaN or inf)
    is ``null``, as JavaScript's ``JSON.stringify`` writes it (JSON has no such numbers, and
    most parsers refuse Python's ``NaN``; :class:`TensorBoardLogger` keeps them). A line a
    killed process left half-written is dropped when the next run opens the file; a
    resumed run drops its own lines of steps after its checkpoint's (see
    :class:`ScalarLogger`), and keeps another run's (a fresh run that appended meanwhile).
    A fresh run appends, or with ``overwrite=True`` drops every line of a step first (once
    the log is this run's: never a live run's lines).

    Lines are written in chunks of 8 KiB, and at each epoch's end and checkpoint, from the
    compute thread (a write into the operating system's cache). A write that fails (a full
    disk) does not end the training: the lines are kept in memory and written once the file
    takes them again, with a ``RuntimeWarning`` when the writes begin to fail and one when
    they succeed again; lines still unwritten when the loop ends are lost, and a last
    warning says how many.

    ``path`` may also be a stream, written as it comes: ``/dev/stdout`` (to pipe the lines
    into ``jq``, or wherever the shell sends it), a terminal or a FIFO (whose reader must
    be there first). A stream is neither locked, trimmed on a resume, nor synced with a
    checkpoint.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every_n_steps: int = 10,
        prefix: str = "train/",
        overwrite: bool = False,
    ) -> None:
        check_path("path", path)
        if os.path.isdir(path):
            raise ValueError(
                f"path={os.fspath(path)!r} is a directory: the log is one file (such as "
                f"{os.path.join(os.fspath(path), 'log.jsonl')!r})"
            )
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, overwrite=overwrite)
        self.path = Path(path)
        self._stream = False  # (decided at each loop's begin)
        self._renamed: set[str] = set()  # metrics written under another key (warned once)

    def _take(self, state: LoopState) -> _LogFile:
        subject = f"path={str(self.path)!r}"
        self._stream = self._is_stream()
        if self._stream:  # opened now (a FIFO without a reader is refused), never trimmed
            log = _LogFile(self.path, f"{type(self).__name__}({subject})")
            log.open()
            return log
        self._held = self._lock(self.path.parent, f".{self.path.name}.lock", subject)
        # At the first write: a resumed run drops its own lines of the steps it logs again
        # (not another run's); a fresh one with overwrite, every line.
        trim = functools.partial(
            _trim, self.path, dropped_from=self._logged_again_from(state),
            run=self._run if state.global_step else None,
        )  # fmt: skip
        return _LogFile(self.path, self._held.subject, before_open=trim)

    def _is_stream(self) -> bool:
        """Whether ``path`` is there and no regular file (a FIFO, a terminal), or one of
        the process's own streams (``/dev/stdout`` redirected to a file: that file is the
        shell's, never rewritten nor replaced here)."""
        path = self.path
        return path.exists() and (
            not path.is_file() or Path(os.path.abspath(path)).parent in _STREAM_DIRECTORIES
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        assert self._log is not None
        record: dict[str, Any] = {"step": step, "time": time.time(), "run": self._run}
        for name, value in scalars.items():
            record[self._key(name)] = value if finite(value) else None
        line = json.dumps(record, allow_nan=False)
        self._log.append(f"{line}\n".encode())

    def _key(self, name: str) -> str:
        """A metric's key in the line: its name, but ``metric/<name>`` for one named as a
        line's own keys (a metric "step" replaced the line's step: the log lost it, and a
        resume's trim took the line for another's)."""
        if name not in _LINE_KEYS:
            return name
        if name not in self._renamed:
            self._renamed.add(name)
            warnings.warn(
                f"{type(self).__name__}(path={str(self.path)!r}): the metric {name!r} is "
                f"written as 'metric/{name}' ({', '.join(_LINE_KEYS)} are the line's own)",
                UserWarning,
                stacklevel=4,
            )
        return f"metric/{name}"

    def _reopen(self) -> None:
        assert self._log is not None
        self._log = self._log.moved_to(self.path)

    def files(self) -> list[Path]:
        return [] if self._stream else [self.path]


def _run_of(event_file: Path) -> str:
    """The run id an event file's name ends in ("" for one an older version named)."""
    last = event_file.name.rsplit(".", 1)[-1]
    return last if is_run_id(last) else ""


#: How each line this logger writes begins (an older version's too): its step, read
#: without parsing the line.
_OWN_LINE = re.compile(rb'\{"step": (\d+), "time": ')
#: The keys of a JSON line that are the logger's own.
_LINE_KEYS = ("step", "time", "run")

_STREAM_DIRECTORIES = (Path("/dev"), Path("/dev/fd"), Path("/proc/self/fd"))


def _remove_dead_trims(path: Path) -> None:
    """Remove the temporary files of trims of ``path`` whose process is gone (a kill while
    it wrote one left ``.log.jsonl.<pid>-<hex>.tmp`` beside the log, for good). A live
    process's, or one whose pid is in use again, is left: it may be writing it."""
    own = temporaries_of(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        found = own.fullmatch(name)
        if found is None or _alive(int(found[1])):
            continue
        with contextlib.suppress(OSError):
            leftover = path.parent / name
            if not leftover.is_symlink() and leftover.is_file():
                leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (gone; a pid no process can have)
        return False
    except PermissionError:  # (another user's)
        return True
    return True


def _trim(path: Path, *, dropped_from: int | None, run: str | None) -> None:
    """Drop a last line without its newline (a write cut short by a kill) and, with
    ``dropped_from``, the lines of that step and later: of run ``run`` and of no run (lines
    an older version wrote), or of any run where ``run`` is None. Rewritten atomically,
    only if anything goes.

    A log that is a link (to a shared disk, say) is rewritten where it points, and stays a
    link: before, the link was replaced by a file of its own, and the file it pointed to got
    no line more."""
    path = path.resolve()
    _remove_dead_trims(path)

    def goes(line: bytes) -> bool:
        return not line.endswith(b"\n") or _dropped(line, dropped_from, run)

    try:
        with path.open("rb") as file:  # read line by line: a log may be gigabytes
            if dropped_from is None and not _cut_at_its_end(file):
                return  # (a fresh run that appends: its end alone is read)
            if not any(goes(line) for line in file):
                return
            file.seek(0)
            # (its mode and owner kept: a private log was made 0644, and root's under root)
            with atomic_file(path, like=os.fstat(file.fileno())) as trimmed:
                trimmed.writelines(line for line in file if not goes(line))
    except FileNotFoundError:
        return


def _cut_at_its_end(file: io.BufferedReader) -> bool:
    """Whether the file's last line lacks its newline (a write cut short by a kill)."""
    size, cut = file.seek(0, os.SEEK_END), False
    if size:
        file.seek(size - 1)
        cut = file.read(1) != b"\n"
    file.seek(0)
    return cut


def _dropped(line: bytes, dropped_from: int | None, run: str | None) -> bool:
    """Whether ``line`` logs step ``dropped_from`` or a later one, of ``run`` (see
    :func:`_trim`; a line that is no such log stays: every line a logger wrote has a
    ``step`` and a ``time``, and a file's own lines with a ``step`` alone, a dataset's
    given as the log's path by mistake, were dropped too)."""
    if dropped_from is None:
        return False
    written = _OWN_LINE.match(line)  # (most lines: kept unparsed, 3.9 s for a million before)
    if written is not None and int(written[1]) < dropped_from:
        return False
    try:
        record = json.loads(line)
        step, time_, its_run = record.get("step"), record.get("time"), record.get("run")
    except (ValueError, AttributeError, RecursionError):
        return False
    if run is not None and its_run is not None and its_run != run:
        return False
    logged = isinstance(step, int) and isinstance(time_, (int, float))
    return logged and step >= dropped_from
