"""launch() and launch_async(): real gloo process groups in real processes."""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import rank_jobs
import torch
import torch.distributed as dist
from conftest import finished, wait_for_line, wait_until

import asynchat._launch
from asynchat import LaunchError, launch, launch_async
from asynchat._launch import _process_state as process_state
from asynchat._launch import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """An empty directory for a launcher's TMPDIR, short enough a path for its fork server's
    socket (``tmp_path`` under pytest-xdist is not: the ranks would spawn)."""
    path = Path(tempfile.mkdtemp(prefix="asynchat-test-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def rank_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("asynchat-rank")]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_two_ranks_share_a_process_group(tmp_path: Path) -> None:
    launch(rank_jobs.all_reduce_rank, nprocs=2, args=(str(tmp_path),), backend="cpu:gloo")
    results = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert results == ["2 3.0", "2 3.0"]


def test_the_rendezvous_port_is_held_from_before_any_rank_hears_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher found a free port, closed it, and handed it to the ranks; rank 0 bound it
    # seconds later (after importing torch). Anything could take it meanwhile (another job's
    # launcher, any connection's ephemeral port: two CI runs on one machine), and the launch
    # failed with EADDRINUSE. Here the port found free is taken at once, as by such a job.
    taken: list[socket.socket] = []

    def found_then_taken(host: str = "127.0.0.1") -> int:
        port = free_port(host)
        interloper = socket.socket()
        interloper.bind((host, port))
        interloper.listen()
        taken.append(interloper)
        return port

    monkeypatch.setattr(asynchat._launch, "free_port", found_then_taken)
    try:
        launch(rank_jobs.all_reduce_rank, nprocs=2, args=(str(tmp_path),))
    finally:
        for interloper in taken:
            interloper.close()
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["2 3.0", "2 3.0"]


def test_a_failing_rank_stops_the_others_and_is_named() -> None:
    started = time.monotonic()
    with pytest.raises(
        LaunchError, match=r"rank 1 failed:\n(?s:.*)ValueError: rank one gives up"
    ) as info:
        launch(rank_jobs.fail_on_rank_one, nprocs=2)
    assert info.value.rank == 1
    assert "Traceback" in str(info.value)
    assert time.monotonic() - started < 60, "rank 0 did not wait out its collective"
    assert rank_processes() == [], "no rank process is left"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_launch_async_runs_in_a_running_loop_and_cancelling_it_kills_the_ranks(
    tmp_path: Path,
) -> None:
    await launch_async(rank_jobs.all_reduce_rank, nprocs=2, args=(str(tmp_path),))
    assert len(list(tmp_path.glob("rank*.txt"))) == 2

    ticks = 0
    pids: set[int] = set()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1
            pids.update(p.pid for p in rank_processes() if p.pid is not None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        with anyio.move_on_after(3) as scope:
            await launch_async(rank_jobs.sleep_forever, nprocs=2)
        tg.cancel_scope.cancel()
    assert scope.cancelled_caught
    assert ticks > 50, "the event loop kept running while the ranks did"
    assert len(pids) == 2, "both ranks were seen running"
    assert rank_processes() == []
    assert_gone(sorted(pids))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_a_cancelled_launch_async_lets_its_ranks_write_their_final_checkpoint(
    tmp_path: Path,
) -> None:
    # Cancelling it SIGTERMed the ranks at once: a service's cancelled job lost every step
    # since its last checkpoint. Now the ranks end as on Ctrl-C, as a cancelled loop does.
    async def cancel_after_step_5(scope: anyio.CancelScope) -> None:
        step = tmp_path / "step"
        while not step.exists() or int(step.read_text() or 0) < 5:  # noqa: ASYNC110 (a file)
            await anyio.sleep(0.05)
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_after_step_5, scope)
            await launch_async(rank_jobs.until_signalled, nprocs=2, args=(str(tmp_path), False))
    assert scope.cancelled_caught
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert [c["global_step"] >= 5 for c in listed["checkpoints"]] == [True], "the final one"
    assert rank_processes() == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_a_cancelled_launch_async_terminates_ranks_still_running_after_its_grace(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="cancel_grace must be a positive number, got 0"):
        await launch_async(rank_jobs.sleep_forever, nprocs=2, cancel_grace=0)
    # Ranks that ignore the SIGINT (one stuck in a collective would not answer it either):
    # the cancellation ends them one second later, not after the default minute.
    cancelled_at = 0.0
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_once_started() -> None:
                nonlocal cancelled_at
                while len(list(tmp_path.glob("rank*.pid"))) < 2:  # noqa: ASYNC110 (files)
                    await anyio.sleep(0.05)
                cancelled_at = time.monotonic()
                scope.cancel()

            tg.start_soon(cancel_once_started)
            await launch_async(
                rank_jobs.ignoring_ctrl_c, nprocs=2, args=(str(tmp_path),), cancel_grace=1.0
            )
    assert scope.cancelled_caught
    assert time.monotonic() - cancelled_at < 1.0 + 15, "the grace, then SIGTERM and reaping"
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert not any(alive(pid) for pid in pids)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["launch", "async"])
def test_two_torchrun_agents_as_two_machines(tmp_path: Path, how: str) -> None:
    """`torchrun --nnodes=2 --nproc-per-node=1` twice on 127.0.0.1, like two machines.

    Regression (async): launch_async ignored RANK/WORLD_SIZE and launched a job of its own
    in each rank's process (two jobs, each writing every rank's file)."""
    port = str(free_port())
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(HERE / "torchrun_job.py"),
                str(tmp_path),
                how,
            ],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp_path)},  # the agents' logs: not left in /tmp
        )
        for node in range(2)
    ]
    outputs = []
    for agent in agents:
        out, _ = finished(agent, timeout=120)
        outputs.append(out)
    assert [a.returncode for a in agents] == [0, 0], outputs
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["2 3.0", "2 3.0"]


