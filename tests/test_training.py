"""The engine computes what a hand-written PyTorch loop computes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import make_data, make_loader, make_model, sgd
from torch import nn

from asynchat import (
    BasicBatchProcessor,
    Callback,
    LoopState,
    MultiBatchProcessor,
    Predictor,
    Trainer,
)

pytestmark = pytest.mark.anyio


def hand_written_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    *,
    accumulate: int = 1,
    amp: torch.dtype | None = None,
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    batches = list(loader)
    for i, (inputs, targets) in enumerate(batches):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(inputs), targets)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0 or i == len(batches) - 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), f"parameter {name} differs"


@pytest.mark.parametrize("prefetch", [0, 2])
async def test_one_epoch_equals_a_hand_written_loop(prefetch: int) -> None:
    reference = make_model(seed=3)
    hand_written_epoch(reference, sgd(reference), make_loader(96, 16, shuffle=True, seed=7))

    model = make_model(seed=3)
    trainer = Trainer(
        model,
        make_loader(96, 16, shuffle=True, seed=7),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        prefetch=prefetch,
    )
    state = await trainer.fit()
    assert state.global_step == 6
    assert_same_parameters(model, reference)
    assert not any(p.grad is not None for p in model.parameters()), "grads zeroed with set_to_none"


class Stream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """An iterable dataset (which could wait on a socket): 96 samples."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inputs, targets = make_data(96).tensors
        return iter(zip(inputs, targets, strict=True))


async def test_which_data_is_read_on_a_data_thread() -> None:
    """A list or tuple of batches on the CPU (nothing to load) and a map-style DataLoader
    without workers are read on the compute thread; an iterable dataset (a stream that may
    wait) and a DataLoader with workers get a data thread."""
    import threading

    seen: list[bool] = []

    class DataThread(Callback):
        def on_step_end(self, state: LoopState) -> None:
            names = [t.name for t in threading.enumerate()]
            seen.append(any(n == f"asynchat-{state.loop.name}-data" for n in names))

    batches = list(make_loader(96, 16))
    streamed = torch.utils.data.DataLoader(Stream(), batch_size=16)
    workers = torch.utils.data.DataLoader(make_data(96), batch_size=16, num_workers=1,
                                          multiprocessing_context="fork")  # fmt: skip
    for data in (batches, tuple(batches), make_loader(96, 16), streamed, workers):
        seen.clear()
        await Trainer(make_model(), data, sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=1,
                      callbacks=[DataThread()], device="cpu").fit()  # fmt: skip
        if data is streamed or data is workers:  # at the first step 5 batches are to come
            assert seen[0], "read on a data thread"
        else:
            assert seen == [False] * 6, type(data).__name__


