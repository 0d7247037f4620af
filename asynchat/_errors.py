"""The errors asynchat raises, under one base class.

``except asynchat.AsynchatError`` catches every error the engine itself raises; errors raised
by user code (a callback, the model, the data loader) always propagate as themselves.
"""

from __future__ import annotations


class AsynchatError(Exception):
    """Base class of the errors asynchat raises."""


class CheckpointError(AsynchatError):
    """A checkpoint could not be found, read, written or used."""


class ProfilerError(AsynchatError):
    """A recording asked of a :class:`~asynchat.callbacks.Profiler` was refused or not made:
    no loop ran with it, another recording held torch's profiler, or the loop ended first."""


class InUseError(AsynchatError, RuntimeError):
    """A run refused before it began: what it needs is in use by another live run. Its
    model, callbacks, data loader or process group, by a loop running in this process; a
    directory it writes (a checkpoint directory, a logger's output), by a run in this
    process or another, whose pid the message names. A ``RuntimeError`` as well, as these
    refusals were before they had a class of their own."""


class CheckpointInUseError(CheckpointError, InUseError):
    """A checkpoint directory in use by another live ``Checkpoint`` writer: a
    :class:`CheckpointError` and an :class:`InUseError` both."""


class CheckpointWarning(UserWarning):
    """A checkpoint or manifest entry was skipped (corrupt, foreign or missing), or a
    checkpoint was saved inside a gradient-accumulation window (it lacks the window's
    gradients)."""


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (shown under its traceback) without changing the exception."""
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10 keeps the note but does not print it
        notes = getattr(exc, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            exc.__notes__ = notes
        notes.append(note)