@pytest.mark.parametrize(
    ("environment", "error"),
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' and WORLD_SIZE='2' in the environment"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK='2' and WORLD_SIZE='2' in the environment name"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "environment but MASTER_ADDR and MASTER_PORT not"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}, "but MASTER_PORT not"),
    ],
    ids=["not-a-number", "rank-out-of-range", "no-master", "no-port"],
)  # fmt: skip
def test_rank_variables_left_over_in_the_shell_are_refused(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], error: str
) -> None:
    # Regression: RANK and WORLD_SIZE left exported made launch() run one rank of a job that
    # does not exist: torch's "environment variable MASTER_ADDR expected", or ValueError
    # "invalid literal for int()", naming neither the variables nor launch().
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{re.escape(error)}.*unset them to launch the ranks"):
        launch(rank_jobs.all_reduce_rank, nprocs=2, args=("unused",))
    with pytest.raises(ValueError, match=re.escape(error)):
        anyio.run(lambda: launch_async(rank_jobs.all_reduce_rank, nprocs=2, args=("unused",)))
    assert not dist.is_initialized()


def test_launch_async_as_a_launchers_rank_runs_it_in_the_running_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: launch_async ignored RANK/WORLD_SIZE and launched nprocs ranks of a job
    # of its own. Now it joins the launcher's job as its rank, runs fn in the running event
    # loop, and leaves the group at the end, cancelled too.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    seen: list[Any] = []

    async def run(fn: Any, *args: Any) -> int:
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        with anyio.move_on_after(1.0):
            await launch_async(fn, nprocs=4, args=args)
        return threading.get_ident()

    loop_thread = anyio.run(run, rank_jobs.tell_where, seen)
    assert seen == [(0, 1, loop_thread, 1)]  # once, on the loop's thread, in a group of 1
    assert not dist.is_initialized()
    anyio.run(run, rank_jobs.sleep_forever)  # cancelled after 1 s
    assert not dist.is_initialized()


def test_hang_timeout_under_another_launcher_is_said_to_go_unapplied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: under torchrun, launch and launch_async dropped hang_timeout without a
    # word (only the ranks they start are watched), so a job meant to be watched was not.
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    seen: list[Any] = []
    unapplied = r"hang_timeout=30 is not applied: RANK and WORLD_SIZE are set"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.warns(RuntimeWarning, match=unapplied):
        launch(rank_jobs.tell_where, nprocs=2, args=(seen,), hang_timeout=30)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.warns(RuntimeWarning, match=unapplied):
        anyio.run(lambda: launch_async(rank_jobs.tell_where, nprocs=2, args=(seen,),
                                       hang_timeout=datetime.timedelta(seconds=30)))  # fmt: skip
    assert [(rank, size) for rank, size, *_ in seen] == [(0, 1), (0, 1)]  # the rank still ran
    assert not dist.is_initialized()


def test_a_master_addr_of_another_machine_is_refused_at_once() -> None:
    # Regression: a typo in master_addr (an address not of this machine) failed the launch
    # only after collective_timeout (5 minutes by default) with torch's connection timeout.
    timeout = datetime.timedelta(seconds=5)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"master_addr='192.0.2.1' is no address of this machine"):
        launch(rank_jobs.sleep_forever, nprocs=2, master_addr="192.0.2.1",
               collective_timeout=timeout)  # fmt: skip
    elsewhere = {"master_addr": "192.0.2.1", "collective_timeout": timeout}
    with pytest.raises(ValueError, match=r"master_addr='192.0.2.1' is no address"):
        anyio.run(lambda: launch_async(rank_jobs.sleep_forever, nprocs=2, **elsewhere))
    assert time.monotonic() - started < 5
    assert rank_processes() == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nprocs must be a positive int, got 0"):
        launch(rank_jobs.sleep_forever, nprocs=0)
    started = time.monotonic()  # each is caught in the launcher, before any process starts
    with pytest.raises(TypeError, match="fn must be an async function"):
        launch(rank_jobs.ddp_data, nprocs=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be picklable"):
        launch(_local_async_function(), nprocs=2)
    with pytest.raises(TypeError, match="collective_timeout must be a positive"):
        launch(rank_jobs.sleep_forever, nprocs=2, collective_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"master_port must be an int in 1\.\.65535"):
        launch(rank_jobs.sleep_forever, nprocs=2, master_port=70000)
    with pytest.raises(TypeError, match="args must be a tuple or list"):
        launch(rank_jobs.sleep_forever, nprocs=2, args="abc")
    with pytest.raises(ValueError, match="hang_timeout must be a positive number"):
        launch(rank_jobs.sleep_forever, nprocs=2, hang_timeout=0)
    # Accepted before, every rank then failed in init_process_group with torch's words.
    with pytest.raises(ValueError, match=r"backend='bogus': this torch build has no 'bogus'"):
        launch(rank_jobs.sleep_forever, nprocs=2, backend="bogus")
    if not torch.distributed.is_nccl_available():  # (the CPU wheel's case)
        with pytest.raises(ValueError, match=r"no 'nccl' backend \(available: gloo"):
            launch(rank_jobs.sleep_forever, nprocs=2, backend="cpu:gloo,cuda:nccl")
    with pytest.raises(TypeError, match="backend must be a str"):
        launch(rank_jobs.sleep_forever, nprocs=2, backend=3)  # type: ignore[arg-type]
    for blank in ["", " ", "cpu:gloo,", "cuda:"]:  # (said "must be a str", or "no ''")
        with pytest.raises(ValueError, match=f"backend={blank!r} names no backend where"):
            launch(rank_jobs.sleep_forever, nprocs=2, backend=blank)
    assert time.monotonic() - started < 2 and rank_processes() == []


SCRIPT = """
import sys

import asynchat

{top}

if __name__ == "__main__":
{guarded}
    try:
        asynchat.launch(job, nprocs=2)
    except TypeError as exc:
        sys.exit(f"refused: {{exc}}")
    print("ran")
"""


@pytest.mark.parametrize("where", ["top", "guarded"])
def test_a_function_under_the_scripts_main_guard_is_refused_before_any_rank_starts(
    tmp_path: Path, where: str
) -> None:
    """The ranks import the script without running its guarded block: a job defined there
    made every rank die unpickling it, reported as "the process died (exit code 1) without
    a Python traceback". Defined at the top, the same job runs."""
    job = "async def job(rank, world_size):\n    pass"
    indented = "    " + job.replace("\n", "\n    ")
    top, guarded = (job, "    pass") if where == "top" else ("", indented)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(top=top, guarded=guarded))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    if where == "top":
        assert run.returncode == 0 and run.stdout.strip() == "ran", run.stderr
    else:
        assert run.returncode == 1, run.stderr
        assert "refused: fn 'job' is defined under the `if __name__" in run.stderr, run.stderr
        assert "define it at the module's top level" in run.stderr


