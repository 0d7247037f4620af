"""Gradient accumulation is one unit: a window's gradients are in no checkpoint, so the loop
ends (stop(), cancellation) and saves (Checkpoint's every_n_steps) only at a window's last
step, and what acts on updates (a per-step LR schedule, the EMA) acts once per update."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import CancelAt, StopAt, make_loader, make_model, sgd
from torch import nn

from asynchat import BasicBatchProcessor, Callback, LoopState, Trainer
from asynchat.callbacks import (
    Checkpoint,
    CheckpointWarning,
    ExponentialMovingAverage,
    LRSchedule,
    cosine,
)

ACCUMULATE = 3  # 6 steps an epoch: windows end after global steps 3, 6, 9, 12
STEPS = 12


def accumulating() -> BasicBatchProcessor:
    """Cross-entropy steps updating every ``ACCUMULATE`` steps."""
    return BasicBatchProcessor(nn.CrossEntropyLoss(), grad_accumulation_steps=ACCUMULATE)


def trainer(
    directory: Path, *extra: Callback, resume: bool = False, every_n_steps: int | None = None
) -> Trainer:
    return Trainer(
        make_model(),
        make_loader(96, 16, shuffle=True),
        sgd,
        batch_processor=accumulating(),
        num_steps=STEPS,
        callbacks=[*extra, Checkpoint(directory, every_n_steps=every_n_steps, keep_last=None)],
        resume_from=directory if resume else None,
    )


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def saved_steps(directory: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in sorted(directory.glob("step-*.ckpt"))]


@pytest.mark.parametrize(("stop_at", "ends_at"), [(2, 3), (3, 3), (4, 6), (8, 9)])
def test_stop_inside_a_window_ends_at_its_last_step_and_resumes_exactly(
    tmp_path: Path, stop_at: int, ends_at: int
) -> None:
    straight = trainer(tmp_path / "straight")
    anyio.run(straight.fit)

    first = trainer(tmp_path / "stopped", StopAt(stop_at, "test"))
    anyio.run(first.fit)
    assert first.state.global_step == ends_at and first.state.stop_reason == "test"
    assert not first.state.accumulating
    assert saved_steps(tmp_path / "stopped") == [ends_at]

    resumed = trainer(tmp_path / "stopped", resume=True)
    anyio.run(resumed.fit)
    assert resumed.state.global_step == STEPS
    assert_same_weights(resumed.model, straight.model)


class Streamed(torch.utils.data.IterableDataset[Any]):
    """The same batches as a stream: read on the data thread one at a time, on request."""

    def __iter__(self) -> Iterator[Any]:
        yield from make_loader(96, 16)


def test_a_stop_waits_for_the_windows_batches_from_a_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # stop() wakes a loop waiting for a stream's next batch; inside a window it must not:
    # the loop ended after step 2, its checkpoint without the window's gradients.
    streamed = Trainer(
        make_model(),
        torch.utils.data.DataLoader(Streamed(), batch_size=None),
        sgd,
        batch_processor=accumulating(),
        num_steps=STEPS,
        callbacks=[StopAt(2, "test"), Checkpoint(tmp_path)],
    )
    with caplog.at_level("WARNING", logger="asynchat.loop"):
        anyio.run(streamed.fit)
    assert streamed.state.global_step == 3
    assert saved_steps(tmp_path) == [3]
    assert "ending after the gradient-accumulation window in progress" in caplog.text


def test_a_cancellation_inside_a_window_ends_at_its_last_step(tmp_path: Path) -> None:
    seen: list[int] = []

    class Record(Callback):
        def on_step_end(self, state: LoopState) -> None:
            seen.append(state.global_step)  # a def hook: it runs in a cancelled loop too

    straight = trainer(tmp_path / "straight")
    anyio.run(straight.fit)

    async def cancelled() -> Trainer:
        cancel = CancelAt(2)
        first = trainer(tmp_path / "cancelled", cancel, Record())
        with anyio.CancelScope() as cancel.scope:
            await first.fit()
        assert cancel.scope.cancelled_caught
        return first

    first = anyio.run(cancelled)
    assert first.status.value == "cancelled"
    assert first.state.global_step == 3 and seen == [1, 2, 3]
    assert saved_steps(tmp_path / "cancelled") == [3]  # the final checkpoint, after the update

    resumed = trainer(tmp_path / "cancelled", resume=True)
    anyio.run(resumed.fit)
    assert_same_weights(resumed.model, straight.model)


def test_step_checkpoints_are_saved_at_the_window_end_and_resume_exactly(
    tmp_path: Path,
) -> None:
    straight = trainer(tmp_path / "straight")
    anyio.run(straight.fit)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint is saved inside a window
        saving = trainer(tmp_path / "every2", every_n_steps=2)
        anyio.run(saving.fit)
    # Due after steps 2, 4, 6, 8, 10, 12; each saved at the end of its window.
    assert saved_steps(tmp_path / "every2") == [3, 6, 9, 12]

    # A run that crashed after step 10 resumes from its newest checkpoint, step 9.
    directory = tmp_path / "crashed"
    directory.mkdir()
    (tmp_path / "every2" / "step-000000003.ckpt").rename(directory / "step-000000003.ckpt")
    resumed = trainer(directory, resume=True)
    anyio.run(resumed.fit)
    assert_same_weights(resumed.model, straight.model)


def test_a_checkpoint_saved_inside_a_window_says_what_it_lacks(tmp_path: Path) -> None:
    class SaveAtOne(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 1:  # of a window of 3
                checkpoint = next(c for c in state.loop.callbacks if isinstance(c, Checkpoint))
                checkpoint.save(state)

    with pytest.warns(CheckpointWarning, match="inside a gradient-accumulation window"):
        anyio.run(trainer(tmp_path / "c", SaveAtOne()).fit)
    assert saved_steps(tmp_path / "c") == [1, 12]


def test_a_per_step_schedule_counts_updates_as_a_hand_written_loop_does() -> None:
    # torch's contract: scheduler.step() after optimizer.step(). Stepped at every step, the
    # scheduler ran ahead of the updates (and torch warned that it stepped before the
    # optimizer did: an error under this suite's filterwarnings).
    reference = make_model(seed=2)
    optimizer = sgd(reference)
    scheduler = cosine(4)(optimizer)
    loss_fn = nn.CrossEntropyLoss()
    loader = make_loader(96, 16, shuffle=True, seed=3)
    for _ in range(2):
        for step, (inputs, targets) in enumerate(loader):
            (loss_fn(reference(inputs), targets) / ACCUMULATE).backward()
            if (step + 1) % ACCUMULATE == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()

    lrs: list[float] = []

    class RecordLr(Callback):
        def on_step_end(self, state: LoopState) -> None:
            assert state.optimizer is not None
            lrs.append(state.optimizer.param_groups[0]["lr"])

    model = make_model(seed=2)
    trained = Trainer(
        model,
        make_loader(96, 16, shuffle=True, seed=3),
        sgd,
        batch_processor=accumulating(),
        num_epochs=2,
        callbacks=[LRSchedule(cosine(4)), RecordLr()],
    )
    anyio.run(trained.fit)
    assert lrs[0] == lrs[1] == 0.1 > lrs[2]  # stepped once, after the first update
    assert len(set(lrs)) == 5  # the first rate, then one per update
    assert lrs[-1] == optimizer.param_groups[0]["lr"]
    assert_same_weights(model, reference)


def test_the_average_moves_once_per_update() -> None:
    weights: list[list[torch.Tensor]] = []

    class RecordUpdates(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step % ACCUMULATE == 0:  # an update came last
                weights.append([t.detach().clone() for t in state.model.state_dict().values()])

    model = make_model()
    initial = [t.detach().clone() for t in model.state_dict().values()]
    ema = ExponentialMovingAverage(0.5, warmup=False)
    trained = Trainer(
        model,
        make_loader(96, 16),
        sgd,
        batch_processor=accumulating(),
        num_steps=6,
        callbacks=[RecordUpdates(), ema],
    )
    anyio.run(trained.fit)
    assert ema.updates == 2 and len(weights) == 2
    expected = initial
    for after in weights:
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, after, strict=True)]
    for got, want in zip(ema.shadow, expected, strict=True):
        torch.testing.assert_close(got, want)


class ShortOfItsLength(torch.utils.data.IterableDataset[Any]):
    """Says it holds 8 batches and yields 7."""

    def __iter__(self) -> Iterator[Any]:
        yield from list(make_loader(112, 16))

    def __len__(self) -> int:
        return 8


def test_data_shorter_than_its_len_says_it_leaves_a_window_unupdated() -> None:
    # The last step is known by len(); data that runs out one batch early never reaches it,
    # and the window it was in was never updated, without a word.
    trainer = Trainer(
        make_model(),
        torch.utils.data.DataLoader(ShortOfItsLength(), batch_size=None),
        sgd,
        batch_processor=accumulating(),
        num_epochs=1,
    )
    with pytest.warns(RuntimeWarning, match=r"ran out after 7 steps .* promised 8"):
        anyio.run(trainer.fit)
    assert trainer.state.accumulating
