"""How launch() starts its rank processes: from a fork server that has imported torch once.

A spawned rank is a fresh interpreter that imports torch (about 2.5 s of CPU on a small
machine, per rank, per launch). On Linux the ranks are forked instead from
multiprocessing's fork server, started once per launcher process with torch and asynchat
imported: a launch after the first starts its ranks in a fraction of a second. Nothing
else changes for the ranks: the job function and its arguments are pickled and the
script's modules imported as under ``spawn`` (the same rules: ``fn`` defined at a module's
top level), and each rank is given what a spawned one inherits at its start:

- the launcher's environment as it is at this launch (the server's is the one of its
  start, so each rank takes the launcher's over at once, and reads ``TZ`` again).
  Variables that libraries read when they are imported (``OMP_NUM_THREADS``, ``MKL_*``,
  ``TORCH_LOGS``, ...: those in :data:`READ_AT_IMPORT`) cannot be taken over after the
  import: when one of them differs from what the server started with, the launch spawns
  its ranks as before;
- the launcher's stdout and stderr as they are at this launch (a redirection made after
  the server started included), and its umask (``umask 077`` set to keep checkpoints
  private);
- the launcher's CPU affinity, niceness and resource limits as they are at this launch.
  A forked rank has the server's and cannot take these over (OpenMP sized torch's thread
  pool by the affinity as torch loaded; a limit or a niceness lowered cannot be raised
  back without privileges): a launch whose launcher changed one since the server started
  spawns its ranks, as for :data:`READ_AT_IMPORT`;
- a seed of torch's default generator of its own, drawn from the OS as a new interpreter
  draws it (Python's ``random`` is reseeded by CPython at a fork);
- the server's objects frozen (``gc.freeze()`` once its preloads are in): a rank's full
  garbage collections walk only what the rank made, neither pausing it for the ~300,000
  objects of torch and its compiler nor copying their pages out of the memory the ranks
  share (``benchmarks/rank_pauses.py``);
- SIGTERM and SIGHUP as the launcher had them when the server started. The server itself
  ignores them (CPython's ignores SIGINT): it is in the launcher's process group, and a
  SIGTERM to the group (``kill %1``, ``timeout``, systemd) or a closed terminal's SIGHUP
  killed it, after which every rank it had forked looked dead to the launcher (exit code
  255), which then left before its ranks could write their final checkpoints. Each
  process the server forks takes them back as it starts; until then they are blocked
  (SIGINT too), so one passed on to a rank that is starting waits for it, not lost.

The fork server is CPython's own (``multiprocessing.forkserver``), shared with anything
else in the process that uses it (if something else started it before the first launch,
the ranks are spawned: that one has its own preloads and signal handling); it ends with
the launcher process, and removes its socket from ``TMPDIR`` then (a launcher killed by
SIGKILL cannot). A process forked from the launcher (``os.fork``, multiprocessing's
``fork``) spawns its ranks, as does one whose ``TMPDIR`` is too long a path for the
server's socket (:func:`_no_room_for_the_socket`), and other systems than Linux (macOS,
Windows).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing import forkserver, reduction, util
from multiprocessing.context import BaseContext
from typing import Any

import torch
import torch.multiprocessing as mp

from asynchat._preload import FIRST_TRAINING_IMPORTS

#: The modules the fork server imports once, so that no rank imports them again: with
#: torch and asynchat, what a rank's model imports as it is wrapped (DDP imports DTensor,
#: FSDP2 ``fully_shard``: half a second of each rank's start, which ``import asynchat``
#: leaves to the jobs that need them) and what its first optimizer imports (half a second
#: more: see :func:`asynchat.preload`).
PRELOAD = (
    "torch", "torch.distributed.fsdp", *FIRST_TRAINING_IMPORTS, "asynchat",
    __name__,  # (this module: see the end)
)  # fmt: skip
#: Environment variables (by prefix, then by name) that a library reads when it is imported
#: or loaded: the OpenMP and BLAS thread pools, the C allocator and loader,
#: Python's own, torch's logging. The rest (``CUDA_VISIBLE_DEVICES``, ``NCCL_*``,
#: ``PYTORCH_CUDA_ALLOC_CONF``, ...) are read when first used, after a rank has taken the
#: launcher's environment over; some are set by torch itself as it works (inductor's
#: ``TORCHINDUCTOR_CACHE_DIR``; scikit-learn's import sets Intel OpenMP's ``KMP_*``, which
#: torch's wheels do not load), and must not make every later launch spawn.
READ_AT_IMPORT = (
    ("OMP_", "GOMP_", "MKL_", "OPENBLAS_", "BLIS_", "VECLIB_", "NUMEXPR_", "DNNL_", "ONEDNN_",
     "LD_", "MALLOC_", "PYTHON"),
    {"TORCH_LOGS", "TORCH_CPP_LOG_LEVEL", "TORCH_SHOW_CPP_STACKTRACES",
     "TORCH_USE_RTLD_GLOBAL", "PYTORCH_JIT"},
)  # fmt: skip

#: The signals the server ignores: a process group's (see the module).
_GROUP_SIGNALS = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
_ENDING = (signal.SIGINT, *_GROUP_SIGNALS)  # blocked in the server (see _Server)
_SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (Linux's sun_path, less its NUL)
_LOG = logging.getLogger("asynchat.launch")
_lock = threading.Lock()
_server_start: dict[str, str] | None = None  # what _inherited() was as the server started
_server_owner: int | None = None  # the process that configured it (not one forked from it)


def _renew_lock() -> None:
    """In a forked child: a lock of its own (the parent's may have been held by a thread of
    the parent's as it forked, which the child does not have: it would wait forever)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock)


def rank_context() -> BaseContext:
    """The multiprocessing context to start this launch's ranks from (see the module)."""
    global _server_start, _server_owner
    if not sys.platform.startswith("linux") or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    start = _inherited()
    with _lock:
        if _server_owner not in (None, os.getpid()):
            # Forked (os.fork, multiprocessing's "fork") from a launcher whose server runs:
            # multiprocessing takes that server for this process's own, and fails to reach it.
            _LOG.info("ranks spawned: this process was forked from a launcher")
            return mp.get_context("spawn")
        if _server_start is None:  # the first launch: the server starts as this process is
            if _someone_elses_server():
                _LOG.info("ranks spawned: a fork server launch() did not start runs")
                return mp.get_context("spawn")
            if (no_socket := _no_room_for_the_socket()) is not None:
                _LOG.info("ranks spawned: %s", no_socket)
                return mp.get_context("spawn")
            _server_start, _server_owner = start, os.getpid()
            mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
        if start == _server_start:
            return mp.get_context("forkserver")
        changed = sorted(
            k for k in start.keys() | _server_start.keys()
            if start.get(k) != _server_start.get(k)
        )  # fmt: skip
    _LOG.info("ranks spawned: %s changed since the fork server started", ", ".join(changed))
    return mp.get_context("spawn")


def _inherited() -> dict[str, str]:
    """What a rank inherits from its launcher that it cannot take over once started: the
    environment's :data:`READ_AT_IMPORT` variables; the CPU affinity (OpenMP sizes torch's
    thread pool by it as it loads); the niceness and the resource limits (raised back, or
    a hard one raised, only with privileges). The umask is taken over (:class:`LauncherState`)."""
    import resource  # (POSIX only: here only on Linux, where ranks can fork)

    state = {k: v for k, v in os.environ.items() if _read_at_import(k)}
    state["the CPU affinity"] = str(sorted(os.sched_getaffinity(0)))
    state["the niceness"] = str(os.getpriority(os.PRIO_PROCESS, 0))
    limits: dict[int, str] = {}  # (one name each: RLIMIT_OFILE is RLIMIT_NOFILE)
    for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
        limits.setdefault(getattr(resource, name), name)
    for limit, name in limits.items():
        with contextlib.suppress(OSError, ValueError):
            state[f"the {name} limit"] = str(resource.getrlimit(limit))
    return state


def _someone_elses_server() -> bool:
    """Whether a fork server runs that this module did not configure (before its first
    launch): it has its own preloads, and does not ignore SIGTERM."""
    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None


def _no_room_for_the_socket() -> str | None:
    """Why the fork server could not listen, or None. Its socket, ``listener-XXXXXXXX`` in
    a directory multiprocessing makes in the temporary one (``$TMPDIR/pymp-XXXXXXXX``),
    needs a path of at most :data:`_SOCKET_PATH_MAX` bytes: a ``TMPDIR`` over 75 made every
    launch fail with ``OSError: AF_UNIX path too long`` (a cluster's scheduler sets a long
    one per job; Python 3.14 puts the directory in ``/tmp`` then), where spawned ranks
    start well. Told from the name alone: nothing is created (a launcher killed by SIGKILL
    would leave it behind)."""
    try:
        directory = os.path.join(tempfile.gettempdir(), "pymp-XXXXXXXX")
    except OSError as exc:  # (no temporary directory that can be written to)
        return f"the fork server has no temporary directory for its socket ({exc})"
    length = len(os.fsencode(os.path.join(directory, "listener-XXXXXXXX")))
    if length <= _SOCKET_PATH_MAX:
        return None
    return (
        f"the fork server's socket in {os.path.dirname(directory)} would have a path of "
        f"{length} bytes, over the {_SOCKET_PATH_MAX} a Unix socket may have (a shorter "
        "TMPDIR lets ranks fork, which start faster)"
    )


def _read_at_import(name: str) -> bool:
    prefixes, names = READ_AT_IMPORT
    return name.startswith(prefixes) or name in names


class LauncherState:
    """What a rank inherits from its launcher at the rank's start, whichever way it starts:
    the environment and the stdout and stderr file descriptors. Pass it to the rank's
    process (pickled as the process starts) and call :meth:`apply` first thing there."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        umask: int | None = None,
        fds: dict[int, Any] | None = None,
    ):
        self.env = dict(os.environ) if env is None else env
        self.umask = _umask() if env is None else umask
        self._fds = fds or {}  # in the rank: its descriptor for each of the launcher's

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as the process starts: reduction.DupFd hands each descriptor to the child
        # (through the fork server, or inherited by a spawned child), if it is open.
        fds = {}
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:
                continue  # (closed in the launcher: the rank keeps what it has)
            fds[fd] = reduction.DupFd(fd)
        return (LauncherState, (self.env, self.umask, fds))

    def apply(self) -> None:
        """In the rank: the launcher's environment, umask and stdout/stderr, in place of its
        own (a launcher that set ``umask 077`` to keep its checkpoints private, after the
        server started, had them written as the server's umask let them)."""
        if os.environ != self.env:
            zone = os.environ.get("TZ")
            os.environ.clear()
            os.environ.update(self.env)
            if os.environ.get("TZ") != zone and hasattr(time, "tzset"):  # (POSIX only)
                time.tzset()  # (the time module and the C library read TZ as torch loaded)
        if self.umask is not None:
            os.umask(self.umask)
        for target, duplicate in self._fds.items():
            fd = duplicate.detach()
            if fd != target:  # (a spawned rank inherited it as it is)
                (sys.stdout if target == 1 else sys.stderr).flush()
                os.dup2(fd, target)
                os.close(fd)


def _umask() -> int | None:
    """This process's umask, read without changing it (``os.umask`` sets one: for a moment
    another thread would create its files with the other), where Linux says it."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1], 8)


def _our_fork_server() -> dict[str, Any] | None:
    """The local variables of ``multiprocessing.forkserver.main`` when the fork server that
    :func:`rank_context` configured is importing this module as one of its preloads; None
    in any other process (another server, a process one forks: its imports run under the
    server's ``main`` too) importing asynchat."""
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
        if frame.f_code.co_name == "main" and (
            frame.f_globals.get("__name__") == "multiprocessing.forkserver"
        ):
            return frame.f_locals if __name__ in frame.f_locals.get("preload", ()) else None
    return None


def _socket_path(listener_fd: object) -> str | None:
    """The file of the server's listening socket (in a ``pymp-*`` directory of
    multiprocessing's), if it has one (an abstract socket has none)."""
    if not isinstance(listener_fd, int):
        return None
    try:
        with socket.socket(fileno=os.dup(listener_fd)) as listener:
            address = listener.getsockname()
    except OSError:
        return None
    if not isinstance(address, str) or not address.startswith(os.sep):
        return None
    return address if os.path.basename(os.path.dirname(address)).startswith("pymp-") else None


class _Server:
    """In the fork server: the handling of SIGTERM and SIGHUP before the server ignored
    them, which each process the server forks takes back as it starts (its after-fork
    hook), drawing a seed of its own for torch's default generator.

    The server also blocks SIGINT, SIGTERM and SIGHUP, and so does each process it forks
    until it has taken them back: one sent to a rank that is starting (a Ctrl-C or a
    cancellation right after a launch) waits for it, rather than meeting the server's
    ``SIG_IGN`` and being lost. Before, such a rank ran on: a cancelled ``launch_async``
    waited out its ``cancel_grace`` in 4 of 15 tries here, a passed-on SIGTERM was
    never heard and the launcher waited for the rank forever.
    """

    def __init__(self, listener_fd: object) -> None:
        self.pid = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING)
        self.previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _GROUP_SIGNALS}
        self.socket = _socket_path(listener_fd)
        atexit.register(self.leave)

    def leave(self) -> None:
        """As the server exits, which it does once its launcher has ended (its pipe from the
        launcher is closed): remove its socket and the directory multiprocessing made for it,
        if empty (a launcher removes them as it exits; one killed by SIGKILL left them in
        ``TMPDIR``, one more directory at each such end), then end the process here.

        The rest of an exit is the interpreter's teardown, which frees what the server
        imported, and some of it reports there: with torch 2.15's CUDA build, whose
        ``torch._dynamo`` imports triton, triton's extension wrote some 30 lines of
        ``nanobind: leaked ...`` to the terminal at every launch's end, after the launcher
        had returned. Nothing of the server needs it: its ranks are processes of their own.
        (Exit handlers registered before this one, at start-up, are skipped with it.)"""
        if os.getpid() != self.pid:  # (a process forked from the server inherits this)
            return
        if self.socket is not None:
            with contextlib.suppress(OSError):  # (gone already: the launcher exited as usual)
                os.unlink(self.socket)
            with contextlib.suppress(OSError):  # (not empty: something of the launcher's left)
                os.rmdir(os.path.dirname(self.socket))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # (closed, or a pipe whose reader left)
                stream.flush()
        os._exit(0)

    def take_back(self) -> None:
        if os.getppid() == self.pid:  # (not in a process that one of those forks in turn)
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            # A fresh interpreter seeds torch's default generator from the OS; a forked one
            # has the server's: every rank of every launch drew the same numbers.
            torch.default_generator.seed()
        if signal.SIGINT in signal.sigpending():  # told to end as it began: it ends, with
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # no step to complete (no traceback)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ENDING)  # (a pending one is heard now)


_main = _our_fork_server()
if _main is not None:
    _server = _Server(_main.get("listener_fd"))
    util.register_after_fork(_server, _Server.take_back)
    # The preloads are in (this module is the last): frozen, see the module's docstring.
    gc.collect()
    gc.freeze()
del _main