def test_a_function_of_an_interactive_session_is_refused_before_any_rank_starts() -> None:
    """``python -c`` (as a notebook or the REPL): no file for the ranks to import."""
    code = SCRIPT.format(top="async def job(rank, world_size):\n    pass", guarded="    pass")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "refused: fn 'job' is defined in an interactive session" in run.stderr, run.stderr


def _local_async_function() -> Any:
    async def local(rank: int, world_size: int) -> None:
        pass

    return local


@pytest.mark.parametrize("fault", ["sigkill", "sigkill-slow"])
def test_the_first_rank_to_die_is_named_with_how_it_died(fault: str) -> None:
    """The survivor's error is in the report even when it takes a while to arrive (regression:
    the launcher listened for 0.3 s only, and under load the survivor's error came later)."""
    with pytest.raises(LaunchError, match=r"^rank 1 failed:\n.*killed by SIGKILL") as info:
        launch(rank_jobs.ddp_fault, nprocs=2, args=(fault,))
    assert info.value.rank == 1 and info.value.hung == []
    assert "rank 0" in str(info.value), "the survivor's error is listed as a consequence"
    assert rank_processes() == []


def test_a_rank_that_exits_with_code_0_before_its_function_returns_has_failed() -> None:
    # Exit code 0 was taken for success: the launcher waited for the other ranks (under
    # NCCL, in a collective the lost rank never joins, for its timeout), then named one of
    # them, and listed the one that had ended as having "exited normally".
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"^rank 1 failed:\n.*exit code 0\) before its") as info:
        launch(rank_jobs.ends_quietly_on_rank_one, nprocs=2)
    assert info.value.rank == 1 and "os._exit(0)" in str(info.value)
    assert time.monotonic() - started < 30, "rank 0's 60 s of work were not waited for"
    assert rank_processes() == []


def test_a_rank_that_crashes_natively_is_reported_with_its_python_stacks() -> None:
    with pytest.raises(LaunchError, match=r"^rank 1 failed:\n.*killed by SIGABRT") as info:
        launch(rank_jobs.ddp_fault, nprocs=2, args=("abort",))
    text = str(info.value)
    assert "Its Python stacks when it died" in text and "in on_step_end" in text
    assert rank_processes() == []


