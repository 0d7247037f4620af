"""Loggers: TensorBoard event files and JSON Lines, fed without per-step host syncs."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from asynchat._callback import Callback
from asynchat._checkpoint_io import DirectoryLock, atomic_write
from asynchat._checks import positive_int
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

    A resumed run goes on from its checkpoint's step: what an earlier run logged after that
    step (it crashed, or was killed, after the checkpoint) is dropped from the log before
    the resumed run logs those steps again, so the log reads as one uninterrupted run. So
    a log is one run's while it runs: a second live logger on it (this process or another)
    is refused at its loop's begin.

    The loss is brought to the host with a non-blocking copy started on the compute thread and
    written once it has landed (checked without blocking at later steps, and waited for at
    the end of each epoch), so logging costs no host/device sync per step. Subclasses
    implement :meth:`write` and :meth:`close`.
    """

    def __init__(self, *, every_n_steps: int = 10, prefix: str = "train/") -> None:
        positive_int("every_n_steps", every_n_steps)
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
            error=RuntimeError,
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


# A TensorBoard log directory's lock (another name than a Checkpoint's: both may share one).
_LOG_LOCK = ".asynchat-log.lock"


class TensorBoardLogger(ScalarLogger):
    """Writes scalars to TensorBoard event files in ``log_dir``.

    Uses ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package), whose
    own thread writes the event files, so neither the event loop nor the compute thread waits
    on the disk.
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, every_n_steps: int = 10, prefix: str = "train/"
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix)
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_loop_begin(self, state: LoopState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().on_loop_begin(state)
        if state.loop.is_rank_zero:
            self._held = self._lock(self.log_dir, _LOG_LOCK, f"log_dir={str(self.log_dir)!r}")
            # Resumed (from a checkpoint at global_step): TensorBoard drops what the event
            # files hold for later steps, which this run logs again.
            purge = state.global_step + 1 if state.global_step else None
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._follow()  # (its writer fails, here or on its thread, in a directory removed)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def _output_removed(self) -> bool:
        # The writer opens its event file by name at each write: a directory made again is
        # enough, and the file is begun anew there.
        return self._writer is not None and not self.log_dir.is_dir()

    def flush(self) -> None:
        self._writer.flush()  # waits for the writer's thread to write the event file

    def files(self) -> list[Path]:
        # This run's event file and any earlier run's (synced already: costs nothing).
        return sorted(self.log_dir.glob("events.out.tfevents.*"))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class JSONLinesLogger(ScalarLogger):
    """Appends one JSON object per log to ``path``.

    Each line is like ``{"step": 10, "time": 1764150000.0, "train/loss": 0.25}``. A line a
    killed process left half-written is dropped when the next run opens the file; a
    resumed run drops the lines of steps after its checkpoint's (see
    :class:`ScalarLogger`).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, every_n_steps: int = 10, prefix: str = "train/"
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix)
        self.path = Path(path)
        self._file: IO[str] | None = None

    def on_loop_begin(self, state: LoopState) -> None:
        super().on_loop_begin(state)
        if state.loop.is_rank_zero:
            lock = f".{self.path.name}.lock"
            self._held = self._lock(self.path.parent, lock, f"path={str(self.path)!r}")
            if self.path.exists():
                _trim(self.path, after=state.global_step if state.global_step else None)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        assert self._file is not None
        self._file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")

    def _output_removed(self) -> bool:
        if self._file is None:
            return False
        try:
            return not os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return True

    def _reopen(self) -> None:
        self.close()  # (the file without a name)
        self._file = self.path.open("a", encoding="utf-8")

    def on_epoch_end(self, state: LoopState) -> None:
        super().on_epoch_end(state)
        if self._file is not None:
            self.flush()

    def flush(self) -> None:
        assert self._file is not None
        self._file.flush()

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _trim(path: Path, *, after: int | None) -> None:
    """Drop a last line without its newline (a write cut short by a kill) and, with
    ``after``, the lines of later steps; rewritten atomically, only if anything goes."""
    with path.open("rb") as file:
        lines = file.read().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith(b"\n") and not _later(line, after)]
    if len(kept) < len(lines):
        atomic_write(path, b"".join(kept))


def _later(line: bytes, after: int | None) -> bool:
    """Whether ``line`` logs a step after ``after`` (a line that is not such a log stays)."""
    if after is None:
        return False
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return False
    return isinstance(step, int) and step > after
