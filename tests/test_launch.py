"""launch() and launch_async(): real gloo process groups in real processes."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import rank_jobs

from asynchat import LaunchError, launch, launch_async
from asynchat._launch import free_port

HERE = Path(__file__).resolve().parent


def rank_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("asynchat-rank")]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_two_ranks_share_a_process_group(tmp_path: Path) -> None:
    launch(rank_jobs.all_reduce_rank, nprocs=2, args=(str(tmp_path),))
    results = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert results == ["2 3.0", "2 3.0"]


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


@pytest.mark.slow
def test_two_torchrun_agents_as_two_machines(tmp_path: Path) -> None:
    """`torchrun --nnodes=2 --nproc-per-node=1` twice on 127.0.0.1, like two machines."""
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
            ],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = []
    for agent in agents:
        out, _ = agent.communicate(timeout=120)
        outputs.append(out)
    assert [a.returncode for a in agents] == [0, 0], outputs
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["2 3.0", "2 3.0"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nprocs must be a positive int, got 0"):
        launch(rank_jobs.sleep_forever, nprocs=0)