class SecondForkFails:
    """A multiprocessing context whose rank 1 cannot start: its fork is refused, as the
    system refuses one at the user's process limit (EAGAIN)."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # (multiprocessing's name)
        process = self._context.Process(*args, **kwargs)
        if kwargs.get("name") == "asynchat-rank-1":

            def refused() -> None:
                raise BlockingIOError(11, "Resource temporarily unavailable")

            process.start = refused
        return process


def test_a_rank_that_cannot_start_leaves_nothing_running_or_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 0 ran on, waiting for rank 1 in the rendezvous, and the launcher's directory of
    # stack files stayed in TMPDIR.
    context = asynchat._launch.rank_context()
    monkeypatch.setattr(asynchat._launch, "rank_context", lambda: SecondForkFails(context))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(BlockingIOError):
        launch(rank_jobs.sleep_forever, nprocs=2)
    assert rank_processes() == []
    assert list(tmp_path.glob("asynchat-launch-*")) == []


@pytest.mark.parametrize("fault", ["hang", "hang-all", "hang-one-hooked"])
def test_a_hung_rank_is_reported_within_hang_timeout_with_its_stacks(fault: str) -> None:
    """``hang-one-hooked``: ranks with other callbacks make the same progress beats per step
    (regression: a phase with hooks beat twice and one without once, so the rank without
    the callback fell behind in count and was named instead of the rank that hung)."""
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.ddp_fault, nprocs=2, args=(fault,), hang_timeout=8)
    text = str(info.value)
    assert time.monotonic() - started < 60
    if fault != "hang-all":
        assert info.value.rank == 1 and info.value.hung == [1]
        assert text.startswith("rank 1 hung:") and "behind ranks [0]" in text
    else:
        assert info.value.hung == [0, 1] and "all ranks made no progress" in text
    assert "Stacks of rank 1" in text and "in on_step_end" in text  # where it is stuck
    assert rank_processes() == []


@pytest.mark.parametrize("distributed", [True, False], ids=["ddp", "alone"])
def test_a_paused_rank_is_not_hung_however_long_it_holds(distributed: bool, tmp_path: Path) -> None:
    """``pause()`` holds a job on purpose: its ranks reach no phase while held. The launcher
    took that for a hang and terminated every rank once ``hang_timeout`` had passed (the
    README's own advice for holding a job, with a watchdog on, ended it with no checkpoint).
    A held loop now tells the launcher it is alive. ``alone``: rank 1, not held, returns
    long before rank 0 and waits in launch's closing barrier, silent; it was then taken for
    a hung rank too (any rank done well before another was): it now says it has finished."""
    # Start-up counts towards hang_timeout: a first launch of the process starts the fork
    # server (seconds on a loaded machine), so that one comes first, without a watchdog.
    (tmp_path / "warm").mkdir()
    launch(rank_jobs.all_reduce_rank, nprocs=2, args=(str(tmp_path / "warm"),))
    launch(
        rank_jobs.held_past_hang_timeout, nprocs=2, args=(str(tmp_path), distributed, 7.0),
        hang_timeout=3.0,
    )  # fmt: skip
    steps = "8" if distributed else "16"  # 2 epochs of 64 samples in 8s, over 2 ranks or not
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == [steps, steps]
    assert rank_processes() == []


def test_the_time_a_launcher_was_stopped_does_not_count_towards_hang_timeout() -> None:
    """Ranks outside any loop (starting, building their data, waiting on the launcher's
    store) make no progress while a Ctrl-Z holds the launcher: once it went on, the first
    poll found every rank silent for longer than ``hang_timeout`` and terminated the job.
    ``hang_timeout`` now counts from the moment the launcher lets the ranks go on."""
    ranks = asynchat._launch._start(
        rank_jobs.sleep_forever, 2, None, (), "127.0.0.1", None,
        datetime.timedelta(seconds=30), 1.0,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while min(ranks.beats[1], ranks.beats[3]) < 1:  # each rank has started: its first beat
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2.5)  # as if stopped: no rank beats (they sleep outside any loop)
        ranks.let_go()  # what the launcher does once continued
        assert ranks._hung(1.0) is None
        time.sleep(2.0)
        hung = ranks._hung(1.0)  # the watchdog still watches
        assert hung is not None and hung.hung == [0, 1] and "all ranks" in str(hung)
    finally:
        ranks.terminate()
        ranks.close()
    assert rank_processes() == []


def test_a_rank_that_returned_while_another_ran_a_collective_says_so() -> None:
    """Its error was a bare barrier timeout in launch's own code, as if it had failed. (Which
    rank the report names first depends on timing: the timed-out barrier closes the
    connection rank 0's collective waits on, and rank 0 may report that first.)"""
    with pytest.raises(LaunchError) as info:
        launch(
            rank_jobs.returns_early_on_rank_one, nprocs=2,
            collective_timeout=datetime.timedelta(seconds=3),
        )  # fmt: skip
    text = str(info.value)
    assert "rank 1's function had returned; it waited here, in launch's closing barrier" in text
    assert "collective timeout (3 s)" in text, text
    assert rank_processes() == []


def test_a_stopped_rank_is_named_as_the_hung_one_and_its_missing_stacks_explained() -> None:
    """A rank stopped (SIGSTOP) while the other waits for it in a collective had reached as
    many phases as the other: the launcher named rank 0 (the first of "all ranks") and said
    rank 1's Python code had not started. The process's state tells: it is stopped."""
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.ddp_fault, nprocs=2, args=("sigstop",), hang_timeout=6)
    text = str(info.value)
    assert info.value.rank == 1 and info.value.hung == [1], text
    assert text.startswith("rank 1 hung:\nis stopped") and "ranks [0] wait for it" in text
    assert "Stacks of rank 1:\n(none written: the process is stopped" in text
    assert "Stacks of rank 0" not in text, "a rank waiting for the stopped one is not hung"
    assert rank_processes() == []


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


BACKGROUND = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]  # (SIGINT ignored, as `cmd &` has it)


@contextlib.contextmanager
def launcher_script(
    *args: str,
    nohup: bool = False,
    background: bool = False,
    env: dict[str, str] | None = None,
    stoppable: bool = False,
) -> Iterator[subprocess.Popen[str]]:
    """``tests/<args[0]>`` with ``args[1:]`` run as a shell's job: a process group of its own,
    its output piped (``nohup``: under ``nohup``, ignoring SIGHUP; ``background``: ignoring
    SIGINT, as what a script starts with ``cmd &`` does; ``env``: more environment
    variables). However the test leaves (a failed assertion too), nothing of it is left
    running: a group still alive is killed, so no launcher outlives its test, nor do its
    ranks (a failure used to leave Popen's exit waiting for a launcher whose ranks ignore
    SIGINT). ``stoppable``: in this session, as a shell's job is, so that a SIGTSTP stops
    it (in a session of its own, its process group is orphaned, and the system discards
    SIGTSTP there)."""
    with subprocess.Popen(
        [*(["nohup"] if nohup else []), *(BACKGROUND if background else []),
         sys.executable, str(HERE / args[0]), *args[1:]],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=not stoppable, process_group=0 if stoppable else None,
        env={**os.environ, **(env or {})},
    ) as launcher:  # fmt: skip
        try:
            yield launcher
        finally:
            if launcher.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGKILL)  # (a stopped one too)


