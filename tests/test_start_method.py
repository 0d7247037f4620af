"""How launch() starts its ranks: forked from a server that imported torch once (Linux),
given the launcher's environment and stdout/stderr as they are at each launch."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import rank_jobs
from test_launch import alive, rank_processes

from asynchat import LaunchError, _start_method, launch, launch_async

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="ranks fork from a server on Linux only"
)
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def as_the_server_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables read at import as the fork server has them, if it runs (started by an
    earlier test of this process, perhaps under another environment), so that these
    launches fork unless a test changes one."""
    server = _start_method._server_start
    if server is None:
        return
    for name in [name for name in os.environ if _start_method._read_at_import(name)]:
        if name not in server:
            monkeypatch.delenv(name)
    for name, value in server.items():
        if _start_method._read_at_import(name):  # (not the process's own attributes)
            monkeypatch.setenv(name, value)


def started(directory: Path, names: list[str] = []) -> list[dict[str, object]]:  # noqa: B006
    directory.mkdir()
    launch(rank_jobs.report_start, nprocs=2, args=(str(directory), names))
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_fork_from_one_server_that_has_torch_loaded(tmp_path: Path) -> None:
    """A spawned rank imported torch itself, at every launch (2.5 s of CPU each here)."""
    first, second = started(tmp_path / "first"), started(tmp_path / "second")
    parents = {report["parent"] for report in first + second}
    assert len(parents) == 1 and os.getpid() not in parents, parents
    assert all(report["parent_has_torch"] for report in first + second)
    # ... and what DDP and FSDP import as they wrap a model (import asynchat leaves it out),
    # and what the first optimizer imports (torch._dynamo: half a second of each rank's start).
    assert all(report["dtensor_loaded"] for report in first + second)
    assert all(report["dynamo_loaded"] for report in first + second)
    # ... all of it frozen: a rank's full collections neither walk it nor copy its pages.
    assert all(report["frozen"] > 100_000 for report in first + second)
    # The server ignores SIGTERM and SIGHUP (a group's must not end it); the ranks handle
    # them as this process does.
    assert all(report["parent_ignores_sigterm"] for report in first + second)
    assert all(report["parent_ignores_sighup"] for report in first + second)
    assert {report["sigterm"] for report in first + second} == {str(signal.SIG_DFL)}
    sighup = str(signal.getsignal(signal.SIGHUP))  # (SIG_IGN under nohup)
    assert {report["sighup"] for report in first + second} == {sighup}
    # Each seeds torch from the OS, as a new interpreter does (all had the server's seed).
    assert len({report["torch_seed"] for report in first + second}) == 4


