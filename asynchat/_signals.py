"""Opt-in: turn SIGINT/SIGTERM into a graceful stop of running loops."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator

import anyio

from asynchat._loop import LoopBase


@contextlib.asynccontextmanager
async def stop_on_signals(
    *loops: LoopBase, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
) -> AsyncIterator[None]:
    """Inside this block, SIGINT and SIGTERM ``stop()`` the given loops instead of killing.

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
    with anyio.open_signal_receiver(*signals) as received:
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