def ended(launcher: subprocess.Popen[str]) -> str:
    """The launcher's stderr once it has ended (within 60 s; else it is killed, and its
    ranks with it, through their lifelines)."""
    try:
        return launcher.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise


@pytest.mark.parametrize(
    ("how", "handle", "launched"),
    [("ctrl-c", False, "launch"), ("ctrl-c", True, "launch"), ("SIGTERM", True, "launch"),
     ("SIGTERM-to-the-group", True, "launch"), ("SIGHUP-to-the-group", True, "launch"),
     ("ctrl-c", True, "async"), ("SIGTERM", True, "async"), ("SIGHUP-to-the-group", True, "async"),
     ("ctrl-c", False, "launch-idle"), ("SIGTERM", True, "launch-idle")],
    ids=["ctrl-c", "ctrl-c-stop-on-signals", "SIGTERM-stop-on-signals", "SIGTERM-to-the-group",
         "SIGHUP-to-the-group", "async-ctrl-c", "async-SIGTERM", "async-SIGHUP-to-the-group",
         "waiting-for-data-ctrl-c", "waiting-for-data-SIGTERM-stop-on-signals"],
)  # fmt: skip
def test_a_signalled_launcher_lets_its_ranks_end_with_their_final_checkpoint(
    tmp_path: Path, short_tmp: Path, how: str, handle: bool, launched: str
) -> None:
    # A terminal's Ctrl-C (SIGINT to the launcher's process group) reached the ranks and the
    # launcher, whose KeyboardInterrupt then SIGTERMed the ranks in the middle of their
    # final checkpoint: none was written. A SIGTERM to the launcher alone (a pod's) killed
    # the ranks through their lifelines, stop_on_signals or not. The launcher now passes the
    # signal on, waits for the ranks, then ends as the signal says. A SIGTERM to the
    # launcher's process group (`kill %1`, `timeout`) killed the fork server the ranks
    # came from, and with it the launcher's view of them: it left at once, no checkpoint.
    # A SIGHUP to the group (a terminal closed) ended the launcher at once: no checkpoint.
    # launch_async (in anyio.run) died at once of a SIGTERM or SIGHUP, its ranks with it.
    # Ranks whose streams waited for data ("launch-idle") waited on: nothing ended them.
    temporary = short_tmp  # (the launcher's TMPDIR)
    with launcher_script(
        "signalled_launcher.py", str(tmp_path), str(int(handle)), launched,
        env={"TMPDIR": str(temporary)},
    ) as launcher:  # fmt: skip
        wait_for_line(launcher, "step 5")
        if how == "ctrl-c":
            os.killpg(launcher.pid, signal.SIGINT)
        elif how.endswith("-to-the-group"):
            os.killpg(launcher.pid, signal.Signals[how.split("-")[0]])
        else:
            launcher.send_signal(signal.SIGTERM)
        errors = ended(launcher)
    expected = -signal.Signals[how.split("-")[0]] if how != "ctrl-c" else -signal.SIGINT
    assert launcher.returncode == expected, errors[-2000:]
    if how == "ctrl-c":
        assert errors.rstrip().endswith("KeyboardInterrupt"), errors[-2000:]
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert [c["global_step"] >= 5 for c in listed["checkpoints"]] == [True], "the final one"
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    # Ended by SIGTERM or SIGHUP, the launcher left the fork server's socket behind, in a
    # directory of multiprocessing's: a signal's death skips the exit's clean-up.
    assert list(temporary.glob("pymp-*")) == []


@pytest.mark.parametrize("launched", ["launch", "async"])
def test_a_schedulers_sigusr1_to_the_launcher_reaches_ranks_that_save_on_it(
    tmp_path: Path, launched: str
) -> None:
    # Regression: a SIGUSR1 to the launcher (SLURM's --signal=USR1@90, its warning before it
    # preempts a job) ended the launcher by its default action, and the ranks with it (their
    # lifelines), though each would save on it; and a rank's own handler for it took the
    # signal on which the launcher asks a hung rank for its stacks. The launcher now passes
    # it on and goes on; the ranks' stacks come on a real-time signal.
    with launcher_script("signalled_launcher.py", str(tmp_path), "usr1", launched) as launcher:
        wait_for_line(launcher, "step 5")
        launcher.send_signal(signal.SIGUSR1)
        manifest = tmp_path / "checkpoints" / "manifest.json"
        wait_until(manifest.exists, launcher, "the asked save to be written")
        [asked] = json.loads(manifest.read_text())["checkpoints"]
        # A step later, SIGTERM ends the job with its final checkpoint. (Sent at once, under
        # load it stopped the job at the asked save's own step, whose final save is that one.)
        past = asked["global_step"]
        wait_until(lambda: step_of(tmp_path) > past, launcher, "a step past the asked save")
        launcher.send_signal(signal.SIGTERM)
        said, errors = launcher.communicate(timeout=60)
    assert launcher.returncode == -signal.SIGTERM, errors[-2000:]
    listed = json.loads(manifest.read_text())["checkpoints"]
    assert listed[0] == asked, listed
    [final] = listed[1:]
    path = tmp_path / "checkpoints" / asked["file"]
    assert f"saved {path}" in said.splitlines(), said[-2000:]  # what rank 0's future gave
    assert 5 <= asked["global_step"] < final["global_step"]


