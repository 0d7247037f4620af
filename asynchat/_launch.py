"""launch(): one process per rank, each with a torch.distributed process group and an event loop."""

from __future__ import annotations

import ast
import atexit
import contextlib
import datetime
import faulthandler
import gc
import inspect
import multiprocessing.connection as mp_connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import PrefixStore, Store, TCPStore  # type: ignore[attr-defined]

from asynchat import _heartbeat as heartbeat
from asynchat import _hold as hold
from asynchat._checks import positive_int, positive_number
from asynchat._errors import AsynchatError
from asynchat._signals import (
    Listener,
    catches,
    disposition,
    ending_signals,
    left_to_default,
    listen,
    unlisten,
    unwatch,
    watch,
)
from asynchat._start_method import LauncherState, rank_context

RankFn = Callable[..., Awaitable[object]]

_POLL_S = 0.05
_GRACE_S = 5.0
# After a first failure, at most how long the launcher waits for the other ranks to report or
# exit before it judges (it goes on as soon as each has); a rank that is stopped earlier would
# be missing from the report, whose survivors' errors tell what the failure did to them.
_SETTLE_S = 3.0
# The exit code multiprocessing gives every process of a fork server that died (it cannot
# tell how they end; they may still run).
_LOST = 255
# The signal on which a launched rank writes its Python stacks (the launcher asks a hung
# rank): a real-time one where the system has them, so that SIGUSR1 and SIGUSR2 are the
# job's (a batch scheduler's warning before it preempts: SLURM's --signal=USR1@90).
STACKS_SIGNAL: int | None = (
    int(signal.SIGRTMIN) + 2 if hasattr(signal, "SIGRTMIN") else getattr(signal, "SIGUSR1", None)
)
# The signals a launcher passes on to its ranks, each where it would end the launcher (its
# default action) and is the job's: the ranks decide what it does (their handler, such as
# `checkpoint.request_save()`, or the default: they end by it).
USER_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name)
    for name in ("SIGUSR1", "SIGUSR2")
    if hasattr(signal, name) and getattr(signal, name) != STACKS_SIGNAL
)


def user_signals() -> tuple[int, ...]:
    """:data:`USER_SIGNALS` that this process leaves to their default action (one the
    program handles or ignores is its own, a faulthandler's too)."""
    return tuple(s for s in USER_SIGNALS if left_to_default(s))


_DUMP_WAIT_S = 0.3  # how long ranks asked for their stacks get to write them
#: How long a cancelled :func:`launch_async` waits by default for its ranks to end as on
#: Ctrl-C (their steps completed, their final checkpoints written) before it terminates them.
CANCEL_GRACE_S = 60.0


class LaunchError(AsynchatError, RuntimeError):
    """A rank failed or hung. ``rank`` is the first to fail (or the hung rank the others
    wait for); the message says how it ended, with its traceback or stacks, and how the
    others ended. ``hung`` lists the ranks found hung (empty for a failure)."""

    def __init__(self, rank: int, description: str, *, hung: Sequence[int] = ()) -> None:
        super().__init__(f"rank {rank} {'hung' if hung else 'failed'}:\n{description}")
        self.rank = rank
        self.hung = list(hung)


#: Linux process states (``/proc/<pid>/stat``) of a process that runs no code until resumed.
_STOPPED = frozenset("Tt")
_NO_STACKS = {
    **dict.fromkeys(_STOPPED, "(none written: the process is stopped, by a SIGSTOP or a debugger)"),
    "D": "(none written: the process is in an uninterruptible wait in the kernel, state D: "
    "on a device or a network file system)",
}


def _signal(process: mp.Process, signum: int) -> None:
    """Send ``signum`` to a rank's process if it runs (never to a reaped one's pid, which the
    system may have given to another process)."""
    if process.pid is not None and process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _process_state(pid: int | None) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``D``, ``T``...), None where the
    system does not say (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]  # after the command name, which may hold ")"


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
    store: Store | None = None,
) -> None:
    """In a rank's process (MASTER_ADDR/MASTER_PORT set): init the group, run ``fn``, tear down.

    ``on_error`` sees an error before the process group is torn down: tearing it down makes
    the other ranks' collectives fail too, and the launcher reports the first error it hears.
    ``store`` is the rendezvous store to use instead of ``env://`` (torchrun restarts).
    """
    _join_group(rank, world_size, backend, timeout, store)
    try:
        options = {"use_uvloop": True} if _have_uvloop() else {}
        anyio.run(fn, rank, world_size, *args, backend="asyncio", backend_options=options)
        heartbeat.finished()  # it waits for the others now: never the one they wait for
        _closing_barrier(rank, timeout)
    except BaseException as exc:
        on_error(exc)
        raise
    finally:
        _leave_group()


