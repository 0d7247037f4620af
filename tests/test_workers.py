"""Compute threads live across loops: the next loop on a device runs on the same thread, loops
at the same time get threads of their own, a lease starts clean, and idle threads end (after
their timeout, at interpreter exit) without holding anything up."""

from __future__ import annotations

import gc
import multiprocessing
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from pathlib import Path

import anyio
import pytest
import torch
from conftest import make_loader, make_model, make_trainer

from asynchat import Callback, LoopState, Predictor
from asynchat import _compute as compute_module

pytestmark = pytest.mark.anyio


class Where(Callback):
    """Records the compute thread and its thread-local torch settings at ``on_loop_begin``."""

    def __init__(self, *, barrier: threading.Barrier | None = None) -> None:
        self.barrier = barrier
        self.thread: threading.Thread | None = None
        self.name = ""
        self.grad_enabled: bool | None = None
        self.num_threads = 0

    def on_loop_begin(self, state: LoopState) -> None:
        self.thread = threading.current_thread()
        self.name = self.thread.name
        self.grad_enabled = torch.is_grad_enabled()
        self.num_threads = torch.get_num_threads()
        if self.barrier is not None:
            self.barrier.wait()  # both loops are running now, each on its thread


async def test_the_next_loop_on_a_device_runs_on_the_same_thread() -> None:
    first, second, third = Where(), Where(), Where()
    trainer = make_trainer(first, num_steps=3)
    await trainer.fit()
    assert first.thread is not None and first.name == f"asynchat-{trainer.name}"
    assert first.thread.is_alive(), "the worker waits for the next loop"
    assert first.thread.name == "asynchat-idle-cpu"
    again = make_trainer(second, num_steps=3)
    await again.fit()
    predictor = Predictor(make_model(), make_loader(32, 16), callbacks=[third])
    async for _ in predictor.stream():
        pass
    assert second.thread is first.thread and third.thread is first.thread
    assert (second.name, third.name) == (f"asynchat-{again.name}", f"asynchat-{predictor.name}")


async def test_an_idle_worker_keeps_nothing_of_the_loop_it_ran() -> None:
    """A finished job's model, optimizer and data go when its caller drops them, though its
    compute thread waits in the pool (the thread used to hold its last lease, and through
    it the loop, for IDLE_TIMEOUT_S: 5 minutes of a service's memory)."""
    where = Where()
    trainer = make_trainer(where, num_steps=3)
    await trainer.fit()
    assert where.thread is not None and where.thread.name == "asynchat-idle-cpu"
    model, loop = weakref.ref(trainer.model), weakref.ref(trainer)
    del trainer
    gc.collect()  # a loop's objects refer to each other (state.loop): a cycle
    assert loop() is None and model() is None
    assert where.thread.is_alive(), "while the worker waits for the next loop"


async def test_loops_running_at_the_same_time_take_threads_of_their_own() -> None:
    barrier = threading.Barrier(2, timeout=20)  # breaks (and fails the test) if they queue
    a, b, after = Where(barrier=barrier), Where(barrier=barrier), Where()
    async with anyio.create_task_group() as group:
        group.start_soon(make_trainer(a, num_steps=3).fit)
        group.start_soon(make_trainer(b, num_steps=3).fit)
    assert a.thread is not None and b.thread is not None and a.thread is not b.thread
    await make_trainer(after, num_steps=2).fit()
    assert after.thread in (a.thread, b.thread)


