"""Opt-in: turn SIGINT, SIGTERM and SIGHUP into a graceful stop of running loops.

The engine hears a signal through one handler (:func:`_dispatch`), installed while anybody
listens to it: the blocks of :func:`stop_on_signals`, and :func:`~asynchat.launch_async`'s
relay to the ranks of the jobs it launched (``asynchat._launch._SignalRelay``). Before, each
installed a handler of its own in the other's place, and a signal reached the last one only:
a service's SIGTERM stopped its own loops and not its launched jobs' ranks.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from asynchat._loop import LoopBase

Listener = Callable[[int], None]


def disposition(signum: int) -> Any:
    """What ``signum`` does in this process, the engine's listening to it aside: the
    handler it had before the engine's, or the one it has (``signal.getsignal``'s value)."""
    if _installed(signum) and signum in _previous:
        return _previous[signum]
    return signal.getsignal(signum)


def left_to_default(signum: int) -> bool:
    """Whether ``signum`` would do its default action in this process: no handler of
    Python's (:func:`disposition`), nor one that C code installed, which
    ``signal.getsignal`` does not see (``faulthandler.register(signal.SIGUSR1)``, a common
    way to ask a process for its stacks: a handler of the engine's in its place, then put
    back as ``SIG_DFL``, would have lost it)."""
    if disposition(signum) != signal.SIG_DFL:
        return False
    if _installed(signum):
        return True  # (the engine's, in place of the default it had)
    try:
        action = ctypes.create_string_buffer(512)  # (a struct sigaction: its handler first)
        if ctypes.CDLL(None).sigaction(int(signum), None, action) != 0:
            return True
    except (OSError, AttributeError):  # pragma: no cover - no C library to ask
        return True
    return not ctypes.c_void_p.from_buffer(action).value  # (SIG_DFL is 0)


def ending_signals() -> tuple[signal.Signals, ...]:
    """The signals that would end this process: SIGINT (Ctrl-C), SIGTERM (``kill``,
    ``timeout``, a pod's end) and SIGHUP (the terminal closed: an ssh session ended under a
    job run without ``nohup`` or tmux), each unless this process ignores it: a process that
    ignores one was asked to (``nohup`` ignores SIGHUP, for the job to outlive its terminal;
    a shell ignores SIGINT in what a script starts in the background, ``cmd &``, for the
    terminal's Ctrl-C not to end it), and a launched job ignores it as one process would.
    SIGHUP also not where the program handles it itself (a daemon's reload or log
    rotation)."""
    ending = [s for s in (signal.SIGINT, signal.SIGTERM) if disposition(s) != signal.SIG_IGN]
    if hasattr(signal, "SIGHUP") and disposition(signal.SIGHUP) == signal.SIG_DFL:
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
    given: tuple[object, ...] = loops  # (checked: a list of loops is a common slip)
    for loop in given:
        if not isinstance(loop, LoopBase):
            many = isinstance(loop, (list, tuple, set))
            hint = "; pass them one by one: stop_on_signals(*loops)" if many else ""
            raise TypeError(f"stop_on_signals() takes loops (a Trainer, ...), got {loop!r}{hint}")
    caught = ending_signals() if signals is None else _signal_numbers(signals)
    if not caught and signals is not None:
        raise ValueError("stop_on_signals(signals=()) would catch nothing: name a signal")
    block = _Block(loops, frozenset(caught))
    _open.append(block)
    try:
        for signum in block.signals:
            listen(signum, block.stop)
        yield
    finally:
        _open.remove(block)
        for signum in block.signals:
            unlisten(signum, block.stop)


def _signal_numbers(signals: object) -> tuple[int, ...]:
    """``signals=``, checked: signal numbers (``signal.SIGTERM``...), in a tuple or list."""
    wanted = "signals must be a tuple of signals, e.g. (signal.SIGTERM, signal.SIGUSR1)"
    if isinstance(signals, int):
        raise TypeError(f"{wanted}, got the one signal {signals!r}: pass signals=({signals!r},)")
    if not isinstance(signals, (list, tuple, set)):
        raise TypeError(f"{wanted}, got {signals!r}")
    for signum in signals:
        if isinstance(signum, bool) or not isinstance(signum, int):
            raise TypeError(f"{wanted}, got {signum!r} among them")
    return tuple(signals)


def _catch(signum: int) -> Any:
    """Installs the engine's handler for ``signum``; the handler it had."""
    try:
        return signal.signal(signum, _dispatch)
    except (OSError, ValueError) as exc:  # (SIGKILL, SIGSTOP; a number that is no signal)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = repr(signum)
        raise ValueError(f"stop_on_signals(signals=...): {name} cannot be caught ({exc})") from exc


def catches(signum: int) -> bool:
    """Whether a :func:`stop_on_signals` block open now catches ``signum`` (for a graceful
    stop, instead of the signal's own action)."""
    return any(signum in block.signals for block in _open)


@dataclasses.dataclass(frozen=True, eq=False)
class _Block:
    """The loops of one :func:`stop_on_signals` block, and the signals that stop them."""

    loops: tuple[LoopBase, ...]
    signals: frozenset[int]

    def stop(self, signum: int) -> None:
        for loop in self.loops:
            loop.stop(f"received {signal.Signals(signum).name}")


_open: list[_Block] = []  # the blocks open in this process (main thread only)
_listeners: dict[int, list[Listener]] = {}  # who hears each signal the engine listens to
_watchers: list[Listener] = []  # who hears every signal the engine hears
_previous: dict[int, Any] = {}  # the handler each had before the engine's


def listen(signum: int, listener: Listener) -> None:
    """``listener(signum)`` at each ``signum`` until :func:`unlisten` (main thread only): the
    engine's handler is installed in place of the signal's (one the program set since the
    engine's last is taken as the one to put back). ValueError for a signal that cannot be
    caught."""
    if not _installed(signum):
        _previous[signum] = _catch(signum)
    _listeners.setdefault(signum, []).append(listener)


def _installed(signum: int) -> bool:
    """Whether ``signum``'s handler is the engine's (not for a number that is no signal)."""
    try:
        return signal.getsignal(signum) is _dispatch
    except ValueError:
        return False


def unlisten(signum: int, listener: Listener) -> None:
    """``listener`` no longer hears ``signum``; the last to go puts the signal's handler back."""
    listeners = _listeners.get(signum, [])
    if listener in listeners:
        listeners.remove(listener)
    if not listeners:
        _listeners.pop(signum, None)
        _put_back(signum)


def watch(watcher: Listener) -> None:
    """``watcher(signum)`` at every signal the engine hears (listened to by anybody), after
    its listeners, until :func:`unwatch`. A watcher installs nothing: it hears what the
    process already turned over to the engine, as a block's graceful stop."""
    _watchers.append(watcher)


def unwatch(watcher: Listener) -> None:
    if watcher in _watchers:
        _watchers.remove(watcher)


def _dispatch(signum: int, frame: object) -> None:
    """The engine's handler: each listener to ``signum`` hears it, then each watcher (once,
    if it is both). A block's listener stops its loops: every block open that catches the
    signal stops (before, each block received signals through the event loop, anyio's one
    receiver per signal: on asyncio a SIGTERM stopped the loops of the newest block alone)."""
    for listener in dict.fromkeys([*_listeners.get(signum, ()), *_watchers]):
        listener(signum)


def _put_back(signum: int) -> None:
    """The handler ``signum`` had before the engine's, as its last listener leaves (unless
    the program has set one of its own since). Before, asyncio and uvloop left
    a signal they had received with its default (SIGINT: ``KeyboardInterrupt``): a program's
    own SIGTERM handler (a server's graceful shutdown) was gone, an ignored SIGINT heard."""
    if signum not in _previous:  # (installing it failed: an invalid signal)
        return
    previous = _previous.pop(signum)
    if previous is not None and signal.getsignal(signum) is _dispatch:
        signal.signal(signum, previous)


def _forget() -> None:
    """In a process forked while the engine listened (a DataLoader worker, forked as its
    loop began): the blocks are the parent's, and so are their loops and the launched jobs.
    The signals get back the handlers they had before, as the worker would have had them: a
    Ctrl-C to the process group ran the handler in each worker, which asked the parent's
    loops there to stop."""
    for signum in list(_previous):
        with contextlib.suppress(ValueError, OSError):
            _put_back(signum)
    _open.clear()
    _listeners.clear()
    _watchers.clear()


os.register_at_fork(after_in_child=_forget)