def test_ranks_take_the_launchers_environment_as_it_is_at_each_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's environment is the one it started with: set, changed or removed since,
    each variable is as the launcher has it now (the server's alone would be stale)."""
    names = ["ASYNCHAT_SET", "ASYNCHAT_CHANGED", "ASYNCHAT_REMOVED"]
    monkeypatch.setenv("TZ", "BEF+5")  # (a POSIX time zone: name and offset, no tzdata)
    monkeypatch.setenv("ASYNCHAT_CHANGED", "before")
    monkeypatch.setenv("ASYNCHAT_REMOVED", "before")
    before = started(tmp_path / "before", names)
    assert before[0]["env"] == {"ASYNCHAT_SET": None, "ASYNCHAT_CHANGED": "before",
                                "ASYNCHAT_REMOVED": "before"}  # fmt: skip
    monkeypatch.setenv("ASYNCHAT_SET", "now")
    monkeypatch.setenv("ASYNCHAT_CHANGED", "now")
    monkeypatch.delenv("ASYNCHAT_REMOVED")
    monkeypatch.setenv("TZ", "AFT-9")  # (the time module had read it as torch loaded)
    after = started(tmp_path / "after", names)
    assert {report["parent"] for report in after} == {before[0]["parent"]}  # the same server
    for report in after:
        assert report["env"] == {
            "ASYNCHAT_SET": "now", "ASYNCHAT_CHANGED": "now", "ASYNCHAT_REMOVED": None
        }  # fmt: skip
        assert report["tzname"] == "AFT"
    assert [report["tzname"] for report in before] == ["BEF", "BEF"]


def test_a_variable_read_at_import_that_changed_makes_the_launch_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """OMP_NUM_THREADS is read as the OpenMP runtime loads: a server started without it
    has the thread pool's size of then. Ranks given another spawn, and have it."""
    started(tmp_path / "server")  # (the server runs, with this environment's value)
    assert _start_method._server_start is not None
    threads = "1" if _start_method._server_start.get("OMP_NUM_THREADS") != "1" else "2"
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    with caplog.at_level(logging.INFO, logger="asynchat.launch"):
        reports = started(tmp_path / "changed", ["OMP_NUM_THREADS"])
    assert "ranks spawned: OMP_NUM_THREADS changed since the fork server started" in caplog.text
    for report in reports:
        assert report["parent"] == os.getpid()  # spawned by this process
        assert report["sigterm"] == str(signal.SIG_DFL)
        assert report["env"] == {"OMP_NUM_THREADS": threads}
        assert report["threads"] == int(threads)


def test_ranks_write_to_the_launchers_stdout_and_stderr_as_they_are_at_each_launch(
    tmp_path: Path,
) -> None:
    """A launcher that redirects its output after the server started (a service's log
    file): the ranks' output goes where the launcher's goes at their launch, not where
    the server's went."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    run = subprocess.run(
        [sys.executable, str(HERE / "start_method_job.py"), str(out), str(err)],
        cwd=HERE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for stream, redirected, name in ((run.stdout, out, "stdout"), (run.stderr, err, "stderr")):
        for rank in range(2):
            assert f"rank {rank} says first on {name}" in stream, stream
            assert f"rank {rank} says second on {name}" in redirected.read_text()
            assert f"rank {rank} says third on {name}" in stream, stream
        assert "second" not in stream and "first" not in redirected.read_text()


LAUNCH_ASYNC_FIRST = """
import sys, time
import anyio
import rank_jobs
from asynchat import launch_async

async def main():
    gaps, last = [], time.monotonic()

    async def ticker():
        nonlocal last
        while True:
            await anyio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await launch_async(rank_jobs.all_reduce_rank, nprocs=2, args=(sys.argv[1],))
        tg.cancel_scope.cancel()
    print(max(gaps))

anyio.run(main)
"""


def test_the_first_launch_async_of_a_process_keeps_the_event_loop_running(
    tmp_path: Path,
) -> None:
    """The first launch waits for the fork server to import torch (2 s here): on the event
    loop, that was a 2 s stall of everything else it serves."""
    run = subprocess.run(
        [sys.executable, "-c", LAUNCH_ASYNC_FIRST, str(tmp_path)],
        cwd=HERE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(list(tmp_path.glob("rank*.txt"))) == 2
    assert float(run.stdout) < 0.5, f"the event loop stalled {float(run.stdout):.2f} s"


def test_ranks_take_the_launchers_umask_as_it_is_at_each_launch(tmp_path: Path) -> None:
    """A launcher that set ``umask 077`` after the server started (to keep its checkpoints
    private) had its ranks create files as the server's umask let them."""
    started(tmp_path / "server")  # (the server runs, with this process's umask)
    before = os.umask(0o077)
    try:
        reports = started(tmp_path / "private")
    finally:
        os.umask(before)
    assert os.getpid() not in {report["parent"] for report in reports}  # (forked)
    assert [report["umask"] for report in reports] == [0o077, 0o077]


@pytest.mark.parametrize("what", ["the CPU affinity", "the RLIMIT_NOFILE limit"])
def test_a_process_attribute_that_changed_makes_the_launch_spawn(
    tmp_path: Path, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A forked rank keeps the server's CPU affinity's thread pool (OpenMP sized it as torch
    loaded: 2 threads pinned to 1 CPU) and cannot raise back its resource limits: a launch
    whose launcher changed them since spawns its ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if what == "the CPU affinity" and len(cpus) < 2:
        pytest.skip("needs 2 CPUs to pin to one")
    started(tmp_path / "server")  # (the server runs, started as this process is now)
    try:
        if what == "the CPU affinity":
            os.sched_setaffinity(0, cpus[:1])
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits[0] - 1, limits[1]))
        with caplog.at_level(logging.INFO, logger="asynchat.launch"):
            reports = started(tmp_path / "changed")
    finally:
        os.sched_setaffinity(0, cpus)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert f"ranks spawned: {what} changed since the fork server started" in caplog.text
    for report in reports:
        assert report["parent"] == os.getpid()  # spawned by this process
        if what == "the CPU affinity":
            assert report["affinity"] == cpus[:1] and report["threads"] == 1
        else:
            assert report["nofile"] == [limits[0] - 1, limits[1]]


def run_script(script: Path, source: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``source`` written to ``script`` and run with ``args`` in a new interpreter that can
    import this directory's modules (``rank_jobs``); it must exit with 0."""
    script.write_text(source)
    run = subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(HERE)},
    )  # fmt: skip
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    return run


