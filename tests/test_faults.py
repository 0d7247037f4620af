"""Fault injection, short: errors in every phase with every shipped callback present, teardown
that loses nothing, and resources checked over many fits. The long version of each is
``benchmarks/faults.py``."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
from conftest import (
    Unsized,
    engine_threads,
    make_loader,
    make_model,
    make_trainer,
    sgd,
    wait_for_line,
)
from torch import nn
from torch.utils.data import DataLoader

from asynchat import BasicBatchProcessor, Callback, LoopState, LoopStatus, Phase, Trainer
from asynchat.callbacks import (
    Checkpoint,
    EarlyStopping,
    ExponentialMovingAverage,
    GradClip,
    JSONLinesLogger,
    LRSchedule,
    Progress,
    StatsMonitor,
    TerminateOnNaN,
    Validation,
    cosine,
    load_checkpoint,
)


class Boom(Exception):
    pass


def raising(phase: str, *, is_async: bool) -> Callback:
    """A callback whose ``phase`` hook raises Boom (once), as ``def`` or ``async def``."""

    def fail(state: LoopState) -> None:
        raise Boom(f"{phase} ({'async' if is_async else 'def'})")

    async def fail_async(self: Callback, state: LoopState) -> None:
        fail(state)

    def fail_sync(self: Callback, state: LoopState) -> None:
        fail(state)

    cls = type("Raising", (Callback,), {phase: fail_async if is_async else fail_sync})
    return cls()  # type: ignore[no-any-return]


def every_shipped_callback(tmp_path: Path) -> list[Callback]:
    return [
        Validation(make_loader(32, 16), loss_fn=nn.CrossEntropyLoss()),
        LRSchedule(cosine(100)),
        GradClip(1.0),
        ExponentialMovingAverage(0.9),
        TerminateOnNaN(check_every_n_steps=2),
        StatsMonitor(every_n_steps=2),
        EarlyStopping("val/loss", patience=100),
        JSONLinesLogger(tmp_path / "log.jsonl", every_n_steps=1),
        Progress(stream=io.StringIO()),
        Checkpoint(tmp_path / "ckpt", every_n_steps=2),
    ]


PHASES = [p.value for p in Phase]


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["def", "async"])
@pytest.mark.parametrize("exc", [GeneratorExit, SystemExit, StopAsyncIteration])
async def test_an_odd_exception_from_a_hook_fails_the_run_and_is_raised_as_itself(
    exc: type[BaseException], is_async: bool
) -> None:
    # Regression: a GeneratorExit raised by a hook (sys.exit's SystemExit, a StopAsyncIteration
    # came out right) was taken for a Predictor's stream closed early: fit() raised it with
    # the status "finished", and the end event said so too.
    class Raising(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 2:
                raise exc()

    class RaisingAsync(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            Raising.on_step_end(self, state)  # type: ignore[arg-type]

    trainer = make_trainer(RaisingAsync() if is_async else Raising(), num_epochs=1)
    ends: list[LoopStatus] = []

    async def watch() -> None:
        async for event in trainer.events(progress_every=None):
            ends.append(event.snapshot.status)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        with pytest.raises(exc):
            await trainer.fit()
    assert trainer.status is LoopStatus.FAILED and ends[-1] is LoopStatus.FAILED
    assert isinstance(trainer.state.exception, exc) and trainer.state.global_step == 2


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["def", "async"])
@pytest.mark.parametrize("phase", PHASES)
async def test_an_error_in_any_phase_with_every_callback_present_loses_nothing(
    tmp_path: Path, phase: str, is_async: bool
) -> None:
    callbacks = [raising(phase, is_async=is_async), *every_shipped_callback(tmp_path)]
    trainer = make_trainer(*callbacks, num_epochs=2)
    with pytest.raises(Boom) as caught:
        await trainer.fit()
    assert trainer.status is LoopStatus.FAILED
    note = "".join(getattr(caught.value, "__notes__", []))
    assert f"phase {phase}" in note or phase == "on_loop_end"
    # Every callback's teardown ran: the writer joined, the log closed, no thread left.
    assert not engine_threads()
    log: Any = callbacks[8]
    assert log._log is None
    checkpoints = sorted((tmp_path / "ckpt").glob("step-*.ckpt"))
    for file in checkpoints:  # whatever was written is complete
        load_checkpoint(file)
    if phase == "on_loop_end":
        # The error came after training: the final checkpoint of the last step is there.
        assert checkpoints[-1].name == f"step-{trainer.state.global_step:09d}.ckpt"


class RaisingAtLoopEnd(Callback):
    def __init__(self, message: str) -> None:
        self.message = message

    def on_loop_end(self, state: LoopState) -> None:
        raise Boom(self.message)


class AsyncRaisingAtLoopEnd(Callback):
    async def on_loop_end(self, state: LoopState) -> None:
        raise ValueError("async teardown failed too")


@pytest.mark.anyio
async def test_every_on_loop_end_runs_and_the_first_error_carries_the_others(
    tmp_path: Path,
) -> None:
    first, checkpoint = RaisingAtLoopEnd("first"), Checkpoint(tmp_path, every_n_steps=4)
    log = JSONLinesLogger(tmp_path / "log.jsonl", every_n_steps=1)
    trainer = make_trainer(
        first, AsyncRaisingAtLoopEnd(), RaisingAtLoopEnd("third"), checkpoint, log, num_steps=6
    )
    with pytest.raises(Boom, match="first") as caught:
        await trainer.fit()
    notes = "\n".join(caught.value.__notes__)
    assert "async teardown failed too" in notes and "Boom: third" in notes
    assert (tmp_path / "step-000000006.ckpt").exists()  # Checkpoint's final save ran
    assert log._log is None  # and the logger closed its file
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6


@pytest.mark.anyio
async def test_a_step_error_says_where_it_happened_and_stays_itself() -> None:
    error = Boom("in the model")

    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 9:
                raise error
            return self.linear(x)  # type: ignore[no-any-return]

    trainer = make_trainer(num_epochs=3)
    trainer.model = Failing()
    trainer.state.model = trainer.model
    with pytest.raises(Boom) as caught:
        await trainer.fit()
    assert caught.value is error
    # It said "phase on_batch_begin" alone, as if a callback's on_batch_begin had raised it.
    assert caught.value.__notes__ == [
        f"asynchat: raised in {trainer.name} at epoch 1, step 2 (global step 8), in "
        "BasicBatchProcessor's step, after the hooks of phase on_batch_begin"
    ]
    hooked = make_trainer(raising("on_batch_begin", is_async=False))
    with pytest.raises(Boom) as caught:
        await hooked.fit()
    assert caught.value.__notes__ == [
        f"asynchat: raised in {hooked.name} at epoch 0, step 0 (global step 0), phase "
        "on_batch_begin"
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("returns", [tuple, dict])
async def test_a_model_output_that_the_loss_cannot_take_says_why(returns: type) -> None:
    # A model returning a tuple or a dict (a ModelOutput) made loss_fn raise torch's
    # "must be Tensor, not tuple", raised as itself; a note now says what loss_fn was given.
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model()

        def forward(self, x: torch.Tensor) -> Any:
            logits = self.inner(x)
            return (logits, x) if returns is tuple else {"logits": logits}

    trainer = Trainer(Wrapped(), make_loader(96, 16), sgd, loss_fn=nn.CrossEntropyLoss(),
                      num_epochs=1)  # fmt: skip
    with pytest.raises(TypeError, match="must be Tensor") as caught:
        await trainer.fit()
    assert f"the model returned a {returns.__name__}, which loss_fn got as it is" in "".join(
        caught.value.__notes__
    )


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["reduction-none", "frozen", "no-grad"])
async def test_a_loss_that_cannot_be_trained_on_is_refused_saying_why(how: str) -> None:
    # Torch's own errors ("grad can be implicitly created only for scalar outputs", "element 0
    # of tensors does not require grad and does not have a grad_fn") named neither the loss
    # nor the likely cause.
    model = make_model()
    if how == "frozen":
        model.requires_grad_(False)

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if how == "no-grad":
            outputs = outputs.detach()
        reduction = "none" if how == "reduction-none" else "mean"
        return nn.functional.cross_entropy(outputs, targets, reduction=reduction)

    trainer = Trainer(model, make_loader(96, 16), sgd, loss_fn=loss_fn, num_epochs=1)
    why = (
        "must be a single number, got a tensor of shape \\(16,\\)"
        if how == "reduction-none"
        else "depends on no parameter that trains"
    )
    with pytest.raises(ValueError, match=why):
        await trainer.fit()
    assert trainer.state.global_step == 0


@pytest.mark.anyio
@pytest.mark.parametrize("returned", [1.5, None, [0.5]], ids=["float", "none", "list"])
@pytest.mark.parametrize("accumulation", [1, 2])
async def test_a_loss_that_is_no_tensor_is_refused_saying_so(
    returned: Any, accumulation: int
) -> None:
    # Regression: "'float' object has no attribute 'backward'" (a loss function returning
    # loss.item()), or "unsupported operand type(s) for /" with accumulation.
    processor = BasicBatchProcessor(
        lambda outputs, targets: returned, grad_accumulation_steps=accumulation
    )
    trainer = Trainer(make_model(), make_loader(96, 16), sgd, batch_processor=processor,
                      num_epochs=1)  # fmt: skip
    kind = type(returned).__name__
    with pytest.raises(TypeError, match=f"the loss to train on must be a tensor .*, got {kind} "):
        await trainer.fit()
    assert trainer.state.global_step == 0


class BadBatch(torch.utils.data.Dataset[Any]):
    """The data of ``make_loader()`` whose sample 80 (batch 5 of 6) raises in its second
    epoch."""

    def __init__(self) -> None:
        self.samples = make_loader().dataset
        self.epoch_reads = 0

    def __len__(self) -> int:
        return 96

    def __getitem__(self, index: int) -> Any:
        self.epoch_reads += index == 0
        if index == 80 and self.epoch_reads == 2:
            raise Boom("sample 80 is unreadable")
        return self.samples[index]


@pytest.mark.anyio
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("sized", [True, False], ids=["len", "no-len"])
async def test_a_data_error_says_it_was_raised_reading_the_data(prefetch: int, sized: bool) -> None:
    # It said "phase on_step_end": the last phase run, not where it was raised.
    loader: Any = DataLoader(BadBatch(), batch_size=16)
    if not sized:
        loader = Unsized(loader)
    trainer = make_trainer(loader=loader, num_epochs=3, prefetch=prefetch)
    with pytest.raises(Boom, match="unreadable") as caught:
        await trainer.fit()
    assert caught.value.__notes__[-1] == (
        f"asynchat: raised in {trainer.name} reading its data, in epoch 1 after global step 11"
    )
    assert trainer.state.global_step == 11  # every batch read before it trained


def test_many_fits_leave_no_threads_fds_or_growing_memory(tmp_path: Path) -> None:
    """The short version of the 200-fit soak in benchmarks/faults.py."""

    def fd_count() -> int:
        return len(os.listdir("/proc/self/fd"))

    def fit(i: int) -> None:
        trainer = make_trainer(
            Checkpoint(tmp_path / f"run-{i}", every_n_steps=3),  # a fresh run: its own
            JSONLinesLogger(tmp_path / "log.jsonl"),
            num_steps=6,
        )
        anyio.run(trainer.fit)

    for i in range(5):  # warm-up: torch and the allocator settle
        fit(i)
    gc.collect()
    threads, fds = threading.active_count(), fd_count()
    objects = len(gc.get_objects())
    for i in range(30):
        fit(100 + i)  # after the warm-up's directories
    gc.collect()
    assert threading.active_count() == threads
    assert fd_count() <= fds
    assert len(gc.get_objects()) < objects * 1.05


class RaisingStream:
    """Stands in for a CUDA stream whose synchronize() hits a sticky error."""

    def synchronize(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.anyio
@pytest.mark.parametrize("job_fails", [False, True], ids=["job-ok", "job-raises"])
async def test_an_error_from_the_end_of_job_stream_sync_reaches_fit(
    monkeypatch: pytest.MonkeyPatch, job_fails: bool
) -> None:
    from asynchat._compute import _Worker

    def prepare(self: _Worker, num_threads: int) -> None:
        self.stream = RaisingStream()  # type: ignore[assignment]

    monkeypatch.setattr(_Worker, "prepare", prepare)
    threads: list[threading.Thread] = []

    class Remember(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            threads.append(threading.current_thread())

    callbacks = [raising("on_step_end", is_async=False)] if job_fails else []
    trainer = make_trainer(Remember(), *callbacks, num_steps=3)
    with anyio.fail_after(30):  # before the fix the compute thread died and fit() hung
        with pytest.raises((RuntimeError, Boom)) as caught:
            await trainer.fit()
    if job_fails:  # the job's own error wins; the sync error is attached
        assert isinstance(caught.value, Boom)
        assert "illegal memory access" in "".join(caught.value.__notes__)
    else:
        assert "illegal memory access" in str(caught.value)
    # A worker whose device may be broken is not lent to the next loop: its thread ends.
    (thread,) = threads
    thread.join(5)
    assert not thread.is_alive()


class BlockingLoader:
    """Three batches, then ``__next__`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(3)]

    def __iter__(self) -> Any:
        yield from self.data
        self.release.wait()

    def __repr__(self) -> str:
        return "<BlockingLoader>"


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_a_loader_blocked_forever_does_not_hold_stop_or_cancel(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The loop waits in a read that never returns: stop() and cancellation end it anyway."""
    from asynchat import _prefetch

    monkeypatch.setattr(_prefetch, "JOIN_TIMEOUT_S", 0.5)
    # No len(): the loop reads one item ahead, so step 3 waits for the 4th, which never comes.
    loader = BlockingLoader()
    steps = 2
    stepped = anyio.Event()

    class Stepped(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == steps:
                stepped.set()

    trainer = make_trainer(Stepped(), loader=loader, num_epochs=1)

    async def stop_once_blocked() -> None:
        await stepped.wait()
        await anyio.sleep(0.2)  # the loop now waits in the read
        trainer.stop("enough")

    try:
        with (
            pytest.warns(RuntimeWarning, match=r"<BlockingLoader> did not return from __next__"),
            anyio.fail_after(20),
        ):
            if how == "stop":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_once_blocked)
                    await trainer.fit()
            else:
                with anyio.move_on_after(1.0):
                    await trainer.fit()
        assert trainer.status is (LoopStatus.FINISHED if how == "stop" else LoopStatus.CANCELLED)
        assert trainer.state.global_step == steps
    finally:
        loader.release.set()  # the data thread left behind ends once the loader returns
        for thread in threading.enumerate():
            if thread.name.endswith("-data"):
                thread.join(10)


# Run in a process of its own: the data thread left blocked stays until that process ends.
BLOCKED_WORKERS_JOB = textwrap.dedent("""
    import multiprocessing, time
    import anyio, torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from asynchat import Trainer, _prefetch

    _prefetch.JOIN_TIMEOUT_S = 0.5

    class Hangs(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            if i >= 16:
                time.sleep(3600)  # a read that never returns (a hung network mount)
            return torch.randn(4), torch.randn(1)

    async def main():
        loader = DataLoader(Hangs(), batch_size=4, num_workers=2)
        trainer = Trainer(nn.Linear(4, 1), loader, lambda m: torch.optim.SGD(m.parameters(), 0.1),
                          loss_fn=nn.MSELoss(), num_epochs=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(trainer.fit)
            while trainer.state.global_step < 4:  # the 5th batch never comes
                await anyio.sleep(0.05)
            print(len(multiprocessing.active_children()), "workers", flush=True)
            trainer.stop("enough")
        print(trainer.status.value, flush=True)
        deadline = time.monotonic() + 30
        while multiprocessing.active_children() and time.monotonic() < deadline:
            await anyio.sleep(0.1)
        print(len(multiprocessing.active_children()), "workers", flush=True)

    anyio.run(main)
""")


def test_the_workers_of_a_loader_blocked_forever_are_shut_down() -> None:
    # Regression: a DataLoader whose workers never returned a batch kept them (and their
    # copies of the dataset) for the life of the process once the loop had given up on
    # it: in a long-running service, every such job leaked its worker processes.
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_WORKERS_JOB], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split("\n") == ["2 workers", "finished", "0 workers", ""], done.stderr
    assert "its worker processes are shut down" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.137])
def test_sigkill_at_a_random_moment_of_saving_then_resume_is_bitwise(
    tmp_path: Path, delay: float
) -> None:
    """The short version of the 25-kill run in benchmarks/faults.py."""
    import subprocess
    import sys

    from test_checkpoint import HERE, assert_bitwise_equal, run_job

    out, directory, total = tmp_path / "result", tmp_path / "ckpt", 30
    run_job("straight", out, total, 0, directory, "generator")
    command = [sys.executable, str(HERE / "resume_job.py"), "killable", str(out), str(total),
               "0", str(directory), "generator"]  # fmt: skip
    with subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, text=True) as job:
        wait_for_line(job, "step 3")  # a save is complete by now
        time.sleep(delay)
        job.kill()
    run_job("resume", out, total, 0, directory, "generator")
    straight = torch.load(f"{out}.straight", weights_only=True)
    resumed = torch.load(f"{out}.resume", weights_only=True)
    assert resumed["global_step"] == total
    for key in ("model", "optimizer", "counter", "torch_rng"):
        assert_bitwise_equal(resumed[key], straight[key], key)


class AsyncStep(Callback):
    async def on_step_end(self, state: LoopState) -> None:
        await anyio.lowlevel.checkpoint()


async def fit_cancelled_after(directory: Path, delay: float) -> Trainer:
    """A trainer with an ``async def`` step hook, a checkpoint every 3 steps and an event
    subscriber, cancelled ``delay`` seconds into its run; returned once it has ended."""
    trainer = make_trainer(AsyncStep(), Checkpoint(directory, every_n_steps=3), num_epochs=10_000)
    async with anyio.create_task_group() as tg:

        async def subscribe() -> None:
            async for _ in trainer.events(progress_every=0.05):
                pass

        tg.start_soon(subscribe)
        with anyio.move_on_after(delay):
            await trainer.fit()
    return trainer


def assert_cancelled_with_the_last_step_saved(trainer: Trainer, directory: Path) -> None:
    assert trainer.status is LoopStatus.CANCELLED, trainer.status
    newest = max(directory.glob("step-*.ckpt"))
    assert newest.name == f"step-{trainer.state.global_step:09d}.ckpt", newest
    load_checkpoint(newest)


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_cancel_at_a_random_moment_keeps_the_last_step(tmp_path: Path, seed: int) -> None:
    """The short version of the 50 random cancellations in benchmarks/faults.py."""
    import random

    trainer = await fit_cancelled_after(tmp_path, random.Random(seed).uniform(0.05, 0.5))
    assert_cancelled_with_the_last_step_saved(trainer, tmp_path)