def test_a_launcher_that_writes_its_stacks_on_sigusr1_keeps_doing_so(tmp_path: Path) -> None:
    # faulthandler.register(signal.SIGUSR1) is a common way to ask a process for its
    # stacks; signal.getsignal does not see it (SIG_DFL), and a launcher that took SIGUSR1
    # over for its ranks would have put SIG_DFL back: its next SIGUSR1 killed it.
    script = (
        "import faulthandler, os, signal, time, rank_jobs\n"
        "from asynchat import launch\n"
        f"stacks = open({str(tmp_path / 'stacks')!r}, 'w')\n"
        "faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)\n"
        f"launch(rank_jobs.all_reduce_rank, nprocs=2, args=({str(tmp_path)!r},))\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.2)\n"
        "print('still here')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "still here", done.stderr[-2000:]
    assert "<module>" in (tmp_path / "stacks").read_text()  # its stacks, as it asked


def assert_stopped_by(reason: str, directory: Path) -> None:
    """Both ranks of the ``rank_jobs.until_signalled`` job in ``directory`` stopped for
    ``reason``, or at the same step because the other had: the ranks agree on a stop at
    each step, and a rank whose own handler ran after that agreement (the signal reaches
    the two processes in turn) stopped "on another rank". Rank 0 alone was asked before,
    and failed where rank 1 heard the signal first (twice in a suite run under load)."""
    reasons = sorted(p.read_text() for p in directory.glob("stop_reason.*"))
    assert len(reasons) == 2 and reason in reasons, (directory, reasons)
    assert set(reasons) <= {reason, "stopped on another rank"}, (directory, reasons)


def both_train(job: subprocess.Popen[str], *directories: Path) -> None:
    """Wait until the job's two jobs (in ``directories``) have each written a step."""
    steps = [directory / "step" for directory in directories]
    wait_until(lambda: all(step.exists() for step in steps), job, "both jobs to train")


def step_of(directory: Path) -> int:
    """The step rank 0 of ``rank_jobs.until_signalled`` last wrote."""
    with contextlib.suppress(ValueError):  # (read while it was written: try again)
        return int((directory / "step").read_text())
    time.sleep(0.01)
    return step_of(directory)


@pytest.mark.parametrize(
    ("launched", "then"), [("launch", "fg"), ("async", "fg"), ("launch", "kill")]
)
def test_ctrl_z_holds_the_ranks_until_the_launcher_is_continued(
    tmp_path: Path, launched: str, then: str
) -> None:
    # Regression: a terminal's Ctrl-Z (SIGTSTP to the launcher's process group) stopped the
    # launcher alone; its ranks, in process groups of their own, trained on unseen. Now they
    # hold (their loops pause, their processes run: a rank stopped inside a collective may
    # fail it once continued) until the launcher is continued (fg), then train on. "kill":
    # the held job ended as a shell's `kill %1` ends a stopped job (SIGTERM, then SIGCONT).
    with launcher_script(
        "signalled_launcher.py", str(tmp_path), "1", launched, stoppable=True
    ) as launcher:  # fmt: skip
        wait_for_line(launcher, "step 5")
        os.killpg(launcher.pid, signal.SIGTSTP)  # as the terminal sends it
        deadline = time.monotonic() + 30
        while process_state(launcher.pid) != "T":  # (T: stopped)
            assert time.monotonic() < deadline, "the launcher stops"
            time.sleep(0.01)
        held_at = step_of(tmp_path)
        while True:  # once at their next step boundary, the ranks hold
            time.sleep(1.0)
            if step_of(tmp_path) == held_at:
                break
            assert time.monotonic() < deadline, "the ranks hold"
            held_at = step_of(tmp_path)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        assert len(pids) == 2 and [process_state(pid) in ("R", "S") for pid in pids] == [True, True]
        if then == "kill":
            os.killpg(launcher.pid, signal.SIGTERM)
            os.killpg(launcher.pid, signal.SIGCONT)
        else:
            os.killpg(launcher.pid, signal.SIGCONT)  # fg
            while step_of(tmp_path) <= held_at + 5:
                assert time.monotonic() < deadline + 30, "the ranks train on"
                time.sleep(0.01)
            assert process_state(launcher.pid) != "T"
            launcher.send_signal(signal.SIGINT)
        errors = ended(launcher)
    ending = signal.SIGTERM if then == "kill" else signal.SIGINT
    assert launcher.returncode == -ending, errors[-2000:]
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    final = [c["global_step"] for c in listed["checkpoints"]]
    assert len(final) == 1 and final[0] >= held_at, "the final one"
    assert not any(alive(pid) for pid in pids)


def test_a_signal_passed_on_while_the_ranks_start_still_ends_them(tmp_path: Path) -> None:
    # Regression: a rank forked from the fork server has the server's SIG_IGN for SIGTERM
    # until it takes its own back; a SIGTERM passed on before that was lost, the rank
    # trained on, and the launcher waited for it forever. (SIGINT had a window of its own:
    # a launch_async cancelled at once waited out its cancel_grace in 4 of 15 tries.)
    with launcher_script("slow_start_launcher.py", str(tmp_path)) as launcher:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("importing-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        errors = ended(launcher)
    assert launcher.returncode == -signal.SIGTERM, errors[-2000:]
    pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("importing-*")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    assert not (tmp_path / "step").exists(), "no rank began to train"


def test_a_sigterm_reaches_every_launch_async_job_of_the_process(tmp_path: Path) -> None:
    # Two jobs in one anyio.run: the SIGTERM goes on to the ranks of both, and the process
    # ends by it only once all four have written their final checkpoints.
    second = tmp_path / "second"
    second.mkdir()
    with launcher_script("signalled_launcher.py", str(tmp_path), "1", "async-two") as job:
        both_train(job, tmp_path, second)
        job.send_signal(signal.SIGTERM)
        errors = ended(job)
    assert job.returncode == -signal.SIGTERM, errors[-2000:]
    for directory in (tmp_path, second):
        assert_stopped_by("received SIGTERM", directory)
        listed = json.loads((directory / "checkpoints" / "manifest.json").read_text())
        assert len(listed["checkpoints"]) == 1, "the final one"
    pids = [int(p.read_text()) for d in (tmp_path, second) for p in d.glob("rank*.pid")]
    assert len(pids) == 4 and not any(alive(pid) for pid in pids)


def test_launch_async_leaves_a_sigterm_the_program_handles_to_it(tmp_path: Path) -> None:
    # A program with a SIGTERM handler of its own (a server's graceful shutdown) keeps it:
    # launch_async passes on only what would end the process. Cancelled by the program, the
    # job's ranks end as on a Ctrl-C, and the program goes on to exit as it chooses.
    with launcher_script("signalled_launcher.py", str(tmp_path), "1", "async-handled") as job:
        wait_for_line(job, "step 5")
        job.send_signal(signal.SIGTERM)
        out, errors = finished(job)
    assert job.returncode == 0, errors[-2000:]
    assert "cancelling the job" in out
    # The ranks were ended by the cancellation (a Ctrl-C), not handed the SIGTERM.
    assert_stopped_by("received SIGINT", tmp_path)
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert [c["global_step"] >= 5 for c in listed["checkpoints"]] == [True], "the final one"
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


@pytest.mark.parametrize(
    ("order", "how"),
    [("block-first", "SIGTERM"), ("job-first", "SIGTERM"), ("block-first", "SIGINT"),
     ("job-first", "SIGHUP")],
)  # fmt: skip
def test_a_signal_that_stops_a_services_loops_stops_its_launched_jobs_too(
    tmp_path: Path, order: str, how: str
) -> None:
    # A service trains one job in its process under stop_on_signals and launches another.
    # Regression: the pod's SIGTERM stopped the local job and never reached the launched
    # one's ranks (the relay passed on only a signal left to its default, and the block's
    # handler took the signal's place, before the job started or after), which trained on
    # until the pod's SIGKILL. A SIGINT too (the ranks have process groups of their own,
    # a terminal's Ctrl-C does not reach them). And a block opened after the relay left
    # SIGHUP out (the relay's handler made it look like the program's own): the local job
    # died with the process. Now each job ends gracefully, and so does the service.
    with launcher_script("signalled_launcher.py", str(tmp_path), "1", f"beside-{order}") as job:
        both_train(job, tmp_path, tmp_path / "local")
        job.send_signal(signal.Signals[how])
        out, errors = finished(job)
    assert job.returncode == 0, errors[-2000:]
    assert "both jobs ended" in out
    assert_stopped_by(f"received {how}", tmp_path)
    assert (tmp_path / "local" / "stop_reason").read_text() == f"received {how}"
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert len(listed["checkpoints"]) == 1, "the launched job's final one"
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_a_launched_job_a_services_signal_cut_short_says_so(tmp_path: Path) -> None:
    # Its ranks have no stop_on_signals: the SIGTERM the service's block caught kills them.
    # The service goes on, so the job does not return as if it had run to its end.
    with launcher_script("signalled_launcher.py", str(tmp_path), "0", "beside-block-first") as job:
        both_train(job, tmp_path, tmp_path / "local")
        job.send_signal(signal.SIGTERM)
        _, errors = finished(job)
    assert job.returncode == 1, errors[-2000:]
    assert "LaunchError" in errors and "killed by SIGTERM" in errors, errors[-2000:]
    assert "The launcher had passed SIGTERM on to the ranks." in errors
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_launch_async_gives_sigterm_back_as_it_found_it(tmp_path: Path) -> None:
    # While launch_async's ranks run, a SIGTERM left to its default action is theirs; after,
    # it is the default again, and a handler the program set meanwhile stays (it was reset
    # to the default, and a later SIGTERM killed the program its handler would have stopped).
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    anyio.run(lambda: launch_async(rank_jobs.all_reduce_rank, nprocs=2, args=(str(tmp_path),)))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum: int, frame: object) -> None:
        pass

    async def set_own_handler_meanwhile() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: launch_async(rank_jobs.sleep_forever, nprocs=2, cancel_grace=10))
            while not asynchat._launch._RELAY.jobs:  # noqa: ASYNC110 (the ranks started)
                await anyio.sleep(0.05)
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the relay's
            signal.signal(signal.SIGTERM, own)
            tg.cancel_scope.cancel()

    try:
        anyio.run(set_own_handler_meanwhile)
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_closed_terminal_lets_the_ranks_end_with_their_final_checkpoint(
    tmp_path: Path,
) -> None:
    # A launcher on a terminal that closes (an ssh session ended without nohup or tmux): the
    # kernel sends SIGHUP to its session's foreground group, the launcher and the fork
    # server, and every write to the terminal fails from then on (EIO). The launcher died
    # at once, its ranks through their lifelines: no checkpoint.
    terminal, its_end = pty.openpty()
    with subprocess.Popen(
        [sys.executable, str(HERE / "signalled_launcher.py"), str(tmp_path), "terminal"],
        cwd=HERE, stdin=its_end, stdout=its_end, stderr=its_end, start_new_session=True,
    ) as launcher:  # fmt: skip
        os.close(its_end)
        try:
            steps = until_a_step(tmp_path, launcher, terminal)
            os.close(terminal)  # the hangup
            terminal = -1
            launcher.wait(timeout=60)
        finally:
            if terminal >= 0:
                os.close(terminal)
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == -signal.SIGHUP
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert [c["global_step"] >= steps for c in listed["checkpoints"]] == [True], "the final one"
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def until_a_step(directory: Path, launcher: subprocess.Popen[Any], terminal: int) -> int:
    """Wait until rank 0 of ``signalled_launcher.py`` has written a step (reading what the
    job writes to its ``terminal``, so that it never blocks on a full one); that step."""
    deadline = time.monotonic() + 60
    while not (directory / "step").exists() or not (directory / "step").read_text():
        assert time.monotonic() < deadline and launcher.poll() is None, "no step was written"
        if select.select([terminal], [], [], 0.1)[0]:
            os.read(terminal, 65536)
    return int((directory / "step").read_text())


