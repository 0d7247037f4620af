"""The capture gate: asynchat's own threads keep their CUDA work out of a graph capture.

CUDA allows one graph capture at a time in a process, and work some other thread does
while a capture is underway (a pinned allocation, an event query) can invalidate it. The
threads that stage batches (a loop's data thread) enter :meth:`CaptureGate.work` around
their CUDA work; a capturing compute thread holds :meth:`CaptureGate.capturing`, which
waits for the work in progress to end and holds new work until the capture is over.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class CaptureGate:
    """One per process (:data:`GATE`): captures one at a time, staging held during one."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._one_capture = threading.Lock()
        self._capturing = False
        self._working = 0

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """Around CUDA work of a thread that does not capture: waits out a capture."""
        with self._condition:
            while self._capturing:
                self._condition.wait()
            self._working += 1
        try:
            yield
        finally:
            with self._condition:
                self._working -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """For a capture: once the gated work in progress has ended, hold new work."""
        with self._one_capture:
            with self._condition:
                self._capturing = True
                while self._working:
                    self._condition.wait()
            try:
                yield
            finally:
                with self._condition:
                    self._capturing = False
                    self._condition.notify_all()


GATE = CaptureGate()
