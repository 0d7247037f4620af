"""A launcher for the signal tests: two ranks that run until a signal ends them.

python signalled_launcher.py DIRECTORY HOW [async | async-handled | async-two | beside-* |
                                            launch-idle]
    # HOW: "0" trains, "1" trains under stop_on_signals, "stubborn" ignores SIGINT,
    # "terminal" as "1", on its stdin's terminal; "usr1" as "1", and each rank asks for a
    # save on SIGUSR1 (rank 0 prints "saved <path>"); "async": launch_async in anyio.run;
    # "async-handled": that, and the program cancels the job on a SIGTERM itself;
    # "async-two": two such jobs at once, the second in DIRECTORY/second;
    # "beside-block-first", "beside-job-first": a service's two jobs, one launched and one
    # training in this process under stop_on_signals (its block opened before the launched
    # job starts, or after it trains); the local one writes DIRECTORY/local/stop_reason;
    # "launch-idle": launch, the ranks' data a stream that waits for data after 6 batches
"""

from __future__ import annotations

import fcntl
import signal
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import rank_jobs

from asynchat import Callback, LoopState, Trainer, launch, launch_async, stop_on_signals


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


class Steps(Callback):
    """Writes each step to ``path``, a little slowly (a job that runs until stopped)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step_end(self, state: LoopState) -> None:
        self.path.write_text(str(state.global_step))
        time.sleep(0.02)


async def beside(order: str, job: Callable[..., Awaitable[None]], args: tuple[object, ...]) -> None:
    """A launched job beside one training here under ``stop_on_signals``, whose block opens
    before the launched job starts (``order`` "block-first") or once it trains."""
    local = Path(str(args[0]), "local")
    local.mkdir()
    steps = Steps(local / "step")
    trainer = rank_jobs.plain_trainer(kind=Trainer, num_epochs=10_000, callbacks=[steps])
    async with anyio.create_task_group() as jobs:
        launched = lambda: launch_async(job, nprocs=2, args=args)  # noqa: E731
        if order == "job-first":
            jobs.start_soon(launched)
            while not Path(str(args[0]), "step").exists():  # noqa: ASYNC110 (the ranks train)
                await anyio.sleep(0.05)
        async with stop_on_signals(trainer):
            if order == "block-first":
                jobs.start_soon(launched)
            await trainer.fit()
        (local / "stop_reason").write_text(str(trainer.state.stop_reason))
    print("both jobs ended", flush=True)


if __name__ == "__main__":
    directory, how, *launched = sys.argv[1:]
    if how == "terminal":  # the terminal becomes this session's, as a login shell's does
        fcntl.ioctl(sys.stdin.fileno(), termios.TIOCSCTTY, 0)
    if how == "stubborn":
        job, args = rank_jobs.ignoring_ctrl_c, (directory,)
    else:
        idle = launched == ["launch-idle"]
        job, args = rank_jobs.until_signalled, (directory, how != "0", how == "usr1", idle)
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
    elif launched and launched[0].startswith("beside-"):
        anyio.run(beside, launched[0].removeprefix("beside-"), job, args)
    else:
        launch(job, nprocs=2, args=args)
