"""CudaGraphBatchProcessor: its checks and the capture gate everywhere, the graphs
themselves on a GPU (those tests are marked ``cuda`` and skip without one)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
import torch
from conftest import make_loader, make_model
from torch import nn
from torch.utils.data import DataLoader

from asynchat import (
    BasicBatchProcessor,
    Callback,
    CudaGraphBatchProcessor,
    LoopState,
    Trainer,
    every,
)
from asynchat._capture import CaptureGate
from asynchat._graphs import check_graphable, signature
from asynchat.callbacks import Checkpoint, FreezeModule, GradClip, LRSchedule, cosine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_without_cuda_construction_fails_naming_cuda() -> None:
    with pytest.raises(RuntimeError, match=r"needs CUDA .*BasicBatchProcessor"):
        CudaGraphBatchProcessor(nn.CrossEntropyLoss())


def adam(**kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(make_model().parameters(), lr=1e-3, **kwargs)


class Unsafe(Callback):
    def on_before_update(self, state: LoopState) -> None:
        pass


class EveryMarkedSafe(Callback):
    graph_safe = True

    @every(steps=10)
    def on_before_update(self, state: LoopState) -> None:
        pass


class AsyncMarkedSafe(Callback):
    graph_safe = True

    async def on_before_update(self, state: LoopState) -> None:
        pass


def test_check_graphable_names_what_to_change() -> None:
    model = make_model()
    ok = {"default": adam(capturable=True)}
    check_graphable(model, ok, [GradClip(1.0), Callback()], None)  # nothing to refuse
    sgd = torch.optim.SGD(make_model().parameters(), lr=0.1)
    check_graphable(model, {"default": sgd}, [], None)
    two = {
        "a": torch.optim.AdamW(model[0].parameters(), capturable=True),
        "b": torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9),
    }
    check_graphable(model, two, [GradClip(1.0)], None)  # stepped in turn
    muon = torch.optim.Muon([model[0].weight], lr=0.02)
    check_graphable(model, {"muon": muon}, [], None)  # a float lr, no schedule: graphable
    shared = {
        "a": torch.optim.AdamW(model.parameters(), capturable=True),
        "b": torch.optim.SGD(model[2].parameters(), lr=0.1),
    }
    cases: list[tuple[Any, list[Any], Any, str]] = [
        ({"default": adam()}, [], None, r"Adam must be built with capturable=True"),
        ({"a": adam(capturable=True), "b": adam()}, [], None,
         r"Adam \(optimizer 'b'\) must be built with capturable=True"),
        (shared, [], None, r"'a' and 'b' both hold the parameter '2\.weight'"),
        ({"default": torch.optim.LBFGS(model.parameters())}, [], None,
         r"LBFGS evaluates the loss again .*BasicBatchProcessor"),
        ({"default": adam(capturable=True)}, [], "fp16", r"amp='fp16'\) needs a fused"),
        (ok, [LRSchedule(cosine(10))], None, "needs a tensor learning rate"),
        ({"default": torch.optim.SGD(make_model().parameters(), lr=torch.tensor(0.1))},
         [LRSchedule(cosine(10))], None, "SGD reads a tensor learning rate .*fused=True"),
        ({"muon": torch.optim.Muon([model[0].weight], lr=torch.tensor(0.02))},
         [LRSchedule(cosine(10))], None, r"Muon reads its learning rate on the host .*neither"),
        (ok, [Unsafe()], None, r"Unsafe\.on_before_update would run inside"),
        (ok, [AsyncMarkedSafe()], None, r"AsyncMarkedSafe\.on_before_update"),
        (ok, [EveryMarkedSafe()], None, r"EveryMarkedSafe\.on_before_update has @every"),
    ]  # fmt: skip
    for optimizers, callbacks, amp, message in cases:
        with pytest.raises(ValueError, match=message):
            check_graphable(model, optimizers, callbacks, amp)
    scheduled = torch.optim.Adam(
        make_model().parameters(), lr=torch.tensor(1e-3), capturable=True
    )  # fmt: skip
    check_graphable(model, {"default": scheduled}, [LRSchedule(cosine(10))], None)


def test_a_batch_signature_is_each_tensor_shape_dtype_and_device() -> None:
    batch = (torch.zeros(4, 3), {"y": torch.zeros(4, dtype=torch.long)})
    assert signature(batch) == (((4, 3), torch.float32, torch.device("cpu")),
                                ((4,), torch.int64, torch.device("cpu")))  # fmt: skip
    assert signature(batch) != signature((torch.zeros(2, 3), {"y": torch.zeros(2)}))


def test_the_capture_gate_holds_staging_during_a_capture_and_waits_for_it() -> None:
    """A capture waits for staging in progress; staging waits for the capture; two
    captures never overlap."""
    gate = CaptureGate()
    log: list[str] = []
    staging = threading.Event()

    def stage(name: str, hold: float) -> None:
        with gate.work():
            log.append(f"{name} in")
            staging.set()
            time.sleep(hold)
            log.append(f"{name} out")

    def capture(name: str) -> None:
        with gate.capturing():
            log.append(f"{name} in")
            time.sleep(0.1)
            log.append(f"{name} out")

    first = threading.Thread(target=stage, args=("stage1", 0.2))
    first.start()
    staging.wait()
    captures = [threading.Thread(target=capture, args=(f"capture{i}",)) for i in (1, 2)]
    for thread in captures:
        thread.start()
    time.sleep(0.05)
    second = threading.Thread(target=stage, args=("stage2", 0.0))
    second.start()
    for thread in (first, *captures, second):
        thread.join()
    assert log[:2] == ["stage1 in", "stage1 out"]  # the captures waited for it
    captured = log[2:6]
    assert captured[0].endswith(" in") and captured[1] == captured[0].replace(" in", " out")
    assert captured[2].endswith(" in") and captured[3] == captured[2].replace(" in", " out")
    assert "stage2 in" in log[2:] and log.index("stage2 in") > log.index("capture1 in")


class EagerOnTheCpu(CudaGraphBatchProcessor):
    """The graph processor's eager steps, the code its graphs hold, on the CPU: its
    warm-up, never ending (nothing is captured)."""

    def setup(self, loop: Any) -> None:
        BasicBatchProcessor.setup(self, loop)  # (not the check for a CUDA device)
        self._checked, self._params = False, ()
        self.invalidate()


class UpdatesSeen(Callback):
    graph_safe = True  # (a def hook that launches no sync: it only records)

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def on_before_update(self, state: LoopState) -> None:
        self.seen.append(state.optimizer_name)


@pytest.mark.anyio
@pytest.mark.parametrize("accumulate", [1, 2])
async def test_the_code_the_graphs_hold_steps_optimizers_in_turn_as_eager_steps_do(
    monkeypatch: pytest.MonkeyPatch, accumulate: int
) -> None:
    """Muon for the first layer's weight, SGD for the rest, GradClip over each's own: the
    update the graph would capture steps them in turn, with its hooks, to the very weights
    BasicBatchProcessor's steps give."""
    optimizers = {
        "muon": lambda m: torch.optim.Muon([m[0].weight], lr=0.02),
        "sgd": lambda m: torch.optim.SGD([m[0].bias, *m[2].parameters()], lr=0.1,
                                         momentum=0.9),
    }  # fmt: skip

    async def train(processor: Any) -> tuple[nn.Module, list[str | None]]:
        model, seen = make_model(seed=3), UpdatesSeen()
        await Trainer(
            model, make_loader(96, 16), optimizers, batch_processor=processor, num_steps=12,
            callbacks=[GradClip(0.5), seen],
        ).fit()  # fmt: skip
        return model, seen.seen

    eager, eager_seen = await train(
        BasicBatchProcessor(nn.CrossEntropyLoss(), grad_accumulation_steps=accumulate,
                            set_to_none=False)
    )  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        graph_code = EagerOnTheCpu(
            nn.CrossEntropyLoss(),
            warmup_steps=1000,
            grad_accumulation_steps=accumulate,  # type: ignore[arg-type]
        )
    graphed, graph_seen = await train(graph_code)
    assert graph_code._graphs is None and graph_code._warm == 12 // accumulate
    assert graph_seen == eager_seen == ["muon", "sgd"] * (12 // accumulate)
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lr_schedule_updates_a_tensor_learning_rate_in_place_also_on_resume(tmp_path: Any) -> None:
    """A graph reads the lr tensor it captured: the schedule must never replace it, when
    stepping nor when a resumed run rebuilds it."""
    lrs: list[torch.Tensor] = []

    def tensor_sgd(model: nn.Module) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
        lrs.append(optimizer.param_groups[0]["lr"])
        return optimizer

    def trainer(steps: int, resume: bool, directory: Any = tmp_path) -> Trainer:
        return Trainer(
            make_model(), make_loader(), tensor_sgd, loss_fn=nn.CrossEntropyLoss(),
            num_steps=steps, resume_from=directory if resume else None,
            callbacks=[LRSchedule(cosine(12), warmup_steps=2), Checkpoint(directory)],
        )  # fmt: skip

    first = trainer(4, resume=False)
    anyio.run(first.fit)
    assert first.optimizers["default"].param_groups[0]["lr"] is lrs[0]
    second = trainer(8, resume=True)
    anyio.run(second.fit)
    group = second.optimizers["default"].param_groups[0]
    assert group["lr"] is lrs[1]
    whole = trainer(8, resume=False, directory=tmp_path / "whole")
    anyio.run(whole.fit)
    assert 0 < group["lr"].item() < 0.1
    assert group["lr"].item() == whole.optimizers["default"].param_groups[0]["lr"].item()


# -- on a GPU --------------------------------------------------------------------------


def cuda_pair(amp: str | None = None, fused: bool = True, lr: Any = 1e-2) -> tuple[nn.Module, Any]:
    model = make_model(seed=3)

    def optimizer(m: nn.Module) -> torch.optim.Optimizer:
        rate = torch.tensor(lr, device="cuda") if isinstance(lr, str) else lr
        return torch.optim.AdamW(m.parameters(), lr=rate, capturable=True, fused=fused)

    return model, optimizer


async def train_cuda(processor: Any, *, amp: str | None = None, steps: int = 12,
                     callbacks: Any = (), batch_size: int = 16, n: int = 96,
                     lr: Any = 1e-2) -> tuple[nn.Module, LoopState]:  # fmt: skip
    model, optimizer = cuda_pair(amp, lr=lr)
    state = await Trainer(
        model, make_loader(n, batch_size), optimizer, batch_processor=processor,
        num_steps=steps, device="cuda", callbacks=list(callbacks),
    ).fit()  # fmt: skip
    return model, state


@pytest.mark.cuda
@needs_cuda
@pytest.mark.anyio
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
@pytest.mark.parametrize("accumulate", [1, 2])
async def test_graphed_steps_train_like_eager_steps(amp: str | None, accumulate: int) -> None:
    """Warm-up 3, then replays: the weights after 12 steps equal eager training's (same
    kernels, so to float tolerance), with GradClip inside the graph."""
    from asynchat import BasicBatchProcessor

    eager, _ = await train_cuda(
        BasicBatchProcessor(nn.CrossEntropyLoss(), amp=amp, grad_accumulation_steps=accumulate,
                            set_to_none=False),
        callbacks=[GradClip(1.0)],
    )  # fmt: skip
    graph = CudaGraphBatchProcessor(
        nn.CrossEntropyLoss(),
        amp=amp,
        grad_accumulation_steps=accumulate,  # type: ignore[arg-type]
    )
    graphed, state = await train_cuda(graph, callbacks=[GradClip(1.0)])
    assert graph._graphs is not None, "the step was captured"
    tolerance = 1e-5 if amp is None else 2e-2
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    assert state.loss is not None and torch.isfinite(state.loss).item()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.anyio
@pytest.mark.parametrize("amp", [None, "fp16"])
async def test_several_optimizers_step_in_turn_in_the_graph(amp: str | None) -> None:
    """AdamW for the first layer, SGD with momentum for the last, GradClip over each's own:
    the graphed run's weights equal the eager processor's, which steps them in turn too."""
    from asynchat import BasicBatchProcessor

    optimizers = {
        "adamw": lambda m: torch.optim.AdamW(m[0].parameters(), lr=1e-2, capturable=True,
                                             fused=True),
        "sgd": lambda m: torch.optim.SGD(m[2].parameters(), lr=0.1, momentum=0.9, fused=True),
    }  # fmt: skip

    async def train(processor: Any) -> tuple[nn.Module, LoopState]:
        model = make_model(seed=3)
        state = await Trainer(
            model, make_loader(96, 16), optimizers, batch_processor=processor,
            num_steps=12, device="cuda", callbacks=[GradClip(0.5)],
        ).fit()  # fmt: skip
        return model, state

    eager, _ = await train(BasicBatchProcessor(nn.CrossEntropyLoss(), amp=amp,
                                               set_to_none=False))  # fmt: skip
    graph = CudaGraphBatchProcessor(nn.CrossEntropyLoss(), amp=amp)  # type: ignore[arg-type]
    graphed, state = await train(graph)
    assert graph._graphs is not None, "the step was captured"
    assert state.optimizer_name == "sgd", "as an eager update leaves it: the last stepped"
    tolerance = 1e-5 if amp is None else 2e-2
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.anyio
async def test_a_partial_batch_runs_eagerly_and_a_schedule_reaches_the_graph() -> None:
    """100 samples in batches of 16: the last batch of 4 runs eagerly with one warning; a
    tensor lr follows the schedule through the replays."""
    graph = CudaGraphBatchProcessor(nn.CrossEntropyLoss(), warmup_steps=2)
    with pytest.warns(RuntimeWarning, match="does not fit the graph"):
        _, state = await train_cuda(graph, steps=14, n=100, lr="tensor",
                                    callbacks=[LRSchedule(cosine(14))])  # fmt: skip
    lr = state.optimizers["default"].param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() < 1e-4  # the cosine's end


@pytest.mark.cuda
@needs_cuda
@pytest.mark.anyio
async def test_freezing_a_module_recaptures() -> None:
    captures: list[Any] = []  # the graphs of each step, kept alive (so ids are unique)

    class Count(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if graph._graphs is not None:
                captures.append(graph._graphs)

    graph = CudaGraphBatchProcessor(nn.CrossEntropyLoss(), warmup_steps=1)
    model, _ = await train_cuda(graph, steps=18, callbacks=[FreezeModule(["0"], until_epoch=1),
                                                             Count()])  # fmt: skip
    assert len({id(c) for c in captures}) == 2, "captured again once the module thawed"
    assert model[0].weight.requires_grad


def test_a_distributed_model_is_refused(tmp_path: Any) -> None:
    """DDP's (and FSDP's) collectives are not captured: refused, naming compile= instead."""
    import torch.distributed as dist

    from asynchat._graphs import _check_model

    _check_model(make_model())  # one device: fine
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )  # fmt: skip
    try:
        wrapped = nn.parallel.DistributedDataParallel(make_model())
        with pytest.raises(ValueError, match=r"does not capture DDP's or FSDP's .*compile="):
            _check_model(wrapped)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.anyio
async def test_a_model_that_computes_its_own_loss_is_graphed_too() -> None:
    """``loss_fn=model_loss``: dict batches, labels and all, in the graph's static batch."""
    from test_model_loss import Labelled, ScoresItself

    from asynchat import BasicBatchProcessor, model_loss

    async def train(processor: Any) -> nn.Module:
        model = ScoresItself()
        await Trainer(
            model, DataLoader(Labelled(), batch_size=16),
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, capturable=True),
            batch_processor=processor, num_steps=12, device="cuda",
        ).fit()  # fmt: skip
        return model

    eager = await train(BasicBatchProcessor(model_loss, set_to_none=False))
    graph = CudaGraphBatchProcessor(model_loss)
    graphed = await train(graph)
    assert graph._graphs is not None, "the step was captured"
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
