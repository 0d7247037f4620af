"""Opt-in: turn SIGINT, SIGTERM and SIGHUP into a graceful stop of running loops."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from asynchat._loop import LoopBase


def ending_signals() -> tuple[signal.Signals, ...]:
    """The signals that would end this process: SIGINT (Ctrl-C), SIGTERM (``kill``,
    ``timeout``, a pod's end) and SIGHUP (the terminal closed: an ssh session ended under a
    job run without ``nohup`` or tmux), each unless this process ignores it: a process that
    ignores one was asked to (``nohup`` ignores SIGHUP, for the job to outlive its terminal;
    a shell ignores SIGINT in what a script starts in the background, ``cmd &``, for the
    terminal's Ctrl-C not to end it), and a launched job ignores it as one process would.
    SIGHUP also not where the program handles it itself (a daemon's reload or log
    rotation)."""
    ending = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
        ending.append(signal.SIGHUP)  # (SIGHUP: POSIX only)
    return tuple(ending)


@contextlib.asynccontextmanager
async def stop_on_signals(
    *loops: LoopBase, signals: tuple[signal.Signals, ...] | None = None
) -> AsyncIterator[None]:
    """Inside this block, SIGINT, SIGTERM and SIGHUP ``stop()`` the given loops instead of
    killing the process (``signals``: by default those of :func:`ending_signals`, each only
    where it would end the process: not one the process ignores, as SIGHUP under ``nohup``
    and SIGINT in a script's background job, nor SIGHUP where the program has a handler of
    its own for it).

    ::

        async with stop_on_signals(trainer):
            await trainer.fit()        # returns normally on Ctrl-C or `kill`, after the
                                       # step in progress, with a final Checkpoint

    Installed only here, never at import, and only in the main thread (where Python delivers
    signals); the previous handlers come back when the last block ends. A signal stops the
    loops of every block open in the process that catches it (a service's jobs, each in a
    block of its own, all end gracefully on the pod's SIGTERM). The handler calls
    :meth:`~asynchat.LoopBase.stop`, which may be called from one.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "stop_on_signals() must run in the main thread: Python delivers signals there only"
        )
    if not loops:
        raise ValueError("stop_on_signals() needs at least one loop to stop")
    caught = ending_signals() if signals is None else tuple(signals)
    if not caught and signals is not None:
        raise ValueError("stop_on_signals(signals=()) would catch nothing: name a signal")
    block = _Block(loops, frozenset(caught))
    _open.append(block)
    try:
        for signum in block.signals - _previous.keys():
            _previous[signum] = _catch(signum)
        yield
    finally:
        _open.remove(block)
        for signum in block.signals:
            if not any(signum in other.signals for other in _open):
                _put_back(signum)


def _catch(signum: int) -> Any:
    """Installs the engine's handler for ``signum``; the handler it had."""
    try:
        return signal.signal(signum, _stop_loops)
    except (OSError, ValueError) as exc:  # (SIGKILL, SIGSTOP; a number that is no signal)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = repr(signum)
        raise ValueError(f"stop_on_signals(signals=...): {name} cannot be caught ({exc})") from exc


@dataclasses.dataclass(frozen=True, eq=False)
class _Block:
    """The loops of one :func:`stop_on_signals` block, and the signals that stop them."""

    loops: tuple[LoopBase, ...]
    signals: frozenset[int]


_open: list[_Block] = []  # the blocks open in this process (main thread only)
_previous: dict[int, Any] = {}  # the handler each caught signal had before the first block


def _stop_loops(signum: int, frame: object) -> None:
    """The handler of the signals of open blocks: stops the loops of every block that
    catches ``signum``. Before, each block received signals through the event loop (anyio),
    which keeps one receiver per signal: on asyncio a SIGTERM stopped the loops of the
    newest block alone, and none once that block had ended."""
    name = signal.Signals(signum).name
    for block in list(_open):
        if signum in block.signals:
            for loop in block.loops:
                loop.stop(f"received {name}")


def _put_back(signum: int) -> None:
    """The handler ``signum`` had before the first block, as the last block that caught it
    ends (unless the program has set one of its own since). Before, asyncio and uvloop left
    a signal they had received with its default (SIGINT: ``KeyboardInterrupt``): a program's
    own SIGTERM handler (a server's graceful shutdown) was gone, an ignored SIGINT heard."""
    if signum not in _previous:  # (installing it failed: an invalid signal)
        return
    previous = _previous.pop(signum)
    if previous is not None and signal.getsignal(signum) is _stop_loops:
        signal.signal(signum, previous)


def _forget_blocks() -> None:
    """In a process forked while blocks were open (a DataLoader worker, forked as its loop
    began): the blocks are the parent's, and so are their loops. The signals get back the
    handlers they had before, as the worker would have had them: a Ctrl-C to the process
    group ran the handler in each worker, which asked the parent's loops there to stop."""
    for signum in list(_previous):
        with contextlib.suppress(ValueError, OSError):
            _put_back(signum)
    _open.clear()


os.register_at_fork(after_in_child=_forget_blocks)
