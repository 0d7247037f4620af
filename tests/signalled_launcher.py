"""A launcher for the signal tests: two ranks that run until a signal ends them.

python signalled_launcher.py DIRECTORY HOW [async | async-handled | async-two]
    # HOW: "0" trains, "1" trains under stop_on_signals, "stubborn" ignores SIGINT,
    # "terminal" as "1", on its stdin's terminal; "async": launch_async in anyio.run;
    # "async-handled": that, and the program cancels the job on a SIGTERM itself;
    # "async-two": two such jobs at once, the second in DIRECTORY/second
"""

from __future__ import annotations

import fcntl
import signal
import sys
import termios
from collections.abc import Awaitable, Callable

import anyio
import rank_jobs

from asynchat import launch, launch_async


async def cancelled_on_sigterm(job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job``, cancelled by a SIGTERM: the program's own graceful shutdown."""
    async with anyio.create_task_group() as tasks:

        async def cancel_on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as received:
                async for _ in received:
                    print("cancelling the job", flush=True)
                    tasks.cancel_scope.cancel()

        tasks.start_soon(cancel_on_sigterm)
        await job()
        tasks.cancel_scope.cancel()


if __name__ == "__main__":
    directory, how, *launched = sys.argv[1:]
    if how == "terminal":  # the terminal becomes this session's, as a login shell's does
        fcntl.ioctl(sys.stdin.fileno(), termios.TIOCSCTTY, 0)
    if how == "stubborn":
        job, args = rank_jobs.ignoring_ctrl_c, (directory,)
    else:
        job, args = rank_jobs.until_signalled, (directory, how != "0")
    if launched == ["async"]:
        anyio.run(lambda: launch_async(job, nprocs=2, args=args))
    elif launched == ["async-handled"]:
        anyio.run(cancelled_on_sigterm, lambda: launch_async(job, nprocs=2, args=args))
    elif launched == ["async-two"]:
        second = (f"{directory}/second", *args[1:])

        async def two_jobs() -> None:
            async with anyio.create_task_group() as jobs:
                jobs.start_soon(lambda: launch_async(job, nprocs=2, args=args))
                jobs.start_soon(lambda: launch_async(job, nprocs=2, args=second))

        anyio.run(two_jobs)
    else:
        launch(job, nprocs=2, args=args)
