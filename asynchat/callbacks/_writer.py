"""BackgroundWriter: one write at a time on a thread of its own (checkpoints, traces)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundWriter:
    """Runs one write at a time on a thread of its own; the owner joins it.

    :meth:`submit` first waits for the write in flight (so at most one is), and raises the
    error of a write that failed: a failed checkpoint is never silently dropped.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Start ``write`` on the writer thread; here, if no thread can start.

        Python 3.12 refuses new threads once the interpreter shuts down, which is when the
        compute thread of a loop cut short by a second Ctrl-C saves its last checkpoint
        (``on_loop_end``): that write then happens here, before the thread ends.
        """
        self.wait()
        thread = threading.Thread(target=self._run, args=(write,), name=self.name)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown", or none left
            self._run(write)
            return
        self._thread = thread

    def raise_if_failed(self) -> None:
        """Raise the error of a write that has already failed, without waiting for one."""
        if self._error is not None:
            self.wait()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:
            self._error = exc