@pytest.mark.parametrize("how", ["nohup", "background"])
def test_a_signal_the_launcher_ignores_leaves_its_ranks_training(tmp_path: Path, how: str) -> None:
    # nohup asks the job to outlive its terminal: SIGHUP stays ignored, in the launcher and
    # in its ranks (a launcher that caught it anyway would pass it on and end them). What a
    # script starts in the background (`cmd &`) ignores SIGINT, for the terminal's Ctrl-C not
    # to end it: the launcher caught it anyway and passed it on, and the ranks ended (or,
    # had they ignored it, a second Ctrl-C terminated them without a checkpoint).
    ignored = signal.SIGHUP if how == "nohup" else signal.SIGINT
    with launcher_script(
        "signalled_launcher.py", str(tmp_path), "1", nohup=how == "nohup",
        background=how == "background",
    ) as launcher:  # fmt: skip
        wait_for_line(launcher, "step 5")
        os.killpg(launcher.pid, ignored)
        os.killpg(launcher.pid, ignored)
        wait_for_line(launcher, "step 25")
        assert launcher.poll() is None, ended(launcher)[-2000:]
        launcher.send_signal(signal.SIGTERM)
        errors = ended(launcher)
    assert launcher.returncode == -signal.SIGTERM, errors[-2000:]
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert [c["global_step"] >= 25 for c in listed["checkpoints"]] == [True]
    assert_stopped_by("received SIGTERM", tmp_path)


