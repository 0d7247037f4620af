"""Predictor.stream(): per-batch outputs on the host, with backpressure and clean early exits."""

from __future__ import annotations

import contextlib

import anyio
import pytest
import torch
from conftest import StuckUntilReported, make_loader, make_model
from torch import nn

import asynchat._compute
from asynchat import Callback, LoopState, LoopStatus, Predictor

pytestmark = pytest.mark.anyio


async def test_stream_yields_each_batch_outputs_in_order() -> None:
    model = make_model()
    loader = make_loader(80, 16)
    predictor = Predictor(model, loader)
    outputs = [out async for out in predictor.stream()]
    assert predictor.status is LoopStatus.FINISHED
    assert len(outputs) == 5
    with torch.no_grad():
        expected = [model.eval()(x) for x, _ in loader]
    for got, want in zip(outputs, expected, strict=True):
        assert got.device.type == "cpu" and not got.requires_grad
        assert torch.equal(got, want)


async def test_a_slow_consumer_holds_the_predictor_back_and_loses_nothing() -> None:
    predictor = Predictor(make_model(), make_loader(160, 8))  # 20 batches
    leads: list[int] = []
    received = 0
    async with contextlib.aclosing(predictor.stream(buffer=2)) as outputs:
        async for _ in outputs:
            received += 1
            await anyio.sleep(0.01)
            leads.append(predictor.state.global_step - received)
    assert received == 20
    assert max(leads) <= 2 + 1, "at most `buffer` unread, plus the step waiting to hand over"


async def test_leaving_the_stream_early_stops_the_predictor() -> None:
    predictor = Predictor(make_model(), make_loader(160, 8))
    async with contextlib.aclosing(predictor.stream(buffer=1)) as outputs:
        async for _ in outputs:
            break
    assert predictor.status is LoopStatus.FINISHED
    assert predictor.state.stop_reason == "the stream was closed"
    assert predictor.state.global_step < 20


async def test_a_stream_closed_while_a_hook_runs_on_is_reported(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the stream waits for the step in progress, as a cancellation of fit() does
    (``tests/test_control.py``): one that runs on past ``SLOW_END_S`` is reported once."""
    monkeypatch.setattr(asynchat._compute, "SLOW_END_S", 0.3)
    hold = StuckUntilReported()

    class Stuck(Callback):
        def on_batch_end(self, state: LoopState) -> None:
            if state.global_step == 1:  # (counted at the step's end: this is the second)
                hold.block()

    predictor = Predictor(make_model(), make_loader(160, 8), callbacks=[Stuck()], prefetch=0)
    with hold.releasing(), caplog.at_level("WARNING", logger="asynchat.loop"):
        async with contextlib.aclosing(predictor.stream(buffer=1)) as outputs:
            async for _ in outputs:
                await anyio.to_thread.run_sync(hold.stuck.wait)
                break  # the first batch's outputs, while the second's hook is stuck
    assert hold.released.is_set() and len(caplog.records) == 1, caplog.text
    report = caplog.records[0].getMessage()
    assert report.startswith("asynchat-predictor-")
    assert "its stream was closed 0.3 s ago" in report and "the close returns then" in report
    assert "in on_batch_end\n    hold.block()\n" in report
    assert predictor.status is LoopStatus.FINISHED


async def test_cancelling_the_consumer_cancels_the_predictor() -> None:
    predictor = Predictor(make_model(), make_loader(160, 8))
    with anyio.move_on_after(0.2) as scope:
        async with contextlib.aclosing(predictor.stream(buffer=1)) as outputs:
            async for _ in outputs:
                await anyio.sleep(1)
    assert scope.cancelled_caught
    assert predictor.status in (LoopStatus.CANCELLED, LoopStatus.FINISHED)
    assert predictor.state.global_step < 20


async def test_an_error_in_the_model_is_raised_from_the_iteration() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ZeroDivisionError("broken model")

    predictor = Predictor(Broken(), make_loader())
    with pytest.raises(ZeroDivisionError, match="broken model"):
        async for _ in predictor.stream():
            pass
    assert predictor.status is LoopStatus.FAILED


def test_bad_buffer() -> None:
    predictor = Predictor(make_model(), make_loader())
    with pytest.raises(ValueError, match="buffer must be a positive int, got 0"):
        anyio.run(anext, predictor.stream(buffer=0))  # type: ignore[arg-type]
