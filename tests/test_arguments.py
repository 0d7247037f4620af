"""Every bad argument gets an error that names it, shows the value and says what to do."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import make_loader, make_model, sgd
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from asynchat import (
    BasicBatchProcessor,
    Callback,
    DistributedDataParallelTrainer,
    LoopState,
    MultiBatchProcessor,
    Predictor,
    Trainer,
)
from asynchat.callbacks import (
    Checkpoint,
    EarlyStopping,
    ExponentialMovingAverage,
    FreezeModule,
    GradClip,
    JSONLinesLogger,
    LossMonitor,
    LRSchedule,
    MetricUpdater,
    Progress,
    StatsMonitor,
    TensorBoardLogger,
    Validation,
    cosine,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    one_cycle,
    poly,
    resumable,
    step_decay,
)

_ACCURACY = MulticlassAccuracy(3)
_SCHEDULE = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))


def trainer(**overrides: Any) -> Trainer:
    kwargs: dict[str, Any] = dict(
        model=make_model(),
        data_loader=make_loader(),
        optimizer=sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
    )
    kwargs.update(overrides)
    return Trainer(**kwargs)


def ddp(**overrides: Any) -> DistributedDataParallelTrainer:
    """A DDP trainer's arguments are checked before it asks for its process group."""
    return DistributedDataParallelTrainer(
        make_model(), make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=1, **overrides
    )


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (
            {"model": "resnet"},
            TypeError,
            r"model must be a torch.nn.Module or a mapping .*, got str",
        ),
        ({"data_loader": 42}, TypeError, r"data_loader must be iterable.*int"),
        (
            {"data_loader": iter([1, 2]), "num_epochs": 2},
            TypeError,
            r"data_loader is an iterator .*num_epochs=1",
        ),
        (
            {"num_epochs": None},
            ValueError,
            r"exactly one of num_epochs and num_steps, got num_epochs=None and num_steps=None",
        ),
        (
            {"num_steps": 5},
            ValueError,
            r"exactly one of num_epochs and num_steps, got num_epochs=1 and num_steps=5",
        ),
        ({"num_epochs": 0}, ValueError, r"num_epochs must be a positive int, got 0"),
        ({"num_epochs": -3}, ValueError, r"num_epochs must be a positive int, got -3"),
        ({"num_epochs": 2.5}, ValueError, r"num_epochs must be a positive int, got 2.5"),
        ({"num_epochs": True}, ValueError, r"num_epochs must be a positive int, got True"),
        (
            {"num_epochs": None, "num_steps": 0},
            ValueError,
            r"num_steps must be a positive int, got 0",
        ),
        ({"loss_fn": None}, ValueError, r"Trainer needs a loss: pass loss_fn="),
        (
            {"batch_processor": BasicBatchProcessor(nn.MSELoss())},
            ValueError,
            r"either loss_fn or batch_processor, not both",
        ),
        (
            {"loss_fn": None, "batch_processor": "basic"},
            TypeError,
            r"batch_processor must be an asynchat.BatchProcessor, got 'basic'",
        ),
        (
            {"optimizer": 42},
            TypeError,
            r"optimizer must be a torch.optim.Optimizer or a factory .* got 42",
        ),
        (
            {"callbacks": [object()]},
            TypeError,
            r"callbacks\[0\] must be an asynchat.Callback instance, got <object object",
        ),
        (
            {"callbacks": [Callback(), Callback]},
            TypeError,
            r"callbacks\[1\] is the class Callback, not an instance; pass Callback\(\) instead",
        ),
        ({"callbacks": Callback()}, TypeError, r"got the single callback .* pass callbacks=\["),
        # One instance listed twice ran its hooks twice a phase: an LRSchedule stepped twice
        # a step (0.5**8 after 4 steps of StepLR(gamma=0.5), not 0.5**4).
        (
            {"callbacks": [_SCHEDULE, Callback(), _SCHEDULE]},
            ValueError,
            r"callbacks\[0\] and callbacks\[2\] are one LRSchedule instance: .* list it once",
        ),
        ({"callbacks": "progress"}, TypeError, r"callbacks must be a sequence of Callback"),
        ({"device": "tpu"}, ValueError, r"device must be None, .* got 'tpu'"),
        ({"device": "meta"}, ValueError, r"device='meta' but torch.accelerator has no 'meta'"),
        ({"prefetch": -1}, ValueError, r"prefetch must be an int >= 0 .*got -1"),
        ({"name": 3}, TypeError, r"name must be a str or None, got 3"),
        ({"name": " "}, ValueError, r"name must not be blank .* got ' '"),
        ({"loss_fn": "mse"}, TypeError, r"loss_fn must be callable, got 'mse'"),
        # Classes for instances are callable too, and failed late with torch's errors: the
        # loss at the first step ("Boolean value of Tensor ... is ambiguous"), the optimizer
        # as a factory SGD(model) ("can only optimize Tensors, but one of the params is ...").
        (
            {"loss_fn": nn.CrossEntropyLoss},
            TypeError,
            r"loss_fn is the class CrossEntropyLoss, not a loss function; pass an instance",
        ),
        (
            {"optimizer": torch.optim.SGD},
            TypeError,
            r"optimizer is the class SGD, not an optimizer; pass SGD\(model.parameters\(\)",
        ),
        (
            {"model": nn.Linear},
            TypeError,
            r"model must be .* got the class Linear, not an instance",
        ),
    ],
)
def test_bad_trainer_arguments(
    overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        trainer(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda() -> None:
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
        trainer(device="cuda")


def test_devices_come_from_torch_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another accelerator (mps here, pretended) is picked by device=None and accepted by
    name; one the machine lacks is refused naming what it has."""
    from asynchat._device import accelerator, resolve_device

    if accelerator() is None:  # a machine without any accelerator
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match=r"no 'mps' device \(it finds none\)"):
            resolve_device("mps")
    monkeypatch.setattr(
        torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("mps")
    )
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("mps", 0)
    assert resolve_device("mps") == torch.device("mps", 0)
    with pytest.raises(ValueError, match=r"only 1 mps device"):
        resolve_device("mps:1")
    with pytest.raises(ValueError, match=r"no 'xpu' device \(this machine's is mps\)"):
        resolve_device("xpu")


def test_callback_with_a_non_callable_hook() -> None:
    class Odd(Callback):
        on_step_end = 3  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"Odd.on_step_end must be a method taking `state`, got 3"):
        trainer(callbacks=[Odd()])


def test_callback_with_an_async_generator_hook() -> None:
    class Gen(Callback):
        async def on_step_end(self, state: LoopState):  # type: ignore[no-untyped-def,override]
            yield

    with pytest.raises(TypeError, match=r"Gen.on_step_end is an async generator"):
        trainer(callbacks=[Gen()])


def test_an_async_on_checkpoint_is_refused() -> None:
    # Called on the compute thread right before the snapshot, it would never be awaited.
    class Flusher(Callback):
        async def on_checkpoint(self, state: LoopState) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"Flusher.on_checkpoint must be a plain def"):
        trainer(callbacks=[Flusher()])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"grad_accumulation_steps": 0},
            ValueError,
            r"grad_accumulation_steps must be a positive int, got 0",
        ),
        ({"grad_accumulation_steps": 1.0}, ValueError, r"grad_accumulation_steps .* got 1.0"),
        ({"amp": "fp8"}, ValueError, r"amp must be None, 'bf16' or 'fp16', got 'fp8'"),
    ],
)
def test_bad_processor_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        BasicBatchProcessor(nn.MSELoss(), **kwargs)


def test_multi_batch_processor_loss_list_must_be_callables() -> None:
    with pytest.raises(TypeError, match=r"loss_fn\[1\] must be callable, got None"):
        MultiBatchProcessor([nn.MSELoss(), None])  # type: ignore[list-item]


@pytest.mark.anyio
class TestErrorsFoundWhileRunning:
    async def test_optimizer_factory_returning_something_else(self) -> None:
        with pytest.raises(
            TypeError, match=r"factory must return a torch.optim.Optimizer, got 'adam'"
        ):
            await trainer(optimizer=lambda model: "adam").fit()

    async def test_batch_that_cannot_be_split(self) -> None:
        batches = [(torch.randn(2, 8), torch.zeros(2), torch.zeros(2))]
        with pytest.raises(TypeError, match=r"cannot split a batch of type tuple and length 3"):
            await trainer(data_loader=batches).fit()

    async def test_training_batch_without_targets(self) -> None:
        with pytest.raises(ValueError, match=r"cannot train on a batch without a loss"):
            await trainer(data_loader=[torch.randn(2, 8)]).fit()

    async def test_multi_batch_item_that_is_not_a_tuple(self) -> None:
        processor = MultiBatchProcessor(nn.CrossEntropyLoss())
        with pytest.raises(TypeError, match=r"non-empty tuple of sub-batches, got Tensor"):
            await trainer(
                loss_fn=None, batch_processor=processor, data_loader=[torch.randn(2, 8)]
            ).fit()

    async def test_multi_batch_loss_count_mismatch(self) -> None:
        processor = MultiBatchProcessor([nn.CrossEntropyLoss()] * 3)
        items = [(b, b) for b in make_loader(16, 16)]
        with pytest.raises(ValueError, match=r"got 3 loss functions for a step of 2 sub-batches"):
            await trainer(loss_fn=None, batch_processor=processor, data_loader=items).fit()

    async def test_step_bound_with_an_empty_loader(self) -> None:
        with pytest.raises(RuntimeError, match=r"yielded no batch in epoch 0, so num_steps=5"):
            await trainer(data_loader=[], num_epochs=None, num_steps=5).fit()

    async def test_predictor_over_an_empty_loader_runs_no_step_and_says_so(self) -> None:
        with pytest.warns(RuntimeWarning, match=r"predictor-\d+: data_loader yielded no batch "
                          "in epoch 0: nothing ran"):  # fmt: skip
            state = await Predictor(make_model(), []).fit()
        assert state.global_step == 0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Checkpoint(""), ValueError, r"save_dir must be a non-empty path.*got ''"),
        (lambda: Checkpoint(5), ValueError, r"save_dir must be a non-empty path.*got 5"),
        (lambda: Checkpoint("d", save_on_end="no"), TypeError, r"save_on_end must be True or"),
        (lambda: Checkpoint("d", overwrite=1), TypeError, r"overwrite must be True or False"),
        (lambda: TensorBoardLogger("d", overwrite="y"), TypeError, r"overwrite must be True or"),
        (lambda: JSONLinesLogger("x", overwrite=None), TypeError, r"overwrite must be True or"),
        # Accepted, a string was true: "no" turned on what it was meant to turn off (an
        # EMA's warmup, a frozen module's eval mode, DDP's search for unused parameters).
        (lambda: BasicBatchProcessor(set_to_none="no"), TypeError, r"set_to_none must be True"),
        (lambda: MultiBatchProcessor(set_to_none=0), TypeError, r"set_to_none must be True or"),
        (lambda: Predictor(make_model(), [], train_mode="y"), TypeError, r"train_mode must be"),
        (lambda: ExponentialMovingAverage(warmup="no"), TypeError, r"warmup must be True or F"),
        (lambda: FreezeModule(["a"], eval_mode="no"), TypeError, r"eval_mode must be True or"),
        (
            lambda: Validation([1], loss_fn=nn.MSELoss(), use_ema="no"),
            TypeError,
            r"use_ema must be True or False, got 'no'",
        ),
        (lambda: find_checkpoint("d", best="no"), TypeError, r"best must be True or False"),
        (lambda: load_weights(make_model(), "d", strict="no"), TypeError, r"strict must be True"),
        (lambda: ddp(find_unused_parameters="no"), TypeError, r"find_unused_parameters must"),
        # Accepted, these failed later and deeper, or never: a list as amp ("unhashable
        # type"), an until_epoch no epoch equals (frozen throughout), a norm_type torch
        # failed on at the first update, a warmup_start_factor as a string ("'<' not
        # supported"), a file name as Progress's stream (at the first line), rich="no"
        # (a bar), a string as data_loader (each character a batch).
        (lambda: BasicBatchProcessor(amp=["bf16"]), ValueError, r"amp must be None, 'bf16' or"),
        (lambda: FreezeModule(["a"], until_epoch="2"), ValueError, r"until_epoch must be an int"),
        (lambda: FreezeModule(["a"], until_epoch=1.5), ValueError, r"until_epoch must be an int"),
        (lambda: GradClip(1.0, norm_type="2"), TypeError, r"norm_type must be a number, got '2'"),
        (lambda: GradClip(1.0, norm_type=0), ValueError, r"norm_type must be > 0, got 0"),
        (lambda: GradClip(1.0, norm_type=-1.0), ValueError, r"norm_type must be > 0"),
        (
            lambda: LRSchedule(lambda o: None, warmup_start_factor="0.1"),  # type: ignore[arg-type,return-value]
            TypeError,
            r"warmup_start_factor must be a number, got '0\.1'",
        ),
        (lambda: Progress(stream="log.txt"), TypeError, r"stream must be a text stream .*'log"),  # type: ignore[arg-type]
        (lambda: Progress(rich="no"), TypeError, r"rich must be True or False, got 'no'"),  # type: ignore[arg-type]
        (
            lambda: trainer(data_loader="data/train.pt"),
            TypeError,
            r"data_loader must be a DataLoader, .* got the str 'data/train\.pt'; a path is not",
        ),
        (lambda: MetricUpdater("acc"), TypeError, r"metrics must be a mapping of names to"),  # type: ignore[arg-type]
        # One metric instance in two places counted each batch twice, each reset the other.
        (
            lambda: MetricUpdater({"acc": _ACCURACY, "accuracy": _ACCURACY}),
            ValueError,
            r"metrics\['acc'\] and metrics\['accuracy'\] are one MulticlassAccuracy instance",
        ),
        (
            lambda: trainer(
                callbacks=[
                    MetricUpdater({"acc": _ACCURACY}),
                    MetricUpdater({"accuracy": _ACCURACY}, prefix="also/"),
                ]
            ),
            ValueError,
            r"callbacks\[0\]'s metrics\['acc'\] and callbacks\[1\]'s metrics\['accuracy'\] "
            r"are one MulticlassAccuracy instance",
        ),
        # Validation's own: each failed only as it first ran, after an epoch of training.
        (lambda: Validation([1], metrics=["acc"]), TypeError, r"metrics must be a mapping"),  # type: ignore[arg-type]
        (lambda: Validation([1], loss_fn="mse"), TypeError, r"loss_fn must be callable, got 'mse'"),  # type: ignore[arg-type]
        (lambda: Validation([1], loss_fn=nn.MSELoss), TypeError, r"loss_fn is the class MSELoss"),
        (
            lambda: Validation([1], batch_processor=nn.MSELoss()),  # type: ignore[arg-type]
            TypeError,
            r"batch_processor must be an asynchat\.BatchProcessor, got MSELoss",
        ),
        (
            lambda: Validation([1], loss_fn=nn.MSELoss(), callbacks=[print]),  # type: ignore[list-item]
            TypeError,
            r"callbacks\[0\] must be an asynchat\.Callback instance",
        ),
        (
            lambda: Validation([1], loss_fn=nn.MSELoss(), select="outputs"),  # type: ignore[arg-type]
            TypeError,
            r"select must be a function select\(state\) -> \(preds, target\), got 'outputs'",
        ),
        (lambda: ddp(sync_batchnorm="no"), TypeError, r"sync_batchnorm must be True or False"),
        (lambda: Checkpoint("d", monitor=5), ValueError, r"monitor must be a metric name.*5"),
        (lambda: Checkpoint("d", keep_last=-1), ValueError, r"keep_last must be an int >= 0"),
        (lambda: trainer(resume_from=""), ValueError, r"resume_from must be a non-empty path"),
        (lambda: trainer(resume_from=5), ValueError, r"resume_from must be a non-empty path"),
        # Accepted, an empty path (an unset environment variable) meant the working directory.
        (lambda: load_checkpoint(""), ValueError, r"path must be a non-empty path.*''"),
        (lambda: find_checkpoint(""), ValueError, r"directory must be a non-empty path.*''"),
        (lambda: resumable(""), ValueError, r"directory must be a non-empty path.*''"),
        (
            lambda: load_weights(make_model(), ""),
            ValueError,
            r"checkpoint must be a non-empty path.*''",
        ),
        (lambda: trainer().events(progress_every=-1), ValueError, r"progress_every must be a"),
        (lambda: trainer().events(progress_every="x"), ValueError, r"progress_every.*'x'"),
        (lambda: trainer().events(buffer=True), ValueError, r"buffer must be a positive int"),
        (lambda: trainer().stop(reason=5), TypeError, r"reason must be a str or None, got 5"),  # type: ignore[arg-type]
        (
            lambda: trainer(optimizer=sgd(make_model(seed=1))),
            ValueError,
            r"optimizer SGD holds none of the model's parameters",
        ),
        (lambda: Progress(every_n_steps=0), ValueError, r"every_n_steps must be a positive int"),
        (lambda: JSONLinesLogger("x", every_n_steps=2.5), ValueError, r"every_n_steps.*2\.5"),
        # Accepted, an empty path logged into the working directory ("" is "."), and a
        # directory given as the JSON Lines file failed only when the run began.
        (lambda: JSONLinesLogger(""), ValueError, r"path must be a non-empty path.*got ''"),
        (lambda: JSONLinesLogger(None), ValueError, r"path must be a non-empty path.*None"),  # type: ignore[arg-type]
        (lambda: JSONLinesLogger("."), ValueError, r"path='\.' is a directory.*'\./log\.jsonl'"),
        (lambda: TensorBoardLogger(""), ValueError, r"log_dir must be a non-empty path.*''"),
        (
            lambda: TensorBoardLogger(__file__),
            ValueError,
            r"log_dir='.*\.py' is a file",
        ),
        (lambda: StatsMonitor(every_n_steps="5"), ValueError, r"every_n_steps.*'5'"),
        (lambda: EarlyStopping("m", patience=True), ValueError, r"patience must be a positive"),
        # Accepted, or refused with Python's own words naming no argument: a monitor of
        # None, a NaN min_delta (nothing ever improved by it: stopped after `patience`
        # checks), a max_norm or decay given as a string, a FreezeModule of an int.
        (lambda: EarlyStopping(None), ValueError, r"monitor must be a metric name .*None"),  # type: ignore[arg-type]
        (lambda: EarlyStopping("m", min_delta=math.nan), ValueError, r"min_delta must be >= 0"),
        (lambda: GradClip("1"), TypeError, r"max_norm must be a number, got '1'"),  # type: ignore[arg-type]
        (lambda: GradClip(-1), ValueError, r"max_norm must be > 0, got -1"),
        (lambda: ExponentialMovingAverage("0.9"), TypeError, r"decay must be a number"),  # type: ignore[arg-type]
        (lambda: ExponentialMovingAverage(math.nan), ValueError, r"decay must be in \[0, 1\)"),
        (lambda: FreezeModule(3), ValueError, r"names must be a non-empty list .* got 3"),  # type: ignore[arg-type]
        (lambda: FreezeModule(["a", 1]), ValueError, r"names must be a non-empty list"),  # type: ignore[list-item]
        (
            lambda: Validation([1], prefix=3, loss_fn=nn.MSELoss()),
            TypeError,
            r"prefix must be a str",
        ),  # type: ignore[arg-type]
        (lambda: LossMonitor(prefix=None), TypeError, r"prefix must be a str, got None"),  # type: ignore[arg-type]
        # Accepted, these failed only when first used: a schedule of 0 steps at its first
        # step, a Validation without data after the first epoch's training.
        (lambda: cosine(0), ValueError, r"total_steps must be a positive int, got 0"),
        (lambda: step_decay(0), ValueError, r"step_size must be a positive int, got 0"),
        (lambda: poly(-1), ValueError, r"total_steps must be a positive int, got -1"),
        (lambda: one_cycle(0.1, 0), ValueError, r"total_steps must be a positive int, got 0"),
        (
            lambda: Validation(None, loss_fn=nn.CrossEntropyLoss()),  # type: ignore[arg-type]
            TypeError,
            r"data_loader must be iterable .* got NoneType",
        ),
        (
            lambda: MultiBatchProcessor([nn.MSELoss(), nn.MSELoss]),  # type: ignore[list-item]
            TypeError,
            r"loss_fn\[1\] is the class MSELoss, not a loss function",
        ),
        (
            lambda: LRSchedule(lambda o: None, monitor=""),  # type: ignore[arg-type,return-value]
            ValueError,
            r"monitor must be a metric name",
        ),
        # The class, which needs more than the optimizer: it failed at the loop's start with
        # torch's "missing 1 required positional argument: 'step_size'".
        (
            lambda: LRSchedule(torch.optim.lr_scheduler.StepLR),
            TypeError,
            r"scheduler must be a factory .*: e\.g\. lambda optimizer: StepLR\(optimizer, \.\.\.\)",
        ),
        (
            lambda: LRSchedule(  # built already, on an optimizer of its own
                torch.optim.lr_scheduler.StepLR(torch.optim.SGD(nn.Linear(1, 1).parameters()), 1)  # type: ignore[arg-type]
            ),
            TypeError,
            r"got <torch\.optim\.lr_scheduler\.StepLR object .*lambda optimizer: StepLR",
        ),
    ],
)
def test_hardened_arguments(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_an_optimizer_factory_over_another_model_fails_before_training() -> None:
    import anyio

    other = make_model(seed=1)
    t = trainer(optimizer=lambda model: sgd(other))
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        anyio.run(t.fit)
    assert t.state.global_step == 0


@pytest.mark.parametrize("norm_type", [math.inf, "inf", 1, 0.5])
def test_grad_clip_takes_the_norm_types_torch_takes(norm_type: Any) -> None:
    import anyio

    p = math.inf if norm_type == "inf" else norm_type
    norms = []

    class Norm(Callback):
        def on_before_update(self, state: LoopState) -> None:  # after the clip's
            grads = [q.grad.flatten() for q in state.model.parameters() if q.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.cat(grads), p)))

    clip = GradClip(1e-3, norm_type=norm_type)
    anyio.run(trainer(callbacks=[clip, Norm()], num_epochs=None, num_steps=2).fit)
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-4) for n in norms), norms
