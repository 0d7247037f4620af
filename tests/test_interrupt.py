"""Ctrl-C without stop_on_signals: training ends promptly on every backend, on_loop_end runs
(the final checkpoint is the last step), and KeyboardInterrupt is raised; a second Ctrl-C
while the loop winds down forces the exit."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import HAVE_TRIO, Job

HERE = Path(__file__).resolve().parent
BACKENDS = [
    "asyncio",
    "uvloop",
    pytest.param("trio", marks=pytest.mark.skipif(not HAVE_TRIO, reason="needs trio")),
]


def start(backend: str, directory: Path, *options: str) -> Job:
    job = Job(str(HERE / "interrupt_job.py"), backend, str(directory), *options, cwd=HERE)
    if (line := job.line()) != "training":
        job.fail(f"said {line!r} first, not 'training'")
    return job


def ctrl_c(job: Job) -> tuple[str, float]:
    """Send the job a SIGINT; return what it printed and how long it took to end after it."""
    sent = time.monotonic()
    os.kill(job.pid, signal.SIGINT)
    out, _ = job.ended()
    return out, time.monotonic() - sent


def newest_checkpoint(directory: Path) -> int:
    entries = json.loads((directory / "manifest.json").read_text())["checkpoints"]
    return max(e["global_step"] for e in entries)


@pytest.mark.parametrize("hooks", ["def", "asynchook"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_ends_training_promptly_with_a_final_checkpoint(
    tmp_path: Path, backend: str, hooks: str
) -> None:
    with start(backend, tmp_path, hooks) as job:
        time.sleep(0.3)
        out, took = ctrl_c(job)
    assert job.returncode == 0
    word, status, step = out.split()
    assert (word, status) == ("KeyboardInterrupt", "cancelled")
    assert newest_checkpoint(tmp_path) == int(step), "on_loop_end saved the last step"
    assert took < 15, f"took {took:.1f} s to wind down"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_while_async_data_is_awaited_ends_at_once(tmp_path: Path, backend: str) -> None:
    # The read waits on the event loop (trio raises the KeyboardInterrupt into it): the
    # cancellation ends it; the batch read before it is not trained (a cancellation, not a
    # stop), and the final checkpoint is the last step.
    with start(backend, tmp_path, "asyncfeed") as job:
        assert job.line() == "waiting for data"
        time.sleep(0.3)
        out, took = ctrl_c(job)
    assert job.returncode == 0
    assert out.split() == ["KeyboardInterrupt", "cancelled", "4"]
    assert newest_checkpoint(tmp_path) == 4
    assert took < 15, f"took {took:.1f} s to wind down"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_ctrl_c_cuts_a_slow_wind_down_short(tmp_path: Path, backend: str) -> None:
    with start(backend, tmp_path, "slowend") as job:
        os.kill(job.pid, signal.SIGINT)
        assert job.line() == "winding down"  # sleeping 60 s
        out, took = ctrl_c(job)
    assert job.returncode == 0
    assert out.split()[0] == "KeyboardInterrupt"
    assert took < 15, f"took {took:.1f} s after the second Ctrl-C"
    # The def hooks after the cut one still ran: the final checkpoint is the last step.
    assert newest_checkpoint(tmp_path) == int(out.split()[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_waits_for_the_accumulation_window_and_a_second_one_does_not(
    tmp_path: Path, backend: str
) -> None:
    # The first Ctrl-C is held to the window's end (its gradients are in no checkpoint): the
    # loop says so and goes on. The second forces the exit after the step in progress; the
    # final checkpoint then says what it lacks.
    with start(backend, tmp_path, "window") as job:
        os.kill(job.pid, signal.SIGINT)
        line = job.line("stderr")
        assert "ending after the gradient-accumulation window in progress" in line
        time.sleep(0.5)
        assert job.process.poll() is None, "the first Ctrl-C waits for the window"
        sent = time.monotonic()
        os.kill(job.pid, signal.SIGINT)
        out, err = job.ended()
        took = time.monotonic() - sent
    assert job.returncode == 0
    word, status, step = out.split()
    assert (word, status) == ("KeyboardInterrupt", "cancelled")
    assert took < 15, f"took {took:.1f} s after the second Ctrl-C"
    assert "inside a gradient-accumulation window" in err
    # fit() raised at once; the thread then finished the step in progress and saved.
    assert int(step) <= newest_checkpoint(tmp_path) <= int(step) + 1 < 200_000


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_teardown_error_after_a_second_ctrl_c_is_logged(tmp_path: Path, backend: str) -> None:
    # fit() no longer waits for the loop after a second Ctrl-C, and the def hooks of
    # on_loop_end run on alone: their errors were dropped without a word.
    with start(backend, tmp_path, "slowend", "failend") as job:
        os.kill(job.pid, signal.SIGINT)
        assert job.line() == "winding down"
        os.kill(job.pid, signal.SIGINT)
        out, err = job.ended()
    assert out.split()[0] == "KeyboardInterrupt"
    # Logged by asynchat ("the loop went on alone ... and failed"), or, when asyncio.run's
    # shutdown still awaited the task, reported by asyncio's handler: never lost.
    assert "RuntimeError: the teardown failed" in err
    assert newest_checkpoint(tmp_path) == int(out.split()[2])  # the hooks after it still ran