TORN_DOWN = """
import atexit, os, sys
atexit.register(lambda: print(f"torn down in {os.getpid()}", file=sys.stderr, flush=True))
"""

REPORTING_LAUNCHER = """
import os, sys
import rank_jobs
from asynchat import launch

if __name__ == "__main__":
    launch(rank_jobs.report_start, nprocs=2, args=(sys.argv[1], []))
    print(os.getpid())
"""


def test_the_fork_server_ends_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """Regression: with torch 2.15's CUDA build, every launch's end printed some 30 lines
    of ``nanobind: leaked ...`` after the launcher had returned: the fork server (which
    imported torch._dynamo, and with it triton) ended by the interpreter's whole teardown,
    where triton's extension reports what it never freed. The server now ends at its own
    exit handler. Shown with an exit handler registered as a process starts (this
    ``sitecustomize``), which runs after the server's: in the launcher, not the server."""
    (tmp_path / "sitecustomize.py").write_text(TORN_DOWN)
    (tmp_path / "launcher.py").write_text(REPORTING_LAUNCHER)
    run = subprocess.run(
        [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{tmp_path}"},
    )  # fmt: skip  (the pipes close once the server, which holds them too, has ended)
    assert run.returncode == 0, run.stderr[-3000:]
    launcher = int(run.stdout.split()[-1])
    (server,) = {json.loads((tmp_path / f"rank{r}.json").read_text())["parent"] for r in (0, 1)}
    torn_down = [int(pid) for pid in re.findall(r"torn down in (\d+)", run.stderr)]
    assert server != launcher and launcher in torn_down, run.stderr[-3000:]
    assert server not in torn_down, run.stderr[-3000:]


OTHER_FORK_SERVER = """
import multiprocessing, sys

import rank_jobs

import asynchat  # (imported in each process this script's fork server starts)

if __name__ == "__main__":
    process = multiprocessing.get_context("forkserver").Process(
        target=rank_jobs.report_sigterm, args=(sys.argv[1],)
    )
    process.start()
    process.join()
"""


def test_a_fork_server_of_someone_elses_keeps_its_sigterm(tmp_path: Path) -> None:
    """Only the server that launch() configured ignores SIGTERM: another (a DataLoader's)
    and the processes it starts, which import asynchat under its frames, keep it."""
    out = tmp_path / "ignored.txt"
    run_script(tmp_path / "other.py", OTHER_FORK_SERVER, out)
    assert out.read_text() == "False False"  # neither the server nor its process ignores it


SOMEONE_ELSES_FIRST = """
import multiprocessing, sys
import rank_jobs
from asynchat import launch

if __name__ == "__main__":
    process = multiprocessing.get_context("forkserver").Process(target=print, args=("hi",))
    process.start()
    process.join()
    launch(rank_jobs.report_start, nprocs=2, args=(sys.argv[1], []))
    print(__import__("os").getpid())
"""


def test_ranks_spawn_when_someone_elses_fork_server_runs(tmp_path: Path) -> None:
    """A fork server started before the first launch (a DataLoader's, in the launcher) is
    not configured: torch not loaded, SIGTERM not ignored. The ranks are spawned."""
    run = run_script(tmp_path / "first.py", SOMEONE_ELSES_FIRST, tmp_path)
    launcher = int(run.stdout.split()[-1])
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["parent"] == launcher


LONG_TMPDIR = """
import logging, os, sys
os.environ["TMPDIR"] = sys.argv[2]  # (before anything reads it)
import rank_jobs
from asynchat import launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch(rank_jobs.report_start, nprocs=2, args=(sys.argv[1], []))
    print(os.getpid())
"""


def test_a_tmpdir_too_long_for_the_servers_socket_makes_the_launch_spawn(tmp_path: Path) -> None:
    """The fork server listens on a Unix socket in TMPDIR, whose path may have 107 bytes at
    most: a launcher with a longer TMPDIR (a cluster job's) failed every launch with
    ``OSError: AF_UNIX path too long``. Its ranks spawn now, and the log says why."""
    temporary = tmp_path / ("t" * max(1, 80 - len(str(tmp_path))))
    temporary.mkdir()
    assert len(str(temporary)) > 75  # (+ /pymp-XXXXXXXX/listener-XXXXXXXX: over 107)
    run = run_script(tmp_path / "long.py", LONG_TMPDIR, tmp_path, temporary)
    launcher = int(run.stdout.split()[-1])
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["parent"] == launcher
    assert "ranks spawned: the fork server's socket in " in run.stderr, run.stderr[-2000:]


FORKED_LAUNCHER = """
import multiprocessing, os, sys
from pathlib import Path
import rank_jobs
from asynchat import launch

def child(directory):
    launch(rank_jobs.report_start, nprocs=2, args=(directory, []))
    Path(directory, "launcher").write_text(str(os.getpid()))

if __name__ == "__main__":
    first, second = sys.argv[1:]
    launch(rank_jobs.report_start, nprocs=2, args=(first, []))
    process = multiprocessing.get_context("fork").Process(target=child, args=(second,))
    process.start()
    process.join()
    sys.exit(process.exitcode)
"""


FORKED_WHILE_LOCKED = """
import multiprocessing, os, sys, threading
from pathlib import Path
import rank_jobs
from asynchat import _start_method, launch

def child(directory):
    launch(rank_jobs.report_start, nprocs=2, args=(directory, []))

if __name__ == "__main__":
    held, release = threading.Event(), threading.Event()

    def hold():  # (a thread of the launcher's inside rank_context() as the fork happens)
        with _start_method._lock:
            held.set()
            release.wait()

    threading.Thread(target=hold).start()
    held.wait()
    process = multiprocessing.get_context("fork").Process(target=child, args=(sys.argv[1],))
    process.start()
    process.join(60)
    release.set()
    if process.exitcode is None:  # (it waits for the lock: it would hold this exit up)
        process.kill()
        sys.exit("the forked process's launch still waited after 60 s")
    sys.exit(process.exitcode)
"""


def test_a_process_forked_while_a_launch_starts_can_launch(tmp_path: Path) -> None:
    """The child of a fork made while another thread was choosing how to start its ranks
    inherited the lock that thread held, and its own launch waited for it forever."""
    run_script(tmp_path / "forked.py", FORKED_WHILE_LOCKED, tmp_path)
    assert len(list(tmp_path.glob("rank*.json"))) == 2


def test_a_process_forked_from_a_launcher_can_launch(tmp_path: Path) -> None:
    """A process forked from a launcher whose fork server runs (``multiprocessing``'s
    default on Linux before 3.14, a service's worker) took that server for its own, and its
    launch failed at once: ChildProcessError (multiprocessing waits for the server as for a
    child). Its ranks are spawned."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    run_script(tmp_path / "forked.py", FORKED_LAUNCHER, first, second)
    launcher = int((second / "launcher").read_text())
    for rank in range(2):
        assert json.loads((second / f"rank{rank}.json").read_text())["parent"] == launcher


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_ranks_lost_with_their_fork_server_are_named_so_and_ended() -> None:
    """Killed (the OOM killer), the server takes with it what the launcher knows of its
    ranks: each reads as exited with code 255 while it still runs. The error says so, and
    the ranks end with the launch (their lifelines)."""
    errors: list[BaseException] = []

    async def launched() -> None:
        try:
            await launch_async(rank_jobs.sleep_forever, nprocs=2)
        except LaunchError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(launched)
        with anyio.fail_after(60):
            while len(pids := [p.pid for p in rank_processes()]) < 2:  # noqa: ASYNC110 - other processes
                await anyio.sleep(0.05)
        parents = {parent(pid) for pid in pids if pid is not None}
        assert len(parents) == 1 and os.getpid() not in parents, parents
        os.kill(parents.pop(), signal.SIGKILL)
    assert len(errors) == 1 and "lost: the fork server it was started from died" in str(errors[0])
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids if pid is not None):
        assert time.monotonic() < deadline, "a lost rank outlived its launch"
        await anyio.sleep(0.05)


def parent(pid: int) -> int:
    """The parent of running process ``pid``."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


TWO_AT_ONCE = """
import json, sys
from pathlib import Path
import anyio
import rank_jobs
from asynchat import launch_async

async def main(out):
    async with anyio.create_task_group() as tg:
        for job in ("a", "b"):
            Path(out, job).mkdir()
            tg.start_soon(lambda job=job: launch_async(
                rank_jobs.report_start, nprocs=2, args=(str(Path(out, job)), [])
            ))

anyio.run(main, sys.argv[1])
"""


def test_two_jobs_launched_at_once_as_a_process_first_share_one_server(tmp_path: Path) -> None:
    """A service's first two jobs, started together: both race to start the fork server."""
    run = subprocess.run(
        [sys.executable, "-c", TWO_AT_ONCE, str(tmp_path)],
        cwd=HERE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    reports = [
        json.loads((tmp_path / job / f"rank{rank}.json").read_text())
        for job in "ab"
        for rank in range(2)
    ]
    assert len({report["parent"] for report in reports}) == 1
    assert all(report["parent_has_torch"] for report in reports)
