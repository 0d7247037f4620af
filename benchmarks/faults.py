"""Fault injection, long: the same faults as tests/test_faults.py, many times, as a table.

- SIGKILL at a random moment of a job that checkpoints every step, then resume in a new
  process: the result must equal an uninterrupted run bitwise (or, killed before any save
  was complete, resume must refuse clearly).
- Cancellation at a random moment on asyncio, uvloop and trio, with an async hook, a slow
  writer and a subscriber: status cancelled, the newest checkpoint is the last step and loads,
  no thread left.
- An exception from every phase, def and async, with every shipped callback present, on the
  three backends: raised as itself, teardown complete, no thread left.
- The launcher killed (SIGTERM, SIGKILL) while two ranks train: no rank outlives it.
  A rank SIGKILLed: LaunchError names that rank.
- Many fits in one process: threads, file descriptors and RSS before and after.

Run: python benchmarks/faults.py [--kills 25] [--cancels 50] [--fits 200] [--launches 3]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import anyio
import torch
from _common import machine, table

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the job scripts and helpers the tests use

import rank_jobs  # noqa: E402
from conftest import engine_threads, make_trainer  # noqa: E402
from test_checkpoint import assert_bitwise_equal, run_job  # noqa: E402
from test_faults import (  # noqa: E402
    PHASES,
    Boom,
    assert_cancelled_with_the_last_step_saved,
    every_shipped_callback,
    fit_cancelled_after,
    raising,
)
from test_launch import alive  # noqa: E402

from asynchat import LaunchError, LoopStatus, launch  # noqa: E402
from asynchat.callbacks import Checkpoint  # noqa: E402

Row = tuple[str, int, int, int, str]


def sigkill_during_saves(trials: int, rng: random.Random) -> Row:
    resumed = refused = lost = 0
    with TemporaryDirectory() as tmp:
        out, total = Path(tmp, "result"), 40
        run_job("straight", out, total, 0, Path(tmp, "unused"), "generator")
        straight = torch.load(f"{out}.straight", weights_only=True)
        for trial in range(trials):
            directory = Path(tmp, f"ckpt-{trial}")
            command = [sys.executable, str(TESTS / "resume_job.py"), "killable", str(out),
                       str(total), "0", str(directory), "generator"]  # fmt: skip
            with subprocess.Popen(command, cwd=TESTS, stdout=subprocess.PIPE, text=True) as job:
                assert job.stdout is not None
                job.stdout.readline()  # the first step ran: kill anywhere from here on
                time.sleep(rng.uniform(0.0, 0.6))
                job.kill()
            command = [sys.executable, str(TESTS / "resume_job.py"), "resume", str(out),
                       str(total), "0", str(directory), "generator"]  # fmt: skip
            done = subprocess.run(command, cwd=TESTS, capture_output=True, text=True)
            if done.returncode != 0:
                # Killed before the first checkpoint was complete: resume must say so.
                if "CheckpointError" in done.stderr and "no valid checkpoint" in done.stderr:
                    refused += 1
                else:
                    lost += 1
                continue
            result = torch.load(f"{out}.resume", weights_only=True)
            try:
                for key in ("model", "optimizer", "counter", "torch_rng"):
                    assert_bitwise_equal(result[key], straight[key], key)
                resumed += 1
            except AssertionError:
                lost += 1
    return ("SIGKILL during saves, resume", trials, resumed + refused, lost,
            f"{resumed} bitwise, {refused} refused (no checkpoint yet)")  # fmt: skip


BACKENDS = [("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {})]


def random_cancels(trials: int, rng: random.Random) -> Row:
    survived = lost = 0
    problems: list[str] = []
    with TemporaryDirectory() as tmp:
        for trial in range(trials):
            directory = Path(tmp, f"c{trial}")
            name, options = BACKENDS[trial % 3]
            trainer = anyio.run(
                fit_cancelled_after, directory, rng.uniform(0.05, 0.8),
                backend=name, backend_options=options,
            )  # fmt: skip
            try:
                assert_cancelled_with_the_last_step_saved(trainer, directory)
                assert not engine_threads(), engine_threads()
                survived += 1
            except AssertionError as exc:
                lost += 1
                problems.append(str(exc))
    return ("cancel at a random moment, 3 backends", trials, survived, lost,
            "; ".join(problems[:3]) or "final checkpoint = last step, no thread left")  # fmt: skip


def phase_errors() -> Row:
    trials = survived = 0
    problems: list[str] = []
    for name, options in BACKENDS:
        for phase in PHASES:
            for is_async in (False, True):
                trials += 1
                with TemporaryDirectory() as tmp:
                    callbacks = [
                        raising(phase, is_async=is_async),
                        *every_shipped_callback(Path(tmp)),
                    ]
                    trainer = make_trainer(*callbacks, num_epochs=2)
                    try:
                        anyio.run(trainer.fit, backend=name, backend_options=options)
                        problems.append(f"{phase}: no error")
                    except Boom:
                        if trainer.status is LoopStatus.FAILED and not engine_threads():
                            survived += 1
                        else:
                            problems.append(f"{phase}: {trainer.status} {engine_threads()}")
    held = "; ".join(problems[:3]) or "raised as itself, teardown complete"
    return ("error in every phase x def/async x backend", trials, survived, trials - survived, held)


def launcher_deaths(trials: int) -> Row:
    survived = 0
    for trial in range(trials * 2):
        how = (signal.SIGTERM, signal.SIGKILL)[trial % 2]
        with TemporaryDirectory() as tmp:
            command = [sys.executable, str(TESTS / "launcher_job.py"), tmp]
            with subprocess.Popen(command, cwd=TESTS) as launcher:
                while len(list(Path(tmp).glob("rank*.pid"))) < 2:
                    time.sleep(0.1)
                pids = [int(p.read_text()) for p in Path(tmp).glob("rank*.pid")]
                launcher.send_signal(how)
                launcher.wait(timeout=30)
            deadline = time.monotonic() + 15
            while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            survived += not any(alive(pid) for pid in pids)
    held = "no rank outlives its launcher" if survived == trials * 2 else "orphans left"
    return ("launcher SIGTERM/SIGKILL, 2 ranks", trials * 2, survived, trials * 2 - survived, held)


def rank_kills(trials: int) -> Row:
    named = 0
    for _ in range(trials):
        try:
            launch(rank_jobs.ddp_fault, nprocs=2, args=("sigkill",))
        except LaunchError as exc:
            named += exc.rank == 1 and "SIGKILL" in str(exc)
    return ("rank 1 SIGKILLed under launch", trials, named, trials - named,
            "LaunchError names rank 1, killed by SIGKILL")  # fmt: skip


def many_fits(fits: int) -> Row:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with TemporaryDirectory() as tmp:

        def fit(i: int) -> None:
            trainer = make_trainer(Checkpoint(Path(tmp, f"r{i}"), every_n_steps=3),
                                   num_steps=6)  # fmt: skip
            anyio.run(trainer.fit)

        for i in range(10):
            fit(i)
        before = (threading.active_count(), fds())
        rss0 = _rss_mb()
        for i in range(fits):
            fit(10 + i)  # each fit a fresh run: a directory of its own
        after = (threading.active_count(), fds())
        rss1 = _rss_mb()
    ok = after[0] == before[0] and after[1] <= before[1] and rss1 - rss0 < 50
    return (f"{fits} fits in one process", fits, fits if ok else 0, 0 if ok else fits,
            f"threads {before[0]}->{after[0]}, fds {before[1]}->{after[1]}, "
            f"RSS {rss0:.0f}->{rss1:.0f} MB")  # fmt: skip


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--cancels", type=int, default=50)
    parser.add_argument("--fits", type=int, default=200)
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"# {machine()}")
    started = time.monotonic()
    steps: list[Callable[[], Row]] = [
        lambda: sigkill_during_saves(args.kills, rng),
        lambda: random_cancels(args.cancels, rng),
        phase_errors,
        lambda: launcher_deaths(args.launches),
        lambda: rank_kills(args.launches),
        lambda: many_fits(args.fits),
    ]
    rows = []
    for step in steps:
        rows.append(step())
        print(f"  {rows[-1][0]}: done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    print(table(["fault", "trials", "survived", "lost", "what held"], rows))


if __name__ == "__main__":
    main()