def test_a_second_ctrl_c_ends_ranks_that_do_not_answer_the_first(tmp_path: Path) -> None:
    # The launcher waits for its ranks after passing a Ctrl-C on; ranks that do not end (here
    # they ignore SIGINT, as one stuck in a collective would not answer it) must not hold it
    # forever: a second Ctrl-C terminates whatever still runs some seconds later.
    with launcher_script("signalled_launcher.py", str(tmp_path), "stubborn") as launcher:
        wait_until(lambda: len(list(tmp_path.glob("rank*.pid"))) >= 2, launcher, "both ranks")
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        os.killpg(launcher.pid, signal.SIGINT)
        time.sleep(1.0)
        assert launcher.poll() is None and all(alive(pid) for pid in pids), "it waits"
        os.killpg(launcher.pid, signal.SIGINT)
        started = time.monotonic()
        errors = ended(launcher)
    assert launcher.returncode == -signal.SIGINT, errors[-2000:]
    assert time.monotonic() - started < 30
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize(
    ("how", "spawned"),
    [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGKILL, True)],
    ids=["SIGTERM", "SIGKILL", "SIGKILL-spawned"],
)
def test_ranks_die_with_their_launcher(
    tmp_path: Path, short_tmp: Path, how: signal.Signals, spawned: bool
) -> None:
    """``spawned``: in a TMPDIR too long a path for the fork server's socket, where the
    ranks spawn (asking whether it was, the launcher made multiprocessing's directory
    there, which a SIGKILL left behind)."""
    temporary = short_tmp  # (the launcher's TMPDIR)
    if spawned:
        temporary = tmp_path / ("t" * max(3, 80 - len(str(tmp_path))))
        temporary.mkdir()
    with launcher_script(
        "launcher_job.py", str(tmp_path), env={"TMPDIR": str(temporary)}
    ) as launcher:
        wait_until(lambda: len(list(tmp_path.glob("rank*.pid"))) >= 2, launcher, "both ranks")
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        assert all(alive(pid) for pid in pids)
        stacks = {path.parent for pid in pids for path in open_files(pid)}
        stacks = {path for path in stacks if path.name.startswith("asynchat-launch-")}
        assert len(stacks) == 1, stacks  # the launcher's directory of the ranks' stack files
        parent = int(Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert (parent == launcher.pid) == spawned, "forked from the fork server, or spawned"
        launcher.send_signal(how)
        launcher.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "a rank outlived its launcher"
    assert not stacks.pop().exists(), "the launcher's stack files were left behind"

    # Killed by SIGKILL, the launcher left the fork server's socket and its pymp-* directory
    # in TMPDIR: the server removes them now as it exits, once the launcher is gone. (What
    # stays is torch's: importing torch._dynamo makes its cache, torchinductor_<user>.)
    def left() -> list[str]:
        mine = [p for p in temporary.iterdir() if not p.name.startswith("torchinductor_")]
        return sorted(str(p) for top in mine for p in [top, *top.rglob("*")])

    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left() == [], (left(), process_report(parent))


def process_report(pid: int) -> str:
    """What is known of process ``pid``: its state, where it waits, its command line."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return "gone"
    return f"{[line for line in status if line.startswith(('State', 'PPid'))]} {wchan} {command}"


def open_files(pid: int) -> list[Path]:
    """The paths of the files process ``pid`` has open."""
    paths = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            paths.append(Path(os.readlink(fd)))
    return paths
