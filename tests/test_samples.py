"""What a sample is, a validation loss per sample, and a processor's own epoch hooks: the
frictions a real port (a time-major language model) found."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_loader, make_model, make_trainer, sgd
from torch import nn

from asynchat import BasicBatchProcessor, Callback, LoopState, Phase, RunPhase, Trainer
from asynchat._tree import iter_tensors, map_tensors
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


async def test_val_loss_of_a_summed_loss_is_the_mean_over_samples_too() -> None:
    # Each batch's sum was weighted by its count again: 16 times the mean for batches of 16.
    val = make_loader(100, 16, seed=3)
    validation = Validation(val, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    trainer = make_trainer(validation, num_epochs=1)
    state = await trainer.fit()
    with torch.no_grad():
        inputs, targets = val.dataset.tensors  # type: ignore[attr-defined]
        per_sample = nn.CrossEntropyLoss()(trainer.model.eval()(inputs), targets).item()
    assert state.metrics["val/loss"] == pytest.approx(per_sample, rel=1e-5)
    summing = BasicBatchProcessor(nn.CrossEntropyLoss(reduction="sum"))
    state = await make_trainer(Validation(val, batch_processor=summing), num_epochs=1).fit()
    assert state.metrics["val/loss"] == pytest.approx(per_sample, rel=1e-5), "the processor's"
    with pytest.raises(ValueError, match=r"loss_fn CrossEntropyLoss has reduction='none'"):
        Validation(val, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match=r"loss_fn CrossEntropyLoss has reduction='none'"):
        Validation(val, batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(reduction="none")))


async def test_a_validation_over_a_padding_distributed_sampler_is_warned_of() -> None:
    # torch's DistributedSampler repeats samples to give every rank as many: counted twice
    # in val/loss and the metrics (1.12400 against 1.12596 over 101 samples, 2 ranks).
    def validation(samples: int, **options: Any) -> Validation:
        data = make_loader(samples, 16).dataset
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0, **options)
        loader = torch.utils.data.DataLoader(data, batch_size=16, sampler=sampler)
        return Validation(loader, loss_fn=nn.CrossEntropyLoss())

    padded = make_trainer(validation(101), num_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"DistributedSampler pads the 101 samples to 102 "
                      r"over 2 ranks \(it repeats 1\), .* sampler=range\(rank, len"):  # fmt: skip
        await padded.fit()
    await make_trainer(validation(100), num_epochs=1).fit()  # even: nothing repeated
    await make_trainer(validation(101, drop_last=True), num_epochs=1).fit()  # none repeated


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
            run_phase(Phase.ON_BATCH_BEGIN)
            state.outputs = state.model(state.batch[0])
            run_phase(Phase.ON_BATCH_END)

    validation = Validation(make_loader(32, 16), batch_processor=NoLoss())
    with pytest.raises(ValueError, match=r"published nothing.*NoLoss set no state\.loss"):
        await make_trainer(validation, num_epochs=1).fit()


@dataclasses.dataclass(frozen=True)
class Pair:
    x: torch.Tensor
    y: torch.Tensor


class DataclassLoss(BasicBatchProcessor):
    """Batches that are dataclass instances (``Pair``), or (``Opaque``) objects of a class
    whose tensors the engine cannot see."""

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        run_phase(Phase.ON_BATCH_BEGIN)
        state.outputs = state.model(state.batch.x)
        state.loss = nn.functional.cross_entropy(state.outputs, state.batch.y)
        if state.training:
            self.backward(state, state.loss)
        run_phase(Phase.ON_BATCH_END)
        if state.training:
            self.update(state, run_phase)


async def test_dataclass_batches_count_their_samples() -> None:
    # A dataclass batch held no tensor the engine could see: 0 samples a batch, so
    # Validation weighted every loss by 0 and said its processor "set no state.loss".
    pairs = [Pair(x, y) for x, y in make_loader(64, 16, seed=5)]
    trainer = Trainer(
        make_model(), [Pair(x, y) for x, y in make_loader(96, 16)], sgd,
        batch_processor=DataclassLoss(), num_epochs=1,
        callbacks=[Validation(pairs, batch_processor=DataclassLoss())],
    )  # fmt: skip
    state = await trainer.fit()
    model = trainer.model.eval()
    with torch.no_grad():
        expected = sum(
            nn.functional.cross_entropy(model(p.x), p.y, reduction="sum").item() for p in pairs
        )
    assert state.metrics["val/loss"] == pytest.approx(expected / 64, rel=1e-5)
    assert trainer.samples_in(pairs[0]) == 16

    class Opaque:
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

    opaque = [Opaque(x, y) for x, y in make_loader(32, 16)]
    validation = Validation(opaque, batch_processor=DataclassLoss())
    with pytest.raises(ValueError, match=r"samples_in counted none .* pass samples=lambda batch"):
        await make_trainer(validation, num_epochs=1).fit()


def test_tensors_are_found_and_mapped_in_dataclasses_and_defaultdicts() -> None:
    @dataclasses.dataclass
    class Derived:
        x: torch.Tensor
        n: int = 3
        twice: torch.Tensor = dataclasses.field(init=False)

        def __post_init__(self) -> None:
            self.twice = self.x * 2

    nested = {"a": Pair(torch.ones(2), torch.zeros(2)), "b": [Derived(torch.ones(3))]}
    assert [t.shape[0] for t in iter_tensors(nested)] == [2, 2, 3, 3]
    mapped = map_tensors(lambda t: t + 1, nested)
    assert isinstance(mapped["a"], Pair) and torch.equal(mapped["a"].y, torch.ones(2))
    derived = mapped["b"][0]
    assert torch.equal(derived.twice, torch.full((3,), 4.0)) and derived.n == 3
    counts = collections.defaultdict(list, {"x": torch.ones(1)})
    mapped_counts = map_tensors(lambda t: t * 5, counts)
    assert mapped_counts.default_factory is list and torch.equal(
        mapped_counts["x"], 5 * counts["x"]
    )


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


@pytest.mark.parametrize(
    ("count", "error", "match"),
    [
        ("8", TypeError, r"must return the batch's number of samples, an int; it returned '8'"),
        (8.0, TypeError, r"an int; it returned 8\.0"),
        (-1, ValueError, r"an int >= 0; it returned -1"),
    ],
)
async def test_a_count_of_samples_that_is_no_count_is_named_at_the_first_batch(
    count: object, error: type[Exception], match: str
) -> None:
    # "8" trained on and failed in snapshot() (a service's status route) with "can't multiply
    # sequence by non-int"; -1 made samples/s negative, silently.
    trainer = Trainer(
        make_model(), make_loader(32, 8), sgd,
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), samples=lambda b: count),
        num_epochs=1,
    )  # fmt: skip
    with pytest.raises(error, match=match):
        await trainer.fit()
    assert trainer.state.global_step == 0
    numpy_count = BasicBatchProcessor(samples=lambda b: np.int64(8))
    assert numpy_count.samples_in(None) == 8 and type(numpy_count.samples_in(None)) is int


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