def _join_group(
    rank: int, world_size: int, backend: str, timeout: datetime.timedelta, store: Store | None
) -> None:
    """Select this rank's GPU (if any) and init the default process group."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, store=store)


def _leave_group() -> None:
    dist.destroy_process_group()
    # That drops the registry's reference only: the group lives on while anything holds it,
    # e.g. a DDP model in a reference cycle with its trainer. Collect those now, while the
    # interpreter is whole; destroyed during finalization, gloo's work objects need the GIL
    # to release their tensors and the process aborts (seen here as a rare SIGABRT of a rank
    # whose work was done; pytorch/pytorch#179291 describes it).
    gc.collect()


def placed_by_launcher() -> tuple[int, int] | None:
    """``(rank, world_size)`` where a launcher such as ``torchrun`` started this process as
    one rank of a job (``RANK`` and ``WORLD_SIZE`` set), else None.

    Raises ValueError, naming the variables, where they cannot be a launcher's: no ranks,
    or no ``MASTER_ADDR``/``MASTER_PORT`` to meet the others at (most likely left over in
    the shell, where they made :func:`launch` wait for a job that does not exist).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    given = f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r}"
    leftover = (
        "; if they are left over in this shell, unset them to launch the ranks here "
        "(launch() takes them for a launcher's, such as torchrun's, and runs only that rank)"
    )
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        rank = world_size = -1
    if not 0 <= rank < world_size:
        raise ValueError(f"{given} in the environment name no rank of a job{leftover}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"{given} are set in the environment but {' and '.join(missing)} not (where the "
            f"ranks meet){leftover}"
        )
    return rank, world_size


def _placed(hang_s: float | None) -> tuple[int, int] | None:
    """:func:`placed_by_launcher`, with a warning where ``hang_timeout`` then goes unused:
    only ranks that :func:`launch` starts are watched (before, it was dropped unsaid)."""
    placed = placed_by_launcher()
    if placed is not None and hang_s is not None:
        warnings.warn(
            f"hang_timeout={hang_s:g} is not applied: RANK and WORLD_SIZE are set, so another "
            "launcher (such as torchrun) started this rank, and only the ranks launch() "
            "starts are watched for hangs; collective_timeout still bounds each collective",
            RuntimeWarning,
            stacklevel=3,
        )
    return placed


async def run_rank_here(
    fn: RankFn,
    rank: int,
    world_size: int,
    args: Sequence[Any],
    *,
    backend: str,
    timeout: datetime.timedelta,  # noqa: ASYNC109 (the collectives' timeout, as run_rank's)
) -> None:
    """:func:`run_rank` in the running event loop (:func:`launch_async` under ``torchrun``):
    joining and leaving the group, which block, on a worker thread."""
    store = await anyio.to_thread.run_sync(elastic_store, rank, world_size, timeout)
    try:
        await anyio.to_thread.run_sync(_join_group, rank, world_size, backend, timeout, store)
        await fn(rank, world_size, *args)
        await anyio.to_thread.run_sync(_closing_barrier, rank, timeout)
    finally:
        if dist.is_initialized():  # (also when cancelled as the thread joined the group)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_leave_group)


def _closing_barrier(rank: int, timeout: datetime.timedelta) -> None:
    """An orderly end: no rank tears the group down (under torchrun, or with a master_port,
    rank 0 hosts the rendezvous store) while another still uses it. A rank whose ``fn``
    returned while another's still runs collectives waits here until the timeout: its error
    says so (else it reads as a failure of its own)."""
    try:
        dist.barrier()
    except Exception as exc:
        exc.add_note(
            f"rank {rank}'s function had returned; it waited here, in launch's closing "
            f"barrier, for the other ranks' functions to return, and they did not within the "
            f"collective timeout ({timeout.total_seconds():g} s): did one run a collective "
            "that this rank never joined?"
        )
        raise


def elastic_store(rank: int, world_size: int, timeout: datetime.timedelta) -> Store | None:
    """Under torchrun's elastic agent, the rendezvous store with a prefix of this attempt's
    own (None elsewhere: ``env://`` as usual).

    The agent keeps one store for every attempt of a job (``TORCHELASTIC_USE_AGENT_STORE``),
    and a group restarted after a rank died reads the dead attempt's gloo addresses from it
    under the same keys: every restart failed with "Gloo connectFullMesh failed ... Connection
    refused" (torch 2.13, reproduced without asynchat). Keys under
    ``asynchat/attempt-<TORCHELASTIC_RESTART_COUNT>/`` keep each attempt apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    base = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=not hosted_by_agent and rank == 0, timeout=timeout, multi_tenant=True,
    )  # fmt: skip
    return PrefixStore(f"asynchat/attempt-{attempt}", base)


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
    hosted: bool,
    launcher: LauncherState,
    errors: Any,
    lifeline: Any,
    beats: Any,
    dump: str,
) -> None:
    launcher.apply()
    _prepare_rank(rank, lifeline, beats, dump)
    os.environ.update(
        MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    reported: list[BaseException] = []

    def report(exc: BaseException) -> None:
        reported.append(exc)
        errors.put((rank, time.time(), "".join(traceback.format_exception(exc))))

    try:
        # ``hosted``: the launcher serves the rendezvous store (every rank is its client).
        store = (
            TCPStore(addr, port, world_size, is_master=False, timeout=timeout) if hosted else None
        )
        run_rank(
            fn, rank, world_size, args, backend=backend, timeout=timeout, on_error=report,
            store=store,
        )  # fmt: skip
    except BaseException as exc:
        if not reported:  # failed before fn ran, e.g. in the rendezvous
            report(exc)
        raise SystemExit(1) from None


def _prepare_rank(rank: int, lifeline: Any, beats: Any, dump: str) -> None:
    """What a launched rank sets up before it joins the group: the lifeline, progress beats
    and the file its Python stacks go to."""
    # A process group of its own: a terminal's Ctrl-C reaches the launcher alone, which
    # passes it on once (two would be a second Ctrl-C: the forced exit).
    os.setpgrp()
    # Die with the launcher, however it dies (even SIGKILL): its end of the lifeline closes.
    threading.Thread(target=_watch_launcher, args=(lifeline, dump), daemon=True).start()
    heartbeat.install(beats, rank)
    if hasattr(signal, "SIGTSTP"):  # the launcher's Ctrl-Z holds the rank's loops
        hold.hold_on_sigtstp()
    # Python stacks for the launcher: on STACKS_SIGNAL (it asks a hung rank) and on a fatal
    # signal (a native crash or abort), where no Python traceback would tell what the rank
    # was doing. Kept open until the process ends: faulthandler writes to it from a signal
    # handler.
    stacks = open(dump, "w")  # noqa: SIM115
    faulthandler.enable(file=stacks, all_threads=True)
    if STACKS_SIGNAL is not None:
        faulthandler.register(STACKS_SIGNAL, file=stacks, all_threads=True)


def _watch_launcher(lifeline: Any, dump: str) -> None:
    """Kill this rank once its launcher is gone. A launcher that died without its cleanup
    (SIGKILL, the OOM killer) left its directory of stack files behind: the ranks remove it,
    each its own file, and the last one out the directory."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()  # nothing is ever sent: this returns when the launcher is gone
    for remove, path in ((os.unlink, dump), (os.rmdir, os.path.dirname(dump))):
        with contextlib.suppress(OSError):  # (not empty yet: another rank's file is there)
            remove(path)
    os.kill(os.getpid(), signal.SIGKILL)


class _Ranks:
    """The rank processes of one launch: started, watched, and always reaped.

    Each rank holds the read end of a pipe (its lifeline) whose write end only the launcher
    holds, and kills itself when it reads end-of-file: the ranks die with the launcher on
    every way it can die, SIGKILL included. Each rank reports its error with the time; a
    rank that died without one (killed, crashed) is the cause, so the rank named is the first
    to fail, not a survivor whose collective failed because a peer had died.
    """

    def __init__(
        self,
        fn: RankFn,
        nprocs: int,
        args: Sequence[Any],
        backend: str,
        timeout: datetime.timedelta,
        addr: str,
        port: int | None,
        hang_timeout: float | None,
    ) -> None:
        ctx = rank_context()
        # The rendezvous store, served here unless the caller chose a port: bound to a port
        # the system picks before any rank hears of it. A port found free and handed on was
        # free only then (another job, or any connection's ephemeral port, could take it
        # before rank 0's store bound it, and that launch failed with EADDRINUSE).
        self._store = None if port is not None else _hosted_store(addr, timeout)
        port = port if self._store is None else self._store.port
        self.errors, self.hang_timeout = ctx.SimpleQueue(), hang_timeout
        now = time.monotonic()  # [time, count] per rank: start-up counts towards hang_timeout
        self.beats = ctx.Array("d", [now, 0.0] * nprocs, lock=False)
        self._watched_from = now  # no rank is late for hang_timeout before (see let_go)
        self.started = time.time()
        self.exited_at: dict[int, float] = {}
        self.reports: dict[int, tuple[float, str]] = {}
        self.signalled: list[int] = []  # signals passed on to the ranks (see forwarding)
        self.graceful = False  # the first was a stop_on_signals block's (see _SignalRelay)
        self._forced_at: float | None = None  # when a second one was
        self._dumps = tempfile.mkdtemp(prefix="asynchat-launch-")
        self._lifelines: list[tuple[Any, Any]] = []
        self.processes: list[Any] = []
        hosted = self._store is not None
        group = (nprocs, tuple(args), backend, timeout, addr, port, hosted, LauncherState())
        try:
            for rank in range(nprocs):
                self._add_rank(ctx, rank, fn, group)
            for process in self.processes:
                process.start()
        except BaseException:
            # A rank that could not start (a fork refused: the process limit, memory; no
            # descriptor left for its pipe): those started end now, and nothing is left
            # behind. Before, they ran on, waiting for the others, and the stack files'
            # directory stayed in TMPDIR.
            self.processes = [p for p in self.processes if p.pid is not None]
            self.terminate()
            self.close()
            raise
        for reader, _ in self._lifelines:
            reader.close()  # the ranks hold the read ends; the launcher keeps the writers

    def _add_rank(self, ctx: Any, rank: int, fn: RankFn, group: tuple[Any, ...]) -> None:
        """Rank ``rank``'s process (not started) and its lifeline; ``group``: what every
        rank is given alike (:func:`_child`'s arguments after ``fn``)."""
        reader, writer = ctx.Pipe(duplex=False)
        own = (self.errors, reader, self.beats, self._dump_path(rank))
        process = ctx.Process(
            target=_child, args=(rank, fn, *group, *own), name=f"asynchat-rank-{rank}"
        )
        self.processes.append(process)
        self._lifelines.append((reader, writer))

    def _dump_path(self, rank: int) -> str:
        return os.path.join(self._dumps, f"rank-{rank}.txt")

    def poll(self) -> bool:
        """Wait up to a poll interval; True once every rank has exited 0, LaunchError as soon
        as one fails (or, with a hang timeout, stops making progress)."""
        waiting = [p.sentinel for p in self.processes if p.exitcode is None]
        reader = self.errors._reader  # type: ignore[attr-defined]
        mp_connection.wait([*waiting, reader], timeout=_POLL_S)
        self._observe()
        if self.signalled:  # told to end: each rank ends as the signal makes it
            if self._forced_at is not None and time.monotonic() > self._forced_at + _GRACE_S:
                self.terminate()  # told twice, and still running: a rank that cannot end
            if any(p.exitcode is None for p in self.processes):
                return False
            # A block caught the signal and the program goes on: a job cut short says so.
            if self.graceful and self._any_failed():
                error = self._failure()
                name = signal.Signals(self.signalled[0]).name
                error.add_note(f"The launcher had passed {name} on to the ranks.")
                raise error
            return True
        if self._any_failed():
            error = self._failure()
            self.terminate()
            raise error
        if self.hang_timeout is not None:
            hung = self._hung(self.hang_timeout)
            if hung is not None:
                raise hung
        return all(p.exitcode == 0 for p in self.processes)

    def _any_failed(self) -> bool:
        return bool(self.reports) or any(map(self._failed, range(len(self.processes))))

    def _failed(self, rank: int) -> bool:
        """Whether rank ``rank``'s process has ended other than by its function returning: an
        exit code other than 0, or 0 before it said its function had returned (``os._exit(0)``
        in it, or a library ending the process: its peers wait for it in a collective, which
        NCCL may not give up on for many minutes)."""
        exitcode: int | None = self.processes[rank].exitcode
        if exitcode is None:
            return False
        return exitcode != 0 or self.beats[2 * rank] != heartbeat.FINISHED

    def _observe(self) -> None:
        now = time.time()
        for rank, process in enumerate(self.processes):
            if process.exitcode is not None and rank not in self.exited_at:
                self.exited_at[rank] = now
        while not self.errors.empty():
            rank, when, text = self.errors.get()
            self.reports.setdefault(rank, (when, text))

    def _failure(self) -> LaunchError:
        """LaunchError naming the rank that failed first, with how the others ended.

        A rank that died without a Python traceback (a signal, a native crash) is taken as
        the cause: a peer's failure shows in the others as Python errors (a collective
        failing), never as a signal, and the launcher cannot time such a death better than
        when it saw it. Within each kind, the earliest is named.
        """
        self._settle()
        failures: dict[int, tuple[float, str]] = dict(self.reports)
        for rank, process in enumerate(self.processes):
            if rank not in failures and self._failed(rank):
                how = self._how(process.exitcode, process.pid)
                stacks = self._read_stacks(rank)
                if stacks:
                    how += f"\nIts Python stacks when it died:\n{stacks}"
                failures[rank] = (self.exited_at[rank], how)
        hard = [rank for rank in failures if rank not in self.reports]
        first = min(hard or failures, key=lambda r: failures[r][0])
        when, text = failures[first]
        others = [
            f"rank {rank}: {failures[rank][1].strip().splitlines()[-1]}"
            for rank in sorted(set(failures) - {first})
        ]
        for rank, at in sorted(self.exited_at.items()):
            if rank not in failures and at <= when:
                others.append(f"rank {rank} had returned and exited {when - at:.2f} s before")
        if others:
            text += "\nThe other ranks, most likely as a consequence:\n  " + "\n  ".join(others)
        return LaunchError(first, text)

    def _settle(self) -> None:
        """Let the other ranks' reports and exits arrive: until every rank has reported an
        error or exited, for at most ``_SETTLE_S``."""
        deadline = time.monotonic() + _SETTLE_S
        reader = self.errors._reader  # type: ignore[attr-defined]
        while True:
            self._observe()
            pending = [
                p.sentinel
                for rank, p in enumerate(self.processes)
                if p.exitcode is None and rank not in self.reports
            ]
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return
            mp_connection.wait([*pending, reader], timeout=left)

    @staticmethod
    def _how(exitcode: int, pid: int | None) -> str:
        if exitcode == 0:
            return (
                "the process exited (exit code 0) before its function returned, without a "
                "Python traceback (os._exit(0) in it, or a library that ended the process?)"
            )
        if exitcode == _LOST and _process_state(pid) not in (None, "Z", "X"):
            return (
                "lost: the fork server it was started from died (the rank was still running, "
                "and is ended with the launch)"
            )
        how = (
            f"killed by {signal.Signals(-exitcode).name}"
            if exitcode < 0
            else f"exit code {exitcode}"
        )
        return f"the process died ({how}) without a Python traceback"

    def _hung(self, hang_timeout: float) -> LaunchError | None:
        now = time.monotonic()
        running = [r for r, p in enumerate(self.processes) if p.exitcode is None]
        # A rank whose function has returned only waits for the others (heartbeat.finished).
        alive = [r for r in running if self.beats[2 * r] != heartbeat.FINISHED]
        if not alive:
            return None
        since = self._watched_from
        beats = {r: (max(self.beats[2 * r], since), self.beats[2 * r + 1]) for r in alive}
        if all(now - beat <= hang_timeout for beat, _ in beats.values()):
            return None  # (the common case, every poll: no rank's state read)
        counts = {r: count for r, (_, count) in beats.items()}
        behind = min(counts.values())
        # The rank furthest behind is the one the others wait for (in a collective): a hang
        # is that rank silent for hang_timeout. A rank that is ahead and waits is not hung.
        # A stopped rank (SIGSTOP, a debugger) is the one, whatever its count: it may have
        # reached as many phases as one that now waits for it.
        states = {r: _process_state(self.processes[r].pid) for r in alive}
        stopped = [r for r in alive if states[r] in _STOPPED]
        hung = stopped or [r for r in alive if counts[r] == behind]
        if all(now - beats[r][0] <= hang_timeout for r in hung):
            return None
        stacks = self._stacks(hung, states)
        self.terminate()
        quiet = f"made no progress for {max(now - beats[r][0] for r in hung):.1f} s"
        waiting = sorted(set(running) - set(hung))
        if stopped:
            what = f"is stopped (SIGSTOP, or a debugger holds it) and {quiet}"
        elif len(hung) == len(self.processes) > 1:
            what = f"all ranks {quiet}"
        else:
            what = f"{quiet}, behind ranks {waiting} that wait for it"
        what += f" (hang_timeout={hang_timeout:g})"
        if stopped and waiting:
            what += f"; ranks {waiting} wait for it"
        return LaunchError(hung[0], f"{what}.\n{stacks}", hung=hung)

    def _stacks(self, ranks: list[int], states: dict[int, str | None]) -> str:
        """The Python stacks of ``ranks``, each asked to write them; where none came, why
        (by the process's ``states``: a stopped process cannot write them)."""
        if STACKS_SIGNAL is None:  # pragma: no cover - not POSIX
            return ""
        for rank in ranks:
            _signal(self.processes[rank], STACKS_SIGNAL)
        if any(states[rank] not in _STOPPED for rank in ranks):
            time.sleep(_DUMP_WAIT_S)
        parts = []
        for rank in ranks:
            stacks = self._read_stacks(rank) or _NO_STACKS.get(
                states[rank] or "", "(none written: Python code had not started)"
            )
            parts.append(f"Stacks of rank {rank}:\n{stacks}")
        return "\n".join(parts)

    def _read_stacks(self, rank: int) -> str:
        try:
            with open(self._dump_path(rank)) as file:
                return file.read().strip()
        except FileNotFoundError:
            return ""

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        """SIGINT, SIGTERM and SIGHUP sent to the launcher (those of
        :func:`~asynchat._signals.ending_signals`: each where it would end the launcher, not
        one it ignores, as SIGHUP under ``nohup`` and SIGINT in a script's background job,
        nor SIGHUP where the program handles it) passed on to every rank, once
        each time, while the ranks are waited for (``signalled`` lists them: :func:`launch`
        delivers the first to itself once the ranks have ended). The ranks are in process
        groups of their own, so a terminal's Ctrl-C reaches the launcher alone.

        Each rank then ends as the signal makes it: on SIGINT as on Ctrl-C (its step
        completes, its final checkpoint is written), on SIGTERM or SIGHUP as its loop says
        (a graceful stop under :func:`~asynchat.stop_on_signals`, else at once). A second
        signal is passed on too (a second Ctrl-C: the ranks' forced exit), and ranks still
        running :data:`_GRACE_S` seconds after it are terminated (one stuck in a
        collective). Before, a Ctrl-C made the launcher SIGTERM the ranks in the middle of
        their final checkpoint, and a SIGTERM to the launcher alone (a pod's) or a closed
        terminal's SIGHUP ended the ranks with no checkpoint at all. A Ctrl-Z (SIGTSTP)
        holds the ranks while the launcher is stopped (:func:`_stop_holding`). SIGUSR1 and
        SIGUSR2 (:func:`user_signals`) are passed on too, and the launcher goes on: the
        ranks decide what they do (before, a scheduler's SIGUSR1 ended the launcher, and its
        ranks with it, though they would save on it).
        Outside the main thread signals cannot be caught: nothing is forwarded.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def forward(signum: int, frame: object) -> None:
            self.send(signum)

        def pass_on(signum: int, frame: object) -> None:
            self.pass_on(signum)

        previous: dict[int, Any] = {s: signal.signal(s, forward) for s in ending_signals()}
        previous |= {signum: signal.signal(signum, pass_on) for signum in user_signals()}
        if _holds_on_ctrl_z():
            previous[signal.SIGTSTP] = signal.signal(
                signal.SIGTSTP, lambda signum, frame: _stop_holding([self])
            )
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def end_as_signalled(self) -> None:
        """Once the ranks have ended as a signal passed on to them made them: the launcher's
        turn, as if the signal came now (Ctrl-C: ``KeyboardInterrupt``, raised here).

        A signal that ends the process at once (SIGTERM, SIGHUP) skips what a normal exit
        does: the exit functions run first (multiprocessing's removes the fork server's
        socket and its directory, left behind in the temporary directory at every such
        end; logging flushes its handlers)."""
        if self.signalled:
            signum = self.signalled[0]
            if signal.getsignal(signum) is signal.SIG_DFL:
                atexit._run_exitfuncs()
            os.kill(os.getpid(), signum)
            time.sleep(_POLL_S)  # (a handler runs at the next bytecode: never slept through)

    def send(self, signum: int) -> None:
        """``signum`` to every rank still running; from now on each ends as it makes it
        (:meth:`poll` waits for them all rather than terminating the others at a failure)."""
        self.signalled.append(signum)
        if len(self.signalled) == 2:  # a second Ctrl-C forces: the ranks get _GRACE_S more
            self._forced_at = time.monotonic()
        self.pass_on(signum)

    def pass_on(self, signum: int) -> None:
        """``signum`` to every rank still running, for the ranks to act on (by itself, as
        for :data:`USER_SIGNALS`, it ends nothing of the launcher's)."""
        for process in self.processes:
            _signal(process, signum)

    def hold(self) -> None:
        """Ctrl-Z: every rank's loops hold at their next step boundary (``asynchat._hold``)."""
        self.pass_on(signal.SIGTSTP)

    def let_go(self) -> None:
        """After :meth:`hold`: the loops it held go on. While the launcher was stopped, a
        rank not in a loop (starting, or building its data) may have made no progress,
        waiting on the launcher's store: ``hang_timeout`` counts from now (before, a hold
        longer than it had the launcher report every rank hung once it went on)."""
        self._watched_from = time.monotonic()
        self.pass_on(signal.SIGCONT)

    def interrupt(self, grace: float) -> None:
        """SIGINT to every rank still running, as a Ctrl-C; wait up to ``grace`` seconds for
        them to end."""
        self.send(signal.SIGINT)
        deadline = time.monotonic() + grace
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))

    def terminate(self) -> None:
        """Stop the ranks still running (SIGTERM, SIGKILL after a grace period); reap all.
        A stopped rank is continued after the SIGTERM, so that it ends now, not at the SIGKILL."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                _signal(process, signal.SIGCONT)
        deadline = time.monotonic() + _GRACE_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()

    def close(self) -> None:
        """After terminate(): drop the lifelines, the store and the stack files."""
        for reader, writer in self._lifelines:
            reader.close()  # (closed already, unless a rank failed to start)
            writer.close()
        self._lifelines = []
        self._store = None  # (its server stops with the last reference)
        shutil.rmtree(self._dumps, ignore_errors=True)


def _holds_on_ctrl_z() -> bool:
    """Whether a SIGTSTP (a terminal's Ctrl-Z) would stop this process as by default, in
    whose place :func:`_stop_holding` then runs (main thread only, as signals are caught)."""
    return (
        hasattr(signal, "SIGTSTP")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTSTP) is signal.SIG_DFL
    )


def _stop_holding(jobs: Sequence[_Ranks]) -> None:
    """A Ctrl-Z to a launcher: the ranks of ``jobs`` hold (their loops pause at the next step
    boundary, see ``asynchat._hold``), this process stops as SIGTSTP's default action stops
    it, and once continued (``fg``, ``bg``) the ranks go on. Before, the ranks trained on
    while their launcher was stopped (a process group of their own, they never heard of it)."""
    for ranks in jobs:
        ranks.hold()
    ours = signal.signal(signal.SIGTSTP, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until continued
    finally:
        signal.signal(signal.SIGTSTP, ours)
    for ranks in jobs:
        ranks.let_go()


class _SignalRelay:
    """SIGINT, SIGTERM and SIGHUP for :func:`launch_async`, passed on to the ranks of every
    job running (each in a process group of its own, which a terminal's signals do not
    reach), in two cases:

    - SIGTERM and SIGHUP where the program leaves them to end the process (their default
      action), as :func:`launch` passes them on: the process ends by the signal only once
      the ranks have ended as it makes them (a graceful stop, final checkpoints written).
      Before, the process died at once and its ranks with it, through their lifelines.
    - Any of the three that a :func:`~asynchat.stop_on_signals` block catches: it stops the
      program's own loops gracefully, and the ranks as it makes them; each job then returns
      as its ranks end. Before, the block's handler took the place of the relay's (or the
      relay left alone a signal it found the block's): the ranks of a service's launched
      jobs trained on after its pod's SIGTERM until the SIGKILL.

    A program that handles a signal itself (a server's graceful shutdown) keeps it: its
    cancellation of the jobs ends their ranks as a Ctrl-C would. Otherwise SIGINT is the
    event loop's (a ``KeyboardInterrupt`` cancels the job). A SIGTSTP that would stop the
    process (a terminal's Ctrl-Z) holds the ranks of every job until it is continued.
    Signals are caught in the main thread only, where the event loop of a script runs.
    """

    PASSED_ON = frozenset(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self.jobs: list[_Ranks] = []
        # What it listens to (asynchat._signals) while jobs run: SIGTERM and SIGHUP where
        # they would end the process, SIGTSTP where it would stop it.
        self._listened: list[tuple[int, Listener]] = []

    def join(self, ranks: _Ranks) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if not self.jobs:
            self._listened = [
                (s, self._forward) for s in ending_signals()
                if s != signal.SIGINT and disposition(s) is signal.SIG_DFL
            ] + [(s, self._pass_on) for s in user_signals()]  # fmt: skip
            if _holds_on_ctrl_z():
                self._listened.append((signal.SIGTSTP, self._hold))
            for signum, listener in self._listened:
                listen(signum, listener)
            watch(self._forward)
        self.jobs.append(ranks)

    def leave(self, ranks: _Ranks) -> None:
        if ranks not in self.jobs:
            return
        self.jobs.remove(ranks)
        if not self.jobs:
            unwatch(self._forward)
            for signum, listener in self._listened:
                unlisten(signum, listener)
            self._listened = []

    def _forward(self, signum: int) -> None:
        if signum not in self.PASSED_ON:
            return
        graceful = catches(signum)  # (else the process ends by it, once the ranks have)
        for ranks in list(self.jobs):
            if not ranks.signalled:
                ranks.graceful = graceful
            ranks.send(signum)

    def _pass_on(self, signum: int) -> None:
        for ranks in list(self.jobs):
            ranks.pass_on(signum)

    def _hold(self, signum: int) -> None:
        _stop_holding(list(self.jobs))

    async def end_as_signalled(self, ranks: _Ranks) -> None:
        """After ``ranks`` ended as a relayed signal made them: unless the program's loops
        stopped gracefully on it, once every job it reached has ended too, end the process
        by it (the default action, as it came)."""
        if ranks.graceful:
            return
        while any(job.signalled for job in self.jobs):  # noqa: ASYNC110 (polled, as ranks are)
            await anyio.sleep(_POLL_S)
        ranks.end_as_signalled()


_RELAY = _SignalRelay()


def _hosted_store(addr: str, timeout: datetime.timedelta) -> TCPStore:
    """A rendezvous store served by this process on a port the system picks (port 0)."""
    return TCPStore(addr, 0, is_master=True, wait_for_workers=False, timeout=timeout)


def launch(
    fn: RankFn,
    *,
    nprocs: int,
    backend: str | None = None,
    args: Sequence[Any] = (),
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    collective_timeout: datetime.timedelta = datetime.timedelta(minutes=5),
    hang_timeout: float | datetime.timedelta | None = None,
) -> None:
    """Run ``async def fn(rank, world_size, *args)`` in ``nprocs`` processes, one per rank.

    Each process initialises the default process group (``backend``: NCCL with CUDA, else
    gloo; rendezvous on ``master_addr`` through a store served here on a port the system
    picks, or by rank 0 on ``master_port``), selects its CUDA device and runs ``fn`` in an
    event loop of its own (uvloop where available). Ranks import ``fn`` by name as under
    ``spawn`` (on Linux, forked from a server that imported torch: ``_start_method``): define
    it at module level, not under ``if __name__ == "__main__":``. Arguments are checked first.

    If a rank raises or dies, the others are terminated at once (no rank waits out a
    collective) and :class:`LaunchError` is raised naming the first rank to fail, how it
    ended (its traceback, or the exit code or signal), and how the others ended.
    ``collective_timeout`` bounds each collective. ``hang_timeout`` (seconds; off by
    default) bounds how long a rank may go without its loops reaching a phase (a step, an
    epoch end, ...): the rank the others wait for is then reported as hung, with its stacks,
    and so is a job whose ranks all hang (not a loop held by ``pause()``, nor a rank done).
    Set it above the longest stretch without a step: start-up and a full validation included.

    SIGINT, SIGTERM, SIGHUP to the launcher go on to the ranks, which die with it however it dies.
    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT`` set) only this rank runs.
    """
    hang_s = _check_arguments(fn, nprocs, backend, args, master_port, collective_timeout,
                              hang_timeout)  # fmt: skip
    if (placed := _placed(hang_s)) is not None:
        rank, world_size = placed
        run_rank(
            fn, rank, world_size, args, backend=backend or default_backend(),
            timeout=collective_timeout, store=elastic_store(rank, world_size, collective_timeout),
        )  # fmt: skip
        return
    ranks = _start(fn, nprocs, backend, args, master_addr, master_port, collective_timeout, hang_s)
    try:
        with ranks.forwarding():
            while not ranks.poll():
                pass
    finally:
        ranks.terminate()
        ranks.close()
    ranks.end_as_signalled()


async def launch_async(
    fn: RankFn,
    *,
    nprocs: int,
    backend: str | None = None,
    args: Sequence[Any] = (),
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    collective_timeout: datetime.timedelta = datetime.timedelta(minutes=5),
    hang_timeout: float | datetime.timedelta | None = None,
    cancel_grace: float = CANCEL_GRACE_S,
) -> None:
    """:func:`launch` from a running event loop, without blocking it.

    The ranks are watched from a worker thread. Cancelling the awaiting task ends them as
    Ctrl-C would (SIGINT: each rank's step completes and its final checkpoint is written; a
    rank still running after ``cancel_grace`` seconds, 60 by default, is terminated) and
    waits until they are reaped before the cancellation propagates. A SIGTERM or SIGHUP
    that would end the process (no handler of the program's) goes on to the ranks as under
    :func:`launch`, and ends the process once they have ended; so does any of SIGINT,
    SIGTERM, SIGHUP that a :func:`~asynchat.stop_on_signals` block of the process catches,
    and the job then returns once its ranks have ended (:class:`_SignalRelay`).
    Under ``torchrun`` (``RANK``, ``WORLD_SIZE`` set) only this rank runs, in this loop.
    """
    positive_number("cancel_grace", cancel_grace)
    hang_s = _check_arguments(fn, nprocs, backend, args, master_port, collective_timeout,
                              hang_timeout)  # fmt: skip
    if (placed := _placed(hang_s)) is not None:
        await run_rank_here(fn, *placed, args, backend=backend or default_backend(),
                            timeout=collective_timeout)  # fmt: skip
        return
    start = (fn, nprocs, backend, args, master_addr, master_port, collective_timeout, hang_s)
    # Off the event loop: the first launch of a process waits for the fork server to import
    # torch (seconds). Shielded: ranks that have started are always in hand to be ended.
    with anyio.CancelScope(shield=True):
        ranks = await anyio.to_thread.run_sync(_start, *start)
        _RELAY.join(ranks)
    await _watch(ranks, cancel_grace)


async def _watch(ranks: _Ranks, cancel_grace: float) -> None:
    """:func:`launch_async`'s ranks, from their start (``ranks`` joined :data:`_RELAY`)
    until they are reaped."""
    cancelled = False
    try:
        # Each poll waits up to a poll interval on a worker thread; a cancellation takes
        # effect when it returns.
        while not await anyio.to_thread.run_sync(ranks.poll):
            pass
    except anyio.get_cancelled_exc_class():
        cancelled = True
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if cancelled:  # (terminated at once before: no rank wrote its last checkpoint)
                await anyio.to_thread.run_sync(ranks.interrupt, cancel_grace)
            await anyio.to_thread.run_sync(ranks.terminate)
            ranks.close()
            _RELAY.leave(ranks)
    await _RELAY.end_as_signalled(ranks)


def _check_arguments(
    fn: RankFn,
    nprocs: int,
    backend: str | None,
    args: Sequence[Any],
    master_port: int | None,
    collective_timeout: datetime.timedelta,
    hang_timeout: float | datetime.timedelta | None,
) -> float | None:
    """Check launch()'s arguments in the launcher, before any process starts; return the
    hang timeout in seconds."""
    positive_int("nprocs", nprocs)
    _check_fn(fn)
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args must be a tuple or list of extra arguments, got {args!r}")
    _check_picklable("args", tuple(args))
    _check_backend(backend)
    if master_port is not None and (
        not isinstance(master_port, int) or isinstance(master_port, bool)
        or not 1 <= master_port <= 65535
    ):  # fmt: skip
        raise ValueError(f"master_port must be an int in 1..65535 or None, got {master_port!r}")
    if not isinstance(collective_timeout, datetime.timedelta) or collective_timeout <= (
        datetime.timedelta(0)
    ):
        raise TypeError(
            f"collective_timeout must be a positive datetime.timedelta, got {collective_timeout!r}"
        )
    if isinstance(hang_timeout, datetime.timedelta):
        hang_timeout = hang_timeout.total_seconds()
    if hang_timeout is not None and (
        isinstance(hang_timeout, bool) or not isinstance(hang_timeout, (int, float))
        or not hang_timeout > 0
    ):  # fmt: skip
        raise ValueError(
            f"hang_timeout must be a positive number of seconds or None, got {hang_timeout!r}"
        )
    return None if hang_timeout is None else float(hang_timeout)


def _check_fn(fn: RankFn) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be an async function fn(rank, world_size, *args), got {fn!r}")
    call = getattr(fn, "__call__", None)  # noqa: B004 - also an object with async __call__
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)):
        raise TypeError(
            f"fn must be an async function (async def fn(rank, world_size, *args)), got {fn!r}"
        )
    _check_picklable("fn", fn)
    _check_importable(fn)


def _check_picklable(what: str, value: object) -> None:
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"{what} must be picklable, since the ranks receive it pickled (a module-level "
            f"async function and plain arguments): {type(exc).__name__}: {exc}"
        ) from exc


def _check_importable(fn: RankFn) -> None:
    """A function of the script being run (``__main__``) pickles by name, and a rank (a new
    process, which imports the script as under ``spawn``) finds it only if importing the
    script defines it: not when it is defined under the script's ``if __name__ ==
    "__main__":`` guard, nor in an interactive session. Either way every rank died
    unpickling it, before running a line of ours ("exit code 1 without a Python
    traceback")."""
    name = getattr(fn, "__name__", None)
    if getattr(fn, "__module__", None) != "__main__" or not isinstance(name, str):
        return
    script = getattr(sys.modules["__main__"], "__file__", None)
    if script is None:
        raise TypeError(
            f"fn {name!r} is defined in an interactive session, which the ranks (new processes) "
            "cannot import: define it in a module and import it from there"
        )
    try:
        tree = ast.parse(Path(script).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return  # not ours to judge
    guarded = [node for node in tree.body if _is_main_guard(node)]
    at_top = {bound for node in tree.body if node not in guarded for bound in _bound(node)}
    in_guard = {bound for node in guarded for bound in _bound(node)}
    if name in in_guard and name not in at_top:
        raise TypeError(
            f'fn {name!r} is defined under the `if __name__ == "__main__":` guard of '
            f"{script}, which the ranks (new processes) import without running that "
            "block: define it at the module's top level, above the guard"
        )


def _is_main_guard(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _bound(node: ast.AST) -> Iterator[str]:
    """The names a statement binds at its own level, through nested blocks (if, try, with,
    for), not inside the functions and classes it defines."""
    if isinstance(node, _SCOPES):
        yield node.name
        return
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        yield node.id
    elif isinstance(node, ast.alias):
        yield (node.asname or node.name).split(".")[0]
    for child in ast.iter_child_nodes(node):
        yield from _bound(child)


def _check_backend(backend: str | None) -> None:
    """``backend`` must name process-group backends this torch has (``"gloo"``, or a device
    map such as ``"cpu:gloo,cuda:nccl"``); every rank failed in ``init_process_group``."""
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str (e.g. 'gloo' or 'nccl') or None, got {backend!r}")
    names = [part.split(":")[-1].strip() for part in backend.split(",")]
    if not all(names):
        raise ValueError(
            f"backend={backend!r} names no backend where one is due: e.g. 'gloo', 'nccl' or "
            "'cpu:gloo,cuda:nccl' (None: NCCL with CUDA, else gloo)"
        )
    available = getattr(dist, "is_backend_available", None)  # (torch >= 2.2; one may lack it)
    if available is None:
        return  # the ranks' own error will say it
    missing = [name for name in names if not available(name)]
    if missing:
        have = [b for b in ("gloo", "nccl", "mpi", "ucc", "xccl") if available(b)]
        raise ValueError(
            f"backend={backend!r}: this torch build has no {' or '.join(map(repr, missing))} "
            f"backend (available: {', '.join(have) or 'none'})"
        )


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _start(
    fn: RankFn,
    nprocs: int,
    backend: str | None,
    args: Sequence[Any],
    master_addr: str,
    master_port: int | None,
    timeout: datetime.timedelta,
    hang_timeout: float | None,
) -> _Ranks:
    _check_master_addr(master_addr)
    return _Ranks(
        fn, nprocs, args, backend or default_backend(), timeout, master_addr, master_port,
        hang_timeout,
    )  # fmt: skip


def _check_master_addr(addr: str) -> None:
    """ValueError unless ``addr`` is an address of this machine: the ranks' rendezvous is
    served there (by the launcher or rank 0, both here). Before, an address of another
    machine (a typo) failed the launch only after ``collective_timeout`` (5 minutes), with
    torch's connection timeout. (Off the event loop: resolving a name may wait on DNS.)"""
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"master_addr must be a host name or address, got {addr!r}")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.bind(address)
    except OSError as exc:
        raise ValueError(
            f"master_addr={addr!r} is no address of this machine ({exc}): launch starts "
            "every rank here and serves their rendezvous there. Give one of its addresses "
            "(127.0.0.1 by default); for several machines, run the script under torchrun"
        ) from None