async def test_a_device_keeps_at_most_max_idle_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst of loops at the same time, the surplus threads end (the longest idle
    first); the pool does not keep one per loop the burst had."""
    monkeypatch.setattr(compute_module, "MAX_IDLE_PER_DEVICE", 2)
    barrier = threading.Barrier(4, timeout=20)
    loops = [Where(barrier=barrier) for _ in range(4)]
    async with anyio.create_task_group() as group:
        for where in loops:
            group.start_soon(make_trainer(where, num_steps=2).fit)
    threads = [where.thread for where in loops if where.thread is not None]
    assert len(set(threads)) == 4

    # Waited for here, on the event loop's thread: the surplus ones were told to end before
    # fit() returned. (Not in anyio.to_thread: trio's cached thread would end 10 s later,
    # in another test that counts the process's threads.)
    deadline = time.monotonic() + 10
    while sum(t.is_alive() for t in threads) > 2 and time.monotonic() < deadline:
        for thread in threads:
            thread.join(0.01)
    assert sum(t.is_alive() for t in threads) == 2
    assert len([t for t in threading.enumerate() if t.name == "asynchat-idle-cpu"]) == 2


async def test_a_lease_starts_where_a_new_thread_would() -> None:
    class Careless(Callback):
        """Changes thread-local torch settings and leaves them so."""

        def on_loop_end(self, state: LoopState) -> None:
            torch.set_grad_enabled(False)
            torch.set_num_threads(1)

    first, second = Where(), Where()
    await make_trainer(first, Careless(), num_steps=2).fit()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the next fit()'s compute thread takes the caller's setting
    try:
        await make_trainer(second, num_steps=2).fit()
    finally:
        torch.set_num_threads(threads)
    assert second.thread is first.thread
    assert second.grad_enabled is True
    assert second.num_threads == 2


async def test_an_idle_worker_ends_after_its_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compute_module, "IDLE_TIMEOUT_S", 0.2)
    where = Where()
    await make_trainer(where, num_steps=2).fit()
    assert where.thread is not None
    where.thread.join(10)
    assert not where.thread.is_alive()
    monkeypatch.undo()
    again = Where()  # and the pool lends a new thread after that
    await make_trainer(again, num_steps=2).fit()
    assert again.thread is not None and again.thread is not where.thread


def test_idle_workers_do_not_hold_up_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import anyio
        from conftest import make_trainer
        anyio.run(make_trainer(num_steps=2).fit)
        print([t.name for t in threading.enumerate()], flush=True)
        print(time.monotonic(), flush=True)
        """)
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    ended = time.monotonic()
    assert done.returncode == 0, done.stderr
    names, last = done.stdout.splitlines()
    assert "asynchat-idle-cpu" in names, "the worker was idle in the pool at exit"
    # Not IDLE_TIMEOUT_S (300 s): the idle worker is told to end before the interpreter
    # joins its threads. Generous for a loaded machine; the hold-up it guards against is 300 s.
    assert ended - float(last) < 30


def _fit_in_child() -> None:
    anyio.run(make_trainer(num_steps=2).fit)


def test_a_forked_child_starts_workers_of_its_own() -> None:
    """The parent's idle workers are not threads of a forked child: the child must not wait on
    them (it would wait forever)."""
    anyio.run(make_trainer(num_steps=2).fit)  # the parent now has an idle worker
    with warnings.catch_warnings():  # Python 3.12+ warns about fork() with threads alive
        warnings.simplefilter("ignore", DeprecationWarning)
        child = multiprocessing.get_context("fork").Process(target=_fit_in_child)
        child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0


async def test_a_worker_that_cannot_take_the_device_ends_and_the_next_loop_gets_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = Where()
    await make_trainer(first, num_steps=2).fit()  # an idle worker is in the pool now
    prepare = compute_module._Worker.prepare

    def failing(self: compute_module._Worker, num_threads: int) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(compute_module._Worker, "prepare", failing)
    trainer = make_trainer(num_steps=2)
    with pytest.raises(RuntimeError, match="could not select device cpu") as caught:
        await trainer.fit()
    assert "no CUDA-capable device" in str(caught.value.__cause__)
    assert first.thread is not None and not first.thread.is_alive(), "it ended, joined"
    monkeypatch.setattr(compute_module._Worker, "prepare", prepare)
    again = Where()
    await make_trainer(again, num_steps=2).fit()
    assert again.thread is not None and again.thread is not first.thread
