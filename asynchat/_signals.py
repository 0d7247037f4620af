"""Opt-in: turn SIGINT, SIGTERM and SIGHUP into a graceful stop of running loops."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator

import anyio

from asynchat._loop import LoopBase


def ending_signals() -> tuple[signal.Signals, ...]:
    """The signals that end a process unless it handles them: SIGINT (Ctrl-C), SIGTERM
    (``kill``, ``timeout``, a pod's end) and SIGHUP (the terminal closed: an ssh session
    ended under a job run without ``nohup`` or tmux). SIGHUP only where it would end this
    process (its default action): not where it is ignored (``nohup`` asks the job to
    outlive its terminal) nor where the program handles it itself (a daemon's reload or log
    rotation)."""
    ending = (signal.SIGINT, signal.SIGTERM)
    if not hasattr(signal, "SIGHUP") or signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
        return ending  # (SIGHUP: POSIX only)
    return (*ending, signal.SIGHUP)


@contextlib.asynccontextmanager
async def stop_on_signals(
    *loops: LoopBase, signals: tuple[signal.Signals, ...] | None = None
) -> AsyncIterator[None]:
    """Inside this block, SIGINT, SIGTERM and SIGHUP ``stop()`` the given loops instead of
    killing the process (``signals``: by default those of :func:`ending_signals`: SIGHUP
    only where it would end the process, not under ``nohup`` nor where the program has a
    handler of its own for it).

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
    if not caught:
        raise ValueError("stop_on_signals(signals=()) would catch nothing: name a signal")
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
