"""Opt-in: turn SIGINT, SIGTERM and SIGHUP into a graceful stop of running loops."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

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
    signals); the previous handlers come back when the block ends. Signals are received by
    the event loop (through anyio), so the stop runs on the loop, not in a signal handler.
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
    if not caught:  # (the process ignores every one: none would end it)
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in caught}
    try:
        with anyio.open_signal_receiver(*caught) as received:
            async with anyio.create_task_group() as tg:

                async def relay() -> None:
                    async for signum in received:
                        for loop in loops:
                            loop.stop(f"received {signal.Signals(signum).name}")

                tg.start_soon(relay)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
    finally:
        _put_back(previous)


def _put_back(previous: Mapping[signal.Signals, Any]) -> None:
    """The handlers the signals had before :func:`stop_on_signals`. asyncio and uvloop leave
    a signal they received with its default (SIGINT: ``KeyboardInterrupt``), not with what it
    had: a program's own SIGTERM handler (a server's graceful shutdown) was gone after the
    block, and an ignored SIGINT was heard."""
    for signum, handler in previous.items():
        if handler is not None and signal.getsignal(signum) != handler:
            signal.signal(signum, handler)
