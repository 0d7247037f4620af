"""The errors asynchat raises, under one base class.

``except asynchat.AsynchatError`` catches every error the engine itself raises; errors raised
by user code (a callback, the model, the data loader) always propagate as themselves.
"""

from __future__ import annotations


class AsynchatError(Exception):
    """Base class of the errors asynchat raises."""


class CheckpointError(AsynchatError):
    """A checkpoint could not be found, read, written or used."""


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
