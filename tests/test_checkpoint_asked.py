"""Saves asked for: by the clock (``every_n_seconds``) and on demand (``request_save()``)."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import re
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import (
    AskAt,
    FailAt,
    asked_as_a_run_fails_to_resume,
    make_loader,
    make_model,
    make_trainer,
    sgd,
)
from torch import nn

import asynchat._mailbox
from asynchat import (
    AwaitableFuture,
    BasicBatchProcessor,
    Callback,
    CheckpointError,
    LoopState,
    LoopStatus,
    Trainer,
)
from asynchat._mailbox import Mailbox
from asynchat.callbacks import Checkpoint, Validation


def manifest_entries(directory: Path) -> list[dict[str, Any]]:
    if not (directory / "manifest.json").exists():
        return []
    entries: list[dict[str, Any]] = json.loads((directory / "manifest.json").read_text())[
        "checkpoints"
    ]
    return entries


def saved_steps(directory: Path) -> list[int]:
    return [entry["global_step"] for entry in manifest_entries(directory)]


def on_demand(directory: Path) -> Checkpoint:
    """A Checkpoint that saves only when asked (its epochs' schedule is never due)."""
    return Checkpoint(directory, every_n_epochs=1000, keep_last=None, save_on_end=False)


class SlowSteps(Callback):
    """Each step takes ``seconds`` longer; records when each checkpoint's snapshot is taken."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.snapshots: list[tuple[int, float]] = []

    def on_step_end(self, state: LoopState) -> None:
        time.sleep(self.seconds)

    def on_checkpoint(self, state: LoopState) -> None:
        self.snapshots.append((state.global_step, time.monotonic()))


@pytest.mark.anyio
async def test_every_n_seconds_saves_once_that_much_training_time_has_passed(
    tmp_path: Path,
) -> None:
    slow = SlowSteps(0.02)
    checkpoint = Checkpoint(tmp_path, every_n_seconds=0.1, keep_last=None, save_on_end=False)
    started = time.monotonic()
    await make_trainer(slow, checkpoint, num_epochs=4).fit()  # 24 steps, 0.48 s at least
    steps = [step for step, _ in slow.snapshots]
    times = [started] + [at for _, at in slow.snapshots]
    assert len(steps) >= 2 and steps == saved_steps(tmp_path), steps
    # None before 0.1 s since the last save, or since the run began.
    assert all(later - earlier >= 0.1 for earlier, later in itertools.pairwise(times)), times


@pytest.mark.anyio
async def test_time_held_by_pause_does_not_count_towards_every_n_seconds(
    tmp_path: Path,
) -> None:
    class PauseAt(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 5:
                state.loop.pause()
                threading.Timer(3.0, state.loop.resume).start()

    # 12 steps of a few ms (a second or two on a machine that is busy): under 2 s.
    checkpoint = Checkpoint(tmp_path, every_n_seconds=2.0, keep_last=None)
    trainer = make_trainer(PauseAt(), checkpoint, num_epochs=2)
    await trainer.fit()  # held for 3 s after the fifth step
    assert trainer.paused_s > 2.0  # longer than every_n_seconds by itself
    # Counted, the hold made a save due at step 6; only the run's end saved.
    assert saved_steps(tmp_path) == [12]


@pytest.mark.anyio
async def test_request_save_from_the_event_loop_saves_while_the_loop_runs(
    tmp_path: Path,
) -> None:
    checkpoint = on_demand(tmp_path)
    trainer = make_trainer(SlowSteps(0.01), checkpoint, num_epochs=1000)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(trainer.fit)
        async with aclosing(trainer.events(progress_every=0.01)) as events:
            async for event in events:  # the service's way: ask while it trains
                if event.snapshot.global_step >= 3:
                    break
        with anyio.fail_after(30):  # (awaited on any backend)
            path = await checkpoint.request_save()
        [step] = saved_steps(tmp_path)  # written and listed as the future resolves
        trainer.stop()
    assert path == tmp_path / f"step-{step:09d}.ckpt" == checkpoint.last_path
    assert 3 <= step < trainer.state.global_step
    saved = torch.load(path, weights_only=True)
    assert saved["progress"]["global_step"] == step


@pytest.mark.anyio
async def test_a_wait_for_the_save_of_a_paused_loop_can_be_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Awaited through anyio.to_thread.run_sync(future.result), as the README said to do on
    # trio, the wait held a thread and could not be cancelled: a timeout around the wait
    # for the save of a paused loop never came, and the loop was never resumed.
    monkeypatch.setattr(asynchat._mailbox, "STALLED_AFTER_S", 0.1)  # (paused: not stalled)
    checkpoint = on_demand(tmp_path)
    trainer = make_trainer(checkpoint, num_epochs=1000)
    waited: list[Path | None] = []

    async def wait(future: AwaitableFuture[Path | None]) -> None:
        waited.append(await future)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(trainer.fit)
        with anyio.fail_after(30):
            while trainer.state.global_step < 3:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        trainer.pause()
        with anyio.fail_after(30):
            while trainer.status is not LoopStatus.PAUSED:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        asked = checkpoint.request_save()
        started = time.monotonic()
        with anyio.move_on_after(0.5) as gave_up:
            await asked
        assert gave_up.cancelled_caught and time.monotonic() - started < 10
        assert not asked.done()  # given up, not cancelled: its other waiters still wait
        for _ in range(2):
            tasks.start_soon(wait, asked)
        with anyio.fail_after(30):
            while len(asked._waiting) < 2:  # noqa: ASYNC110  # (the one given up is gone)
                await anyio.sleep(0.01)
        trainer.resume()
        with anyio.fail_after(30):
            path = await asked
        trainer.stop()
    assert waited == [path, path] and path == checkpoint.last_path
    assert path is not None and path.is_file()
    with pytest.raises(CheckpointError, match="no save asked for: no loop runs with it"):
        await checkpoint.request_save()  # answered at once
    assert "a task has waited" not in caplog.text


@pytest.mark.anyio
async def test_a_save_awaited_by_a_task_the_hook_waits_for_is_logged_as_it_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The hook waits for a task of a task group it opened, the task for the save, the save
    # for the hook: no error can say so at once (the task cannot be told from one of a
    # group the fit()'s own task opened, which the hook does not wait for), and the run
    # stopped without a word. A wait that goes on while the loop waits for a hook is
    # logged, saying what it may be.
    monkeypatch.setattr(asynchat._mailbox, "STALLED_AFTER_S", 0.3)
    checkpoint = on_demand(tmp_path)

    async def save() -> None:
        await checkpoint.request_save()

    class SavesInATask(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(save)

    trainer = make_trainer(SavesInATask(), checkpoint, num_steps=6)
    with caplog.at_level(logging.WARNING, "asynchat.loop"), anyio.move_on_after(1.5) as hung:
        await trainer.fit()
    assert hung.cancelled_caught and trainer.status is LoopStatus.CANCELLED
    stalled = [r.getMessage() for r in caplog.records if "a task has waited" in r.getMessage()]
    assert stalled == [
        f"a task has waited 0.3 s for the save asked for, which is made once the async def "
        f"hook {trainer.name} waits for has returned: if that hook waits for this task (one "
        "of a task group it opened, say), neither will end. Wait for the future in a task "
        "the hook does not wait for"
    ]


@pytest.mark.anyio
async def test_waits_given_up_leave_nothing_behind_and_the_answer_wakes_the_others() -> None:
    # Each wait added a callback to the future, kept after the wait was given up, with its
    # mailbox (and its event loop) until the future was answered: a service's clients
    # asking a paused job again and again piled them up.
    future: AwaitableFuture[int] = AwaitableFuture()

    def mailboxes() -> int:
        gc.collect()
        return sum(type(o) is Mailbox for o in gc.get_objects())

    before = mailboxes()
    for _ in range(50):
        with anyio.move_on_after(0.001):
            await future
    assert mailboxes() <= before + 1  # (50 more before; the last wait's cancellation may
    # still hold its frame, and the mailbox in it)
    answers: list[int] = []

    async def wait() -> None:
        answers.append(await future)

    async with anyio.create_task_group() as tasks:
        for _ in range(2):
            tasks.start_soon(wait)
        with anyio.fail_after(30):
            while len(future._waiting) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        threading.Thread(target=future.set_result, args=(7,)).start()
    assert answers == [7, 7] and not future._waiting
    assert await future == 7  # answered: at once


@pytest.mark.anyio
async def test_a_save_awaited_in_the_loops_own_async_hook_is_refused(tmp_path: Path) -> None:
    # It is made after the hook returns, and the loop waits for the hook: awaited there it
    # waited forever (no error, no step, no save; the asyncio backend's fit() never ended).
    checkpoint = on_demand(tmp_path)

    class SavesAndUploads(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                await checkpoint.request_save()

    trainer = make_trainer(SavesAndUploads(), checkpoint, num_steps=6)
    with anyio.fail_after(60), pytest.raises(RuntimeError) as raised:
        await trainer.fit()
    assert str(raised.value) == (
        f"the save asked for is made once the hook waiting for it has returned "
        f"({trainer.name} waits for its hooks): waited for there it would wait forever. Ask "
        "in the hook and wait for the future in a task or thread of your own (or after the "
        "loop)"
    )


@pytest.mark.anyio
async def test_a_save_awaited_beside_a_hook_by_a_task_of_the_fits_own_group_is_served(
    tmp_path: Path,
) -> None:
    # The task that awaits fit() serves the loop's async hooks, and here it also hosts the
    # group of a client (a service's server) that awaits a save while a hook runs: the
    # hook does not wait for the client, so the save comes once the hook returns. A guard
    # that took every task of a group the hook's task hosts for one the hook waits for
    # refused it.
    checkpoint = on_demand(tmp_path)
    in_hook = anyio.Event()
    saved: list[Path | None] = []

    class Slow(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                in_hook.set()
                await anyio.sleep(0.2)

    async def client() -> None:
        await in_hook.wait()
        saved.append(await checkpoint.request_save())

    trainer = make_trainer(Slow(), checkpoint, num_steps=6)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client)
            await trainer.fit()
    assert saved == [tmp_path / "step-000000003.ckpt"] and saved_steps(tmp_path) == [3]


@pytest.mark.anyio
async def test_an_answered_ask_keeps_no_loop_alive(tmp_path: Path) -> None:
    # Its guard against a wait in the loop's own hooks held the loop (and with it the
    # model, the optimizer, the data) for as long as someone kept the future.
    checkpoint = on_demand(tmp_path)
    asking = AskAt(checkpoint, 2)
    trainer = make_trainer(asking, checkpoint, num_steps=4)
    await trainer.fit()
    gone = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert gone() is None and asking.served() == [tmp_path / "step-000000002.ckpt"]


@pytest.mark.anyio
async def test_a_save_waited_for_in_the_loops_own_def_hook_is_refused(tmp_path: Path) -> None:
    # On the compute thread, result() blocked the thread that was to make the save.
    checkpoint = on_demand(tmp_path)
    errors: list[str] = []

    class SavesAndReads(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                asked = checkpoint.request_save()
                for wait in (asked.result, asked.exception):
                    with pytest.raises(RuntimeError, match="waited for there") as raised:
                        wait(30)  # (with a time: it would have run out all the same)
                    errors.append(str(raised.value))
                    with pytest.raises(TimeoutError):
                        wait(0)  # a look: not yet (it raised the RuntimeError too)

    await make_trainer(SavesAndReads(), checkpoint, num_steps=6).fit()
    assert len(errors) == 2 and saved_steps(tmp_path) == [3]  # the ask itself holds


@pytest.mark.anyio
async def test_a_save_awaited_in_a_hook_of_a_loop_run_inside_the_trainer_is_refused(
    tmp_path: Path,
) -> None:
    # Validation's predictor runs on the trainer's compute thread, inside its step: the
    # trainer waits for the predictor's async def hooks as for its own.
    checkpoint = on_demand(tmp_path)

    class SavesAfterValidating(Callback):
        async def on_loop_end(self, state: LoopState) -> None:
            await checkpoint.request_save()

    validation = Validation(
        make_loader(32, 16), loss_fn=nn.CrossEntropyLoss(), callbacks=[SavesAfterValidating()]
    )
    trainer = make_trainer(validation, checkpoint, num_epochs=2)
    with anyio.fail_after(60), pytest.raises(RuntimeError, match=r"\(trainer-\d+ waits for its"):
        await trainer.fit()


@pytest.mark.anyio
async def test_a_save_asked_in_an_async_hook_is_awaited_by_a_task_it_starts(
    tmp_path: Path,
) -> None:
    checkpoint = on_demand(tmp_path)
    saved: list[Path | None] = []

    async def upload(future: AwaitableFuture[Path | None]) -> None:
        saved.append(await future)  # (in a task of its own: the hook has returned)

    async with anyio.create_task_group() as tasks:

        class SavesAndUploads(Callback):
            async def on_step_end(self, state: LoopState) -> None:
                if state.global_step == 3:
                    tasks.start_soon(upload, checkpoint.request_save())

        with anyio.fail_after(60):
            await make_trainer(SavesAndUploads(), checkpoint, num_steps=6).fit()
    assert saved == [tmp_path / "step-000000003.ckpt"] == [checkpoint.last_path]  # (it runs last)


@pytest.mark.anyio
async def test_request_save_from_a_signal_handler_saves_at_a_later_step(tmp_path: Path) -> None:
    # A batch scheduler's warning before it preempts the job (SLURM's --signal=USR1@60).
    checkpoint = on_demand(tmp_path)

    class SignalAt(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # handled on the main thread

    asked: list[Future[Path | None]] = []
    before = signal.signal(signal.SIGUSR1, lambda *_: asked.append(checkpoint.request_save()))
    try:
        await make_trainer(SignalAt(), SlowSteps(0.01), checkpoint, num_steps=30).fit()
    finally:
        signal.signal(signal.SIGUSR1, before)
    [step] = saved_steps(tmp_path)
    assert 3 <= step < 30
    assert [f.result(timeout=0) for f in asked] == [tmp_path / f"step-{step:09d}.ckpt"]


@pytest.mark.anyio
async def test_a_requested_save_waits_for_the_window_and_at_an_epochs_last_step_for_its_end(
    tmp_path: Path,
) -> None:
    checkpoint = on_demand(tmp_path)
    validation = Validation(
        [(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))], loss_fn=nn.CrossEntropyLoss()
    )
    trainer = Trainer(
        make_model(),
        make_loader(96, 16),  # 6 steps an epoch: windows of 4 steps 1-4, 5-6, 7-10, 11-12, ...
        sgd,
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), grad_accumulation_steps=4),
        num_epochs=3,
        callbacks=[ask := AskAt(checkpoint, 7, 12), validation, checkpoint],
    )
    await trainer.fit()
    # Asked at 7, inside the window 7-10: saved at 10, where its gradients are applied.
    # Asked at 12, the second epoch's last step: saved at the epoch's end, with its
    # validation (measured at step 12).
    entries = manifest_entries(tmp_path)
    assert [e["global_step"] for e in entries] == [10, 12]
    assert "val/loss" not in entries[0]["metrics"] and "val/loss" in entries[1]["metrics"]
    saved = torch.load(tmp_path / "step-000000012.ckpt", weights_only=True)
    assert saved["progress"]["epoch_exhausted"] is True
    assert ask.served() == [tmp_path / "step-000000010.ckpt", tmp_path / "step-000000012.ckpt"]


@pytest.mark.anyio
async def test_a_save_asked_as_the_run_ends_is_saved_and_one_between_runs_is_dropped(
    tmp_path: Path,
) -> None:
    checkpoint = on_demand(tmp_path)
    ask = AskAt(checkpoint, at_end=True)
    await make_trainer(ask, checkpoint, num_steps=5).fit()
    assert saved_steps(tmp_path) == [5]  # without save_on_end
    assert ask.served() == [tmp_path / "step-000000005.ckpt"]
    between = checkpoint.request_save()  # no run is on: nobody takes it, the next run neither
    with pytest.raises(CheckpointError, match=re.escape(
        f"Checkpoint(save_dir={str(tmp_path)!r}): no save asked for: no loop runs with it"
    )):  # fmt: skip
        between.result(timeout=0)
    await make_trainer(checkpoint, num_steps=8, resume_from=tmp_path).fit()
    assert saved_steps(tmp_path) == [5]


@pytest.mark.anyio
async def test_an_ask_that_no_save_serves_fails_saying_why(tmp_path: Path) -> None:
    checkpoint = on_demand(tmp_path)

    ask = AskAt(checkpoint, 3)  # (taken at step 3, which then fails: no save)
    with pytest.raises(RuntimeError, match="the step failed"):
        await make_trainer(ask, FailAt(3), checkpoint, num_steps=6).fit()
    [future] = ask.asked
    with pytest.raises(CheckpointError, match="was not taken: the loop failed") as info:
        future.result(timeout=0)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert saved_steps(tmp_path) == []
    # Stopped before its first step: nothing to save (what it began from holds its state).
    trainer = make_trainer(ask := AskAt(checkpoint, at_end=True), checkpoint, num_steps=6)
    trainer.stop()
    await trainer.fit()
    with pytest.raises(CheckpointError, match="was not taken: the loop ended without it"):
        ask.asked[0].result(timeout=0)


@pytest.mark.anyio
async def test_an_ask_made_as_the_run_begins_is_served_by_its_first_save(tmp_path: Path) -> None:
    # From fit() on, asks are the run's, as stop() and pause() are the loop's. Asked in an
    # earlier callback's on_loop_begin (the Checkpoint's runs last), it failed: "no loop runs".
    checkpoint = on_demand(tmp_path)

    class AskAtBegin(Callback):
        async def on_loop_begin(self, state: LoopState) -> None:
            self.asked = checkpoint.request_save()

    ask = AskAtBegin()
    await make_trainer(ask, checkpoint, num_steps=4).fit()
    assert ask.asked.result(timeout=0) == tmp_path / "step-000000001.ckpt"


@pytest.mark.anyio
async def test_an_ask_of_a_run_that_fails_before_it_begins_fails_with_it(tmp_path: Path) -> None:
    # The run fails as it resumes (before on_loop_begin, so no on_loop_end comes): the ask
    # made meanwhile fails with it, not left waiting for good.
    checkpoint = on_demand(tmp_path)
    asked = await asked_as_a_run_fails_to_resume(
        tmp_path / "saved", checkpoint, checkpoint.request_save
    )
    with pytest.raises(CheckpointError, match="was not taken: the loop failed") as info:
        asked[0].result(timeout=0)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.anyio
async def test_an_ask_at_a_step_already_saved_gets_that_save(tmp_path: Path) -> None:
    # Step 5 saved by the schedule; asked at the loop's end (step 5 too), the save would be
    # the same: the ask gets the step's checkpoint, written once.
    checkpoint = Checkpoint(tmp_path, every_n_steps=5, save_on_end=False)
    ask = AskAt(checkpoint, at_end=True)
    await make_trainer(ask, checkpoint, num_steps=5).fit()
    assert saved_steps(tmp_path) == [5]
    assert ask.served() == [tmp_path / "step-000000005.ckpt"]


@pytest.mark.anyio
async def test_an_ask_whose_write_fails_gets_the_error_the_loop_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asynchat.callbacks._checkpoint as checkpoint_module

    def full_disk(path: Path, obj: Any) -> tuple[int, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    checkpoint = on_demand(tmp_path)
    ask = AskAt(checkpoint, 2)
    with pytest.raises(CheckpointError, match="No space left on device") as raised:
        await make_trainer(ask, checkpoint, num_steps=6).fit()
    with pytest.raises(CheckpointError, match="No space left on device") as served:
        ask.asked[0].result(timeout=0)
    assert served.value is raised.value


def test_every_n_seconds_is_a_positive_number(tmp_path: Path) -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="every_n_seconds must be a positive number or None"):
            Checkpoint(tmp_path, every_n_seconds=bad)
    Checkpoint(tmp_path, every_n_seconds=1800, save_on_end=False)  # enough by itself
