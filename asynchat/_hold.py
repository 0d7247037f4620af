"""Ctrl-Z on a launched job: every loop of every rank held while the launcher is stopped.

A terminal's Ctrl-Z (SIGTSTP) reaches the launcher alone, since the ranks have process groups
of their own (``_launch._prepare_rank``); the ranks trained on while the launcher was stopped.
Stopping them too is no answer: a rank stopped inside a collective may fail it once
continued, its timeout past. So the launcher passes SIGTSTP on to each rank, whose running
loops then hold at their next step boundary as under ``pause()`` (compute threads idle, the
ranks agreeing the hold as for any pause), stops itself, and once continued (``fg``, ``bg``)
passes SIGCONT on, which lets go of the loops it held. A loop that starts while its rank is
held starts held. The handlers are installed in launched ranks only
(:func:`hold_on_sigtstp`); every loop registers its run here (:func:`running`), which costs a
set insertion per ``fit()``.

The handlers run in the rank's main thread, between two bytecodes of whatever it was doing:
no lock is taken here (one held by the interrupted code would never be released), and
``pause()``/``resume()`` are safe there (see ``LoopBase.stop``).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any, Protocol

from asynchat._events import LoopStatus


class _Loop(Protocol):
    @property
    def status(self) -> LoopStatus: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


_running: set[_Loop] = set()  # the loops running in this process
_held: list[_Loop] = []  # those the last SIGTSTP held (not those paused by their owners)
_holding = False  # between a SIGTSTP and the next SIGCONT


@contextlib.contextmanager
def running(loop: _Loop) -> Iterator[None]:
    """Around a loop's run: a SIGTSTP holds it; one that came already holds it at once."""
    _running.add(loop)
    if _holding:
        _hold(loop)
    try:
        yield
    finally:
        _running.discard(loop)


def hold_on_sigtstp() -> None:
    """In a launched rank: hold its loops on SIGTSTP and let go of them on SIGCONT."""
    signal.signal(signal.SIGTSTP, _hold_all)
    signal.signal(signal.SIGCONT, _let_go)


def _hold(loop: _Loop) -> None:
    if loop.status is not LoopStatus.PAUSED:  # (a loop its owner paused stays the owner's)
        _held.append(loop)
        loop.pause()
        if not _holding:  # a SIGCONT came in between (from running()): let go of it too
            _let_go(signal.SIGCONT, None)


def _hold_all(signum: int, frame: Any) -> None:
    global _holding
    _holding = True
    for loop in list(_running):
        if loop not in _held:
            _hold(loop)


def _let_go(signum: int, frame: Any) -> None:
    global _holding
    _holding = False
    held = list(_held)
    _held.clear()
    for loop in held:
        loop.resume()