async def test_a_stream_is_read_on_the_data_thread_only_while_the_step_waits() -> None:
    """Its code never runs alongside a step: each batch is read on the data thread when the
    step loop asks for it (so random draws keep a hand-written loop's order)."""
    import threading

    order: list[str] = []
    readers: set[str] = set()

    batches = list(make_loader(96, 16))

    class Logged:
        def __len__(self) -> int:
            return 6

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in batches:
                order.append("read")
                readers.add(threading.current_thread().name)
                yield batch

    class Step(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            order.append("begin")

        def on_step_end(self, state: LoopState) -> None:
            order.append("end")

    trainer = Trainer(make_model(), Logged(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2,
                      callbacks=[Step()], device="cpu", name="logged")  # fmt: skip
    await trainer.fit()
    assert order == ["read", "begin", "end"] * 12
    assert readers == {"asynchat-logged-data"}


class Augmented(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset with random augmentations drawn from the global RNGs (torch, random, numpy),
    as torchvision's transforms draw them."""

    def __init__(self) -> None:
        self.data = make_data(96)

    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import random

        import numpy as np

        inputs, target = self.data[i]
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return inputs * scale + 0.1 * torch.randn_like(inputs), target


class AugmentedStream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """The same as a stream (read on the data thread)."""

    def __len__(self) -> int:
        return 96

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        augmented = Augmented()
        return (augmented[i] for i in range(96))


@pytest.mark.parametrize("kind", ["map-style", "iterable"])
async def test_random_augmentations_draw_as_in_a_hand_written_loop(kind: str) -> None:
    """Regression: a DataLoader without workers was read ahead on a data thread, so its
    dataset's random draws interleaved with the model's dropout by thread timing: a seeded
    run gave other weights than the hand-written loop, and than itself the next time."""
    import random

    import numpy as np

    def seeded_model() -> nn.Module:
        for seed in (torch.manual_seed, random.seed, np.random.seed):
            seed(11)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))

    def loader() -> torch.utils.data.DataLoader[Any]:
        if kind == "iterable":
            return torch.utils.data.DataLoader(AugmentedStream(), batch_size=8)
        return torch.utils.data.DataLoader(Augmented(), batch_size=8, shuffle=True)

    reference = seeded_model()
    optimizer, loss_fn, data = sgd(reference), nn.CrossEntropyLoss(), loader()
    for _ in range(2):
        for inputs, targets in data:  # each batch drawn right before its step
            loss_fn(reference(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        model = seeded_model()
        trainer = Trainer(model, loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2,
                          device="cpu")  # fmt: skip
        await trainer.fit()
        assert_same_parameters(model, reference)


async def test_an_optimizer_instance_is_used_as_given() -> None:
    reference = make_model(seed=4)
    hand_written_epoch(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), make_loader())
    model = make_model(seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, make_loader(), optimizer, loss_fn=nn.CrossEntropyLoss(), num_epochs=1)
    assert trainer.optimizer is optimizer
    state = await trainer.fit()
    assert state.optimizer is optimizer
    assert_same_parameters(model, reference)


async def test_gradient_accumulation_equals_hand_written_accumulation() -> None:
    # 7 batches with accumulation over 3: updates after batches 3, 6 and the last one (7).
    reference = make_model(seed=5)
    hand_written_epoch(reference, sgd(reference), make_loader(112, 16), accumulate=3)

    updates: list[int] = []

    class CountUpdates(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if all(p.grad is None for p in state.model.parameters()):
                updates.append(state.step)

    model = make_model(seed=5)
    trainer = Trainer(
        model,
        make_loader(112, 16),
        sgd,
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), grad_accumulation_steps=3),
        num_epochs=1,
        callbacks=[CountUpdates()],
    )
    await trainer.fit()
    assert updates == [2, 5, 6]
    assert_same_parameters(model, reference)


async def test_multi_batch_processor_takes_one_update_per_step() -> None:
    loader_a, loader_b = make_loader(48, 16, seed=1), make_loader(48, 16, seed=2)
    items = list(zip(loader_a, loader_b, strict=True))

    reference = make_model(seed=6)
    optimizer = sgd(reference)
    loss_fn = nn.CrossEntropyLoss()
    for sub_batches in items:
        for inputs, targets in sub_batches:
            loss_fn(reference(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    losses: list[float] = []

    class StepLoss(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            assert isinstance(state.outputs, tuple) and len(state.outputs) == 2
            losses.append(float(await state.loop.to_host(state.loss)))

    model = make_model(seed=6)
    trainer = Trainer(
        model,
        items,
        sgd,
        batch_processor=MultiBatchProcessor(nn.CrossEntropyLoss()),
        num_epochs=1,
        callbacks=[StepLoss()],
    )
    await trainer.fit()
    assert_same_parameters(model, reference)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


async def test_multi_batch_processor_with_one_loss_per_task() -> None:
    items = [(b, b) for b in make_loader(32, 16)]
    ce = nn.CrossEntropyLoss()
    halved = lambda out, tgt: 0.5 * ce(out, tgt)  # noqa: E731
    per_batch: list[float] = []

    class BatchLoss(Callback):
        async def on_batch_end(self, state: LoopState) -> None:
            per_batch.append(float(await state.loop.to_host(state.loss)))

    trainer = Trainer(
        make_model(),
        items,
        sgd,
        batch_processor=MultiBatchProcessor([ce, halved]),
        num_epochs=1,
        callbacks=[BatchLoss()],
    )
    await trainer.fit()
    # Within a step both sub-batches are the same batch on the same weights.
    assert per_batch[1] == pytest.approx(per_batch[0] / 2)


async def test_bf16_autocast_equals_a_hand_written_autocast_loop() -> None:
    reference = make_model(seed=8)
    hand_written_epoch(reference, sgd(reference), make_loader(), amp=torch.bfloat16)
    model = make_model(seed=8)
    trainer = Trainer(
        model,
        make_loader(),
        sgd,
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), amp="bf16"),
        num_epochs=1,
    )
    await trainer.fit()
    assert_same_parameters(model, reference)


async def test_fp16_uses_a_grad_scaler_and_trains() -> None:
    processor = BasicBatchProcessor(nn.CrossEntropyLoss(), amp="fp16")
    model = make_model(seed=9)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, make_loader(), sgd, batch_processor=processor, num_epochs=2)
    await trainer.fit()
    assert processor.scaler is not None
    assert processor.scaler.get_scale() > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


async def test_training_reduces_the_loss() -> None:
    epoch_losses: list[float] = []

    class MeanLoss(Callback):
        def on_epoch_begin(self, state: LoopState) -> None:
            self.total = torch.zeros(())

        def on_step_end(self, state: LoopState) -> None:
            assert state.loss is not None
            self.total += state.loss.detach()

        async def on_epoch_end(self, state: LoopState) -> None:
            epoch_losses.append(float(await state.loop.to_host(self.total)))

    trainer = Trainer(
        make_model(),
        make_loader(96, 16),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=8,
        callbacks=[MeanLoss()],
    )
    await trainer.fit()
    assert epoch_losses[-1] < epoch_losses[0]


async def test_predictor_runs_in_eval_mode_without_grad_and_restores_the_mode() -> None:
    seen: list[tuple[bool, bool]] = []

    class Look(Callback):
        def on_batch_end(self, state: LoopState) -> None:
            seen.append((state.model.training, torch.is_grad_enabled()))

    model = nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.5))
    model.train()
    outputs: list[torch.Tensor] = []

    class Collect(Callback):
        async def on_batch_end(self, state: LoopState) -> None:
            outputs.append(await state.loop.to_host(state.outputs))

    predictor = Predictor(model, make_loader(48, 16), callbacks=[Look(), Collect()])
    await predictor.fit()
    assert seen == [(False, False)] * 3
    assert model.training, "the model's train mode is restored"
    predictions = torch.cat(outputs)
    expected = model.eval()(torch.cat([x for x, _ in make_loader(48, 16)]))
    assert torch.equal(predictions, expected.detach())
    assert not predictions.requires_grad


