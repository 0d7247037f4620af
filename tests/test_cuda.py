"""CUDA paths: compute stream, copy-stream prefetch, no hidden syncs. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, make_model, sgd
from torch import nn

from asynchat import Callback, LoopState, Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.anyio,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


async def test_trains_on_cuda_like_on_the_cpu() -> None:
    cpu_model, cuda_model = make_model(seed=1), make_model(seed=1)
    await Trainer(
        cpu_model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2, device="cpu"
    ).fit()
    state = await Trainer(
        cuda_model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2, device="cuda"
    ).fit()
    assert state.device.type == "cuda"
    for a, b in zip(cpu_model.parameters(), cuda_model.parameters(), strict=True):
        assert torch.allclose(a, b.cpu(), atol=1e-5)


async def test_compute_runs_on_its_own_stream_with_batches_already_on_the_device() -> None:
    seen: list[tuple[bool, bool]] = []

    class Look(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            inputs, targets = state.batch
            on_own_stream = torch.cuda.current_stream() != torch.cuda.default_stream()
            seen.append((on_own_stream, inputs.is_cuda and targets.is_cuda))

    await Trainer(
        make_model(),
        make_loader(),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        device="cuda",
        callbacks=[Look()],
    ).fit()
    assert seen and all(own and on_device for own, on_device in seen)


async def test_no_host_device_sync_per_step() -> None:
    model = make_model().cuda()
    losses: list[float] = []

    class Log(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            losses.append(float(await state.loop.to_host(state.loss)))

    trainer = Trainer(
        model,
        make_loader(),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        device="cuda",
        callbacks=[Log()],
    )
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        await trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
