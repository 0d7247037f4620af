"""launch(): one process per rank, each with a torch.distributed process group and an event loop."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RankFn = Callable[..., Awaitable[object]]

_POLL_S = 0.05
_GRACE_S = 5.0


class LaunchError(RuntimeError):
    """A rank failed; the message names the rank and carries its traceback."""

    def __init__(self, rank: int, description: str) -> None:
        super().__init__(f"rank {rank} failed:\n{description}")
        self.rank = rank


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def run_rank(
    fn: RankFn,
    rank: int,
    world_size: int,
    args: Sequence[Any],
    *,
    backend: str,
    timeout: datetime.timedelta,
    on_error: Callable[[BaseException], None] = lambda exc: None,
) -> None:
    """In a rank's process (MASTER_ADDR/MASTER_PORT set): init the group, run ``fn``, tear down.

    ``on_error`` sees an error before the process group is torn down: tearing it down makes
    the other ranks' collectives fail too, and the launcher reports the first error it hears.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    try:
        options = {"use_uvloop": True} if _have_uvloop() else {}
        anyio.run(fn, rank, world_size, *args, backend="asyncio", backend_options=options)
    except BaseException as exc:
        on_error(exc)
        raise
    finally:
        dist.destroy_process_group()


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _child(
    rank: int,
    fn: RankFn,
    world_size: int,
    args: Sequence[Any],
    backend: str,
    timeout: datetime.timedelta,
    addr: str,
    port: int,
    errors: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    reported: list[BaseException] = []

    def report(exc: BaseException) -> None:
        reported.append(exc)
        errors.put((rank, "".join(traceback.format_exception(exc))))

    try:
        run_rank(fn, rank, world_size, args, backend=backend, timeout=timeout, on_error=report)
    except BaseException as exc:
        if not reported:  # failed before fn ran, e.g. in the rendezvous
            report(exc)
        raise SystemExit(1) from None


class _Ranks:
    """The rank processes of one launch: started, watched, and always reaped."""

    def __init__(
        self,
        fn: RankFn,
        nprocs: int,
        args: Sequence[Any],
        backend: str,
        timeout: datetime.timedelta,
        addr: str,
        port: int,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.errors = ctx.SimpleQueue()
        self.processes = [
            ctx.Process(
                target=_child,
                args=(rank, fn, nprocs, tuple(args), backend, timeout, addr, port, self.errors),
                name=f"asynchat-rank-{rank}",
            )
            for rank in range(nprocs)
        ]
        for process in self.processes:
            process.start()

    def poll(self) -> bool:
        """True once every rank has exited 0; raise LaunchError as soon as one fails."""
        for rank, process in enumerate(self.processes):
            if process.exitcode not in (None, 0):
                self.terminate()
                raise self._error(rank, process.exitcode)
        return all(p.exitcode == 0 for p in self.processes)

    def _error(self, rank: int, exitcode: int) -> LaunchError:
        if not self.errors.empty():
            failed_rank, text = self.errors.get()
            return LaunchError(failed_rank, text)
        how = (
            f"killed by {signal.Signals(-exitcode).name}"
            if exitcode < 0
            else f"exit code {exitcode}"
        )
        return LaunchError(rank, f"the process died ({how}) without a Python traceback")

    def terminate(self) -> None:
        """Stop the ranks still running (SIGTERM, SIGKILL after a grace period); reap all."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + _GRACE_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def launch(
    fn: RankFn,
    *,
    nprocs: int,
    backend: str | None = None,
    args: Sequence[Any] = (),
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    collective_timeout: datetime.timedelta = datetime.timedelta(minutes=5),
) -> None:
    """Run ``async def fn(rank, world_size, *args)`` in ``nprocs`` processes, one per rank.

    Each process initialises the default process group (``backend`` defaults to NCCL with
    CUDA, gloo otherwise; rendezvous on ``master_addr`` and a free port), selects its CUDA
    device, and runs ``fn`` in an event loop of its own (uvloop where available). ``fn`` must
    be importable (a module-level function), since ranks are started with ``spawn``.

    If a rank raises or dies, the others are terminated at once (no rank waits out a
    collective) and :class:`LaunchError` is raised naming the rank, with its traceback.
    ``collective_timeout`` bounds each collective. Under ``torchrun`` (``RANK`` and
    ``WORLD_SIZE`` set) only the current rank runs, in this process, so one script scales to
    several machines.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run_rank(
            fn, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args,
            backend=backend or default_backend(), timeout=collective_timeout,
        )  # fmt: skip
        return
    ranks = _start(fn, nprocs, backend, args, master_addr, master_port, collective_timeout)
    try:
        while not ranks.poll():
            time.sleep(_POLL_S)
    finally:
        ranks.terminate()


async def launch_async(
    fn: RankFn,
    *,
    nprocs: int,
    backend: str | None = None,
    args: Sequence[Any] = (),
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    collective_timeout: datetime.timedelta = datetime.timedelta(minutes=5),
) -> None:
    """:func:`launch` from a running event loop, without blocking it.

    The ranks are watched by polling; cancelling the awaiting task terminates them (and
    waits until they are reaped) before the cancellation propagates.
    """
    ranks = _start(fn, nprocs, backend, args, master_addr, master_port, collective_timeout)
    try:
        while not ranks.poll():  # noqa: ASYNC110 - processes signal nothing the loop can await
            await anyio.sleep(_POLL_S)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(ranks.terminate)


def _start(
    fn: RankFn,
    nprocs: int,
    backend: str | None,
    args: Sequence[Any],
    master_addr: str,
    master_port: int | None,
    timeout: datetime.timedelta,
) -> _Ranks:
    if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    if not callable(fn):
        raise TypeError(f"fn must be an async function fn(rank, world_size, *args), got {fn!r}")
    port = master_port if master_port is not None else free_port(master_addr)
    return _Ranks(fn, nprocs, args, backend or default_backend(), timeout, master_addr, port)