async def test_predictor_loss_with_targets() -> None:
    losses: list[float] = []

    class Loss(Callback):
        async def on_batch_end(self, state: LoopState) -> None:
            losses.append(float(await state.loop.to_host(state.loss)))

    await Predictor(
        make_model(), make_loader(32, 16), loss_fn=nn.CrossEntropyLoss(), callbacks=[Loss()]
    ).fit()
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


async def test_predictor_accepts_inputs_only_and_dict_batches() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * scale

    x = torch.randn(4, 8)
    got: list[Any] = []

    class Collect(Callback):
        def on_batch_end(self, state: LoopState) -> None:
            got.append(state.outputs)

    model = Kw()
    await Predictor(model, [{"x": x, "scale": torch.tensor(2.0)}], callbacks=[Collect()]).fit()
    await Predictor(model.linear, [x, [x]], callbacks=[Collect()]).fit()
    assert torch.allclose(got[0], model.linear(x) * 2)
    assert torch.equal(got[1], got[2])


async def test_dict_batches_with_targets_train() -> None:
    batches = [{"input": x, "targets": y} for x, y in make_loader(32, 16)]

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return self.net(input)  # type: ignore[no-any-return]

    state = await Trainer(Kw(), batches, sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=1).fit()
    assert state.global_step == 2


async def test_device_none_picks_cuda_when_available_else_cpu() -> None:
    trainer = Trainer(make_model(), make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_steps=1)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer.device.type == expected
    state = await trainer.fit()
    assert all(p.device.type == expected for p in state.model.parameters())


async def test_the_state_repr_says_where_the_loop_is_without_formatting_tensors() -> None:
    """asyncio formats the task that returned the state at the end of every fit(), so the
    repr must be cheap: no batch, outputs or model in it (it took milliseconds)."""
    state = await Trainer(make_model(), make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(),
                          num_steps=2, name="reprs").fit()  # fmt: skip
    text = repr(state)
    assert text.startswith("LoopState(loop='reprs', epoch=0, step=1, global_step=2")
    assert "tensor(" not in text and "Linear" not in text


class Growing:
    """Data whose epoch ``e`` has ``3 + e`` batches, as its ``len()`` says at that epoch (a
    batch sampler planning each epoch's batches anew, say by length buckets)."""

    def __init__(self) -> None:
        self.epoch = 0

    def __len__(self) -> int:
        return 3 + self.epoch

    def __iter__(self) -> Iterator[Any]:
        batches = list(make_loader(16 * len(self), 16))
        self.epoch += 1
        return iter(batches)


async def test_an_epoch_runs_as_many_steps_as_the_data_has_at_that_epoch() -> None:
    # The length was read once, when the loop was built: every epoch ran 3 steps and the
    # later epochs' last batches were dropped, without a word.
    steps: list[int] = []

    class Steps(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            steps.append(state.step + 1)
            assert state.steps_per_epoch == state.step + 1

    loop = Trainer(make_model(), Growing(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=3,
                   callbacks=[Steps()])  # fmt: skip
    state = await loop.fit()
    assert steps == [3, 4, 5] and state.global_step == 12


def test_an_epoch_read_to_its_length_lets_the_loader_end_as_a_full_pass_does() -> None:
    """A RandomSampler with its own generator draws from it once more at its end, so the
    next epoch's order depends on the loader being read to its end, as a data thread does
    and as a loop reading on the compute thread must too (it counts steps by len())."""
    from asynchat._data import with_last

    def loader() -> torch.utils.data.DataLoader[Any]:
        g = torch.Generator().manual_seed(7)
        return torch.utils.data.DataLoader(make_data(96), batch_size=16, shuffle=True,
                                           generator=g)  # fmt: skip

    full, counted = loader(), loader()
    list(full)
    steps = []
    for _, last, _ in with_last(iter(counted), None, len(counted)):
        steps.append(last)
        if last:
            break  # a stop() at the epoch's last step: the loop asks for nothing more
    assert steps == [False] * 5 + [True]
    assert torch.equal(full.generator.get_state(), counted.generator.get_state())
