"""What a sample is, a validation loss per sample, and a processor's own epoch hooks: the
frictions a real port (a time-major language model) found."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_loader, make_model, make_trainer
from torch import nn

from asynchat import BasicBatchProcessor, Callback, LoopState, Phase, RunPhase, Trainer
from asynchat.callbacks import StatsMonitor, Validation

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})


async def test_val_loss_is_a_mean_over_samples_not_batches() -> None:
    """100 samples in batches of 16: the last batch holds 4, and counts for 4."""
    val = make_loader(100, 16, seed=3)
    validation = Validation(val, loss_fn=nn.CrossEntropyLoss())
    trainer = make_trainer(validation, num_epochs=1)
    state = await trainer.fit()
    model = trainer.model.eval()
    with torch.no_grad():
        inputs, targets = val.dataset.tensors  # type: ignore[attr-defined]
        per_sample = nn.CrossEntropyLoss()(model(inputs), targets).item()
        per_batch = sum(nn.CrossEntropyLoss()(model(x), y).item() for x, y in val) / len(val)
    assert state.metrics["val/loss"] == pytest.approx(per_sample, rel=1e-5)
    assert abs(per_batch - per_sample) > 1e-4, "the data makes the two means differ"


class PairLoss(BasicBatchProcessor):
    """A custom processor with its own loss and batches (a dict) the default would split
    differently."""

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        run_phase(Phase.ON_BATCH_BEGIN)
        batch = state.batch
        state.outputs = state.model(batch["x"])
        state.loss = nn.functional.cross_entropy(state.outputs, batch["y"])
        if state.training:
            self.backward(state, state.loss)
        run_phase(Phase.ON_BATCH_END)
        if state.training:
            self.update(state, run_phase)


def dict_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [{"x": x, "y": y} for x, y in make_loader(n, 16, seed=seed)]


async def test_validation_with_a_custom_processor_publishes_its_loss() -> None:
    validation = Validation(dict_batches(64, 5), batch_processor=PairLoss())
    trainer = Trainer(
        make_model(), dict_batches(96, 0), lambda m: torch.optim.SGD(m.parameters(), 0.1),
        batch_processor=PairLoss(), num_epochs=1, callbacks=[validation],
    )  # fmt: skip
    state = await trainer.fit()
    assert 0 < state.metrics["val/loss"] < 5
    with pytest.raises(ValueError, match=r"computes its own state\.loss"):
        Validation(dict_batches(64, 5), batch_processor=PairLoss(), loss_fn=nn.MSELoss())


async def test_validation_that_can_publish_nothing_says_so() -> None:
    class NoLoss(BasicBatchProcessor):
        def step(self, state: LoopState, run_phase: RunPhase) -> None:
            state.outputs = state.model(state.batch[0])

    validation = Validation(make_loader(32, 16), batch_processor=NoLoss())
    with pytest.raises(ValueError, match=r"published nothing.*NoLoss set no state\.loss"):
        await make_trainer(validation, num_epochs=1).fit()


async def test_a_sample_is_what_the_processor_says() -> None:
    """Time-major batches (seq_len 20 x batch 4): 4 samples each, not 20."""
    seq = [(torch.randn(20, 4, 8), torch.randint(0, 3, (20, 4))) for _ in range(6)]

    class TimeMajor(BasicBatchProcessor):
        def step(self, state: LoopState, run_phase: RunPhase) -> None:
            x, y = state.batch
            run_phase(Phase.ON_BATCH_BEGIN)
            state.outputs = state.model(x)
            state.loss = nn.functional.cross_entropy(state.outputs.flatten(0, 1), y.flatten())
            self.backward(state, state.loss)
            run_phase(Phase.ON_BATCH_END)
            self.update(state, run_phase)

    seen: list[int] = []

    class Count(Callback):
        def on_step_end(self, state: LoopState) -> None:
            seen.append(state.loop.samples_in(state.batch))

    stats = StatsMonitor(every_n_steps=6)
    trainer = Trainer(
        make_model(), seq, lambda m: torch.optim.SGD(m.parameters(), 0.1),
        batch_processor=TimeMajor(samples=lambda batch: batch[0].shape[1]),
        num_epochs=1, callbacks=[Count(), stats],
    )  # fmt: skip
    state = await trainer.fit()
    assert seen == [4] * 6
    step_time = state.metrics["stats/step_time"]
    assert state.metrics["stats/samples_per_s"] == pytest.approx(4 / step_time, rel=0.05)
    with pytest.raises(TypeError, match="samples must be a function"):
        BasicBatchProcessor(samples=4)  # type: ignore[arg-type]


async def test_a_processor_hears_each_epoch_begin_and_end() -> None:
    """A stateful step (an RNN's hidden state) resets per epoch, without a callback."""
    events: list[tuple[str, int]] = []

    class Stateful(BasicBatchProcessor):
        def on_epoch_begin(self, state: LoopState) -> None:
            self.hidden = torch.zeros(1)
            events.append(("begin", state.epoch))

        def on_epoch_end(self, state: LoopState) -> None:
            events.append(("end", state.epoch))

    class Hook(Callback):
        def on_epoch_begin(self, state: LoopState) -> None:
            events.append(("callback begin", state.epoch))

        def on_epoch_end(self, state: LoopState) -> None:
            events.append(("callback end", state.epoch))

    trainer = Trainer(
        make_model(), make_loader(32, 16), lambda m: torch.optim.SGD(m.parameters(), 0.1),
        batch_processor=Stateful(nn.CrossEntropyLoss()), num_epochs=2, callbacks=[Hook()],
    )  # fmt: skip
    await trainer.fit()
    order = ["begin", "callback begin", "callback end", "end"]
    assert events == [(what, epoch) for epoch in (0, 1) for what in order]
