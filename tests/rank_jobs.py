"""Rank functions for the launch tests (module-level: the ranks import them by name)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from asynchat import DistributedDataParallelTrainer


def write_pid(directory: str, rank: int) -> None:
    """Write this process's pid to ``directory/rank{rank}.pid`` whole: a test polling for the
    file never reads it empty (written beside it, then renamed into place)."""
    partial = Path(directory, f".rank{rank}.pid.partial")
    partial.write_text(str(os.getpid()))
    partial.replace(Path(directory, f"rank{rank}.pid"))


async def all_reduce_rank(rank: int, world_size: int, out: str) -> None:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    await anyio.lowlevel.checkpoint()  # each rank runs an event loop of its own
    with Path(out, f"rank{rank}.txt").open("x") as file:  # noqa: ASYNC230 ("x": one job's rank)
        file.write(f"{world_size} {value.item()}")


async def fail_on_rank_one(rank: int, world_size: int) -> None:
    dist.barrier()
    if rank == 1:
        raise ValueError("rank one gives up")
    dist.barrier()  # rank 0 would wait here forever without the launcher
    await anyio.sleep_forever()


async def diverged_on_rank_one(rank: int, world_size: int, checkpoints: str, kind: str) -> None:
    """A DDP or FSDP (``kind``) trainer saving every 2 steps whose rank 1 puts a NaN into its
    parameters (its replica, or its shard) at step 4's end, just before that step's save:
    rank 0's are still finite there."""
    from asynchat import Callback, FullyShardedDataParallelTrainer, LoopState
    from asynchat.callbacks import Checkpoint

    class Poison(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if rank == 1 and state.global_step == 4:
                with torch.no_grad():
                    for p in state.loop.model.parameters():
                        getattr(p, "to_local", lambda p=p: p)().fill_(float("nan"))

    callbacks = [Poison(), Checkpoint(checkpoints, every_n_steps=2)]
    sharded = FullyShardedDataParallelTrainer if kind != "ddp" else None
    trainer = plain_trainer(sharded, num_steps=8, callbacks=callbacks)
    await trainer.fit()


async def returns_early_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 returns at once; rank 0, 2 s later, all-reduces (a collective rank 1 never
    joins: ranks that diverged)."""
    if rank == 1:
        return
    await anyio.sleep(2.0)
    dist.all_reduce(torch.ones(1))


async def ends_quietly_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 ends its process with exit code 0 (``os._exit(0)``) before its function returns;
    rank 0 works on for 60 s."""
    if rank == 1:
        os._exit(0)
    await anyio.sleep(60.0)


def lbfgs(model: torch.nn.Module, line_search: str | None = None) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(
        model.parameters(), lr=0.5, max_iter=5, history_size=4, line_search_fn=line_search
    )


async def ddp_lbfgs(
    rank: int,
    world_size: int,
    out: str,
    line_search: str | None,
    steps: int = 8,
    checkpoints: str = "",
    resume: bool = False,
) -> None:
    """``ddp_train``'s data and model (8 steps, 2 epochs, 8 samples a rank) with LBFGS, in
    float64 (in float32 LBFGS's steps made the rounding of two ranks' mean, against one
    process's, 1e-3 of the weights in 8 steps), and ``checkpoints`` every 3 steps if given
    (``resume``: from there). Writes the model's weights and how many times LBFGS evaluated
    the loss."""
    from asynchat import DistributedDataParallelTrainer
    from asynchat.callbacks import Checkpoint

    model = ddp_model().double()
    features, labels = ddp_data().tensors
    data = torch.utils.data.TensorDataset(features.double(), labels)
    trainer = DistributedDataParallelTrainer(
        model, torch.utils.data.DataLoader(data, batch_size=8, shuffle=True),
        lambda m: lbfgs(m, line_search), loss_fn=torch.nn.CrossEntropyLoss(), num_steps=steps,
        device="cpu", callbacks=[Checkpoint(checkpoints, every_n_steps=3)] if checkpoints else [],
        resume_from=checkpoints if resume else None,
    )  # fmt: skip
    await trainer.fit()
    optimizer = trainer.optimizers["default"]
    evaluations = optimizer.state[optimizer.param_groups[0]["params"][0]]["func_evals"]
    torch.save(
        {"model": model.state_dict(), "evaluations": evaluations},
        Path(out, f"lbfgs-rank{rank}.pt"),
    )


async def sleep_forever(rank: int, world_size: int) -> None:
    await anyio.sleep_forever()


async def tell_where(rank: int, world_size: int, seen: list[Any]) -> None:
    """Appends to ``seen`` (the caller's own list: run in the caller's process) what this
    rank saw: its rank and world size, its thread, and the process group's size."""
    import threading

    seen.append((rank, world_size, threading.get_ident(), dist.get_world_size()))
    await anyio.lowlevel.checkpoint()


def ddp_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    )


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, gathered from every rank if it is an FSDP ``DTensor`` (a collective)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def dropout_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3)
    )


def plain_trainer(kind: Any = None, **options: Any) -> Any:
    """The jobs' usual trainer: a ``kind`` (a DistributedDataParallelTrainer by default) of
    ``ddp_model()`` over ``ddp_data()`` in batches of 8 with SGD (lr 0.1) and cross-entropy,
    on the CPU; ``options`` add to or replace those."""
    from asynchat import DistributedDataParallelTrainer

    settings: dict[str, Any] = {
        "data_loader": torch.utils.data.DataLoader(ddp_data(), batch_size=8),
        "optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "loss_fn": torch.nn.CrossEntropyLoss(), "device": "cpu", **options,
    }  # fmt: skip
    return (kind or DistributedDataParallelTrainer)(ddp_model(), **settings)


async def ddp_train(
    rank: int,
    world_size: int,
    out: str,
    stop_at: int,
    checkpoints: str = "",
    resume: bool = False,
    accumulate: int = 1,
    control_lag: int = 0,
) -> None:
    from asynchat import BasicBatchProcessor, Callback, DistributedDataParallelTrainer, LoopState
    from asynchat.callbacks import Checkpoint

    class StopOnRankZero(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if rank == 0 and state.global_step == stop_at:
                state.loop.stop("rank 0 had enough")

    callbacks: list[Callback] = [StopOnRankZero()]
    if checkpoints and not resume:
        callbacks.append(Checkpoint(checkpoints, every_n_steps=3, save_on_end=False))
    loader = torch.utils.data.DataLoader(ddp_data(), batch_size=8, shuffle=True)  # 8 per rank
    trainer = DistributedDataParallelTrainer(
        ddp_model(),
        loader,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        batch_processor=BasicBatchProcessor(
            torch.nn.CrossEntropyLoss(), grad_accumulation_steps=accumulate
        ),
        num_epochs=2,
        device="cpu",
        callbacks=callbacks,
        resume_from=checkpoints if resume else None,
        control_lag=control_lag,
    )
    state = await trainer.fit()
    torch.save(
        {"model": trainer.model.state_dict(), "global_step": state.global_step,
         "stop_reason": state.stop_reason, "run_id": trainer.run_id},
        Path(out, f"rank{rank}.pt"),
    )  # fmt: skip


async def compiled_run(rank: int, world_size: int, out: str, kind: str, compiled: bool) -> None:
    """``plain_trainer``'s run, DDP or FSDP (``kind``), with accumulation over 2 steps
    (``no_sync``; FSDP neither reduces nor reshards between them), the step compiled or
    not; each rank saves its (full) weights, its steps and how many graphs it compiled."""
    from torch._dynamo.utils import counters

    from asynchat import BasicBatchProcessor, FullyShardedDataParallelTrainer

    processor = BasicBatchProcessor(
        torch.nn.CrossEntropyLoss(), compile=compiled, grad_accumulation_steps=2
    )
    trainer = plain_trainer(
        FullyShardedDataParallelTrainer if kind == "fsdp" else None,
        loss_fn=None, batch_processor=processor, num_epochs=2,
        data_loader=torch.utils.data.DataLoader(ddp_data(), batch_size=8, shuffle=True),
        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    )  # fmt: skip
    state = await trainer.fit()
    weights = {k: whole(v) for k, v in trainer.model.state_dict().items()}  # (a collective)
    torch.save(
        {"model": weights, "global_step": state.global_step,
         "graphs": counters["stats"]["unique_graphs"]},
        Path(out, f"rank{rank}.pt"),
    )  # fmt: skip


def split_between_two() -> dict[str, Any]:
    """Two optimizers over ``ddp_model()``'s layers: SGD for the first, Adam for the last."""
    return {
        "first": lambda m: torch.optim.SGD(m[0].parameters(), lr=0.1, momentum=0.9),
        "last": lambda m: torch.optim.Adam(m[2].parameters(), lr=0.01),
    }


async def ddp_two_optimizers_one_loss(rank: int, world_size: int, out: str) -> None:
    """``ddp_train``'s data and model (2 epochs, 8 a rank) with two optimizers on the one
    loss, which the default processor steps in turn. Writes the model's weights."""
    from asynchat import DistributedDataParallelTrainer

    model = ddp_model()
    await DistributedDataParallelTrainer(
        model, torch.utils.data.DataLoader(ddp_data(), batch_size=8, shuffle=True),
        split_between_two(), loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=2,
        device="cpu",
    ).fit()  # fmt: skip
    torch.save({"model": model.state_dict()}, Path(out, f"two-rank{rank}.pt"))


class ScoresItself(torch.nn.Module):
    """``ddp_model()`` behind Hugging Face's contract: ``{"logits", "loss"}`` given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ddp_model()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(features)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


async def ddp_own_loss(rank: int, world_size: int, out: str) -> None:
    """``ddp_train``'s run (every step, 2 epochs) with a model that computes its own loss,
    on dict batches: ``loss_fn=model_loss``. Writes the network's weights."""
    from asynchat import DistributedDataParallelTrainer, model_loss

    features, labels = ddp_data().tensors
    dicts = [{"features": x, "labels": y} for x, y in zip(features, labels, strict=True)]
    model = ScoresItself()
    await DistributedDataParallelTrainer(
        model, torch.utils.data.DataLoader(dicts, batch_size=8, shuffle=True),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        loss_fn=model_loss, num_epochs=2, device="cpu",
    ).fit()  # fmt: skip
    torch.save({"model": model.net.state_dict()}, Path(out, f"own-rank{rank}.pt"))


def sharded_validation(samples: int, batch_size: int, strided: bool = False) -> Any:
    """A Validation (cross-entropy) of this rank's shard of ``ddp_data()``'s first
    ``samples``: a DistributedSampler's, or (``strided``) every world_size-th sample from the
    rank's, the shards then one apart in size where the ranks do not divide ``samples``."""
    from asynchat.callbacks import Validation

    validation = torch.utils.data.TensorDataset(*(t[:samples] for t in ddp_data().tensors))
    if strided:
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        sampler: Any = range(rank, samples, world_size)
    else:
        sampler = torch.utils.data.DistributedSampler(validation, shuffle=False)
    return Validation(
        torch.utils.data.DataLoader(validation, batch_size=batch_size, sampler=sampler),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )


async def validate_shards(
    rank: int, world_size: int, out: str, samples: int = 80, strided: bool = False
) -> None:
    """A DDP trainer validating a shard of ``samples`` (80: 40 samples per rank) in batches
    of 16 (a short last one); each rank saves the val/loss it published and the model it
    validated."""
    trainer = plain_trainer(num_epochs=1, callbacks=[sharded_validation(samples, 16, strided)])
    state = await trainer.fit()
    torch.save(
        {"val/loss": state.metrics["val/loss"], "model": trainer.model.state_dict()},
        Path(out, f"rank{rank}.pt"),
    )


async def plateau_schedule(rank: int, world_size: int, out: str, monitor: str) -> None:
    """A DDP trainer whose ReduceLROnPlateau follows ``monitor``: Validation's val/loss
    (every epoch, on each rank's shard) or LossMonitor's train/mean_loss (each step, of the
    rank's own losses). It never sees an improvement (threshold 10), so each new value
    halves the rate. Saves the rate and the model."""
    from asynchat.callbacks import LossMonitor, LRSchedule

    plateau = LRSchedule(
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, patience=0, factor=0.5, threshold=10.0
        ),
        monitor=monitor,
    )
    trainer = plain_trainer(
        num_epochs=3,
        callbacks=[
            sharded_validation(32, 8),
            LossMonitor(every_n_steps=1),
            plateau,
        ],
    )
    state = await trainer.fit()
    assert state.optimizer is not None
    torch.save(
        {"lr": state.optimizer.param_groups[0]["lr"], "model": trainer.model.state_dict()},
        Path(out, f"rank{rank}.pt"),
    )


async def cancel_rank_zero_at_a_validation(
    rank: int, world_size: int, out: str, control_lag: int = 0
) -> None:
    """Rank 0 alone is cancelled at the step a Validation is due; both must end there (a
    step later with ``control_lag=1``)."""
    from asynchat import Callback, LoopState
    from asynchat.callbacks import Validation

    class CancelRankZero(Callback):
        scope: anyio.CancelScope | None = None

        async def on_step_end(self, state: LoopState) -> None:
            if rank == 0 and state.global_step == 2 and self.scope is not None:
                self.scope.cancel()
                await anyio.lowlevel.checkpoint()  # registered before the thread goes on

    cancel = CancelRankZero()
    trainer = plain_trainer(
        num_epochs=1,
        control_lag=control_lag,
        callbacks=[
            cancel,
            Validation(
                torch.utils.data.DataLoader(ddp_data(), batch_size=16),
                loss_fn=torch.nn.CrossEntropyLoss(), every_n_steps=2, every_n_epochs=None,
            ),
        ],
    )  # fmt: skip
    with anyio.CancelScope() as cancel.scope:
        await trainer.fit()
    state = trainer.state
    Path(out, f"rank{rank}.json").write_text(
        json.dumps([trainer.status.value, state.global_step,
                    state.metrics.measured_at("val/loss"), state.stop_reason])
    )  # fmt: skip


async def loss_monitor_across_a_stop(
    rank: int, world_size: int, out: str, directory: str, stop_at: int, old_format: bool = False
) -> None:
    """LossMonitor(every_n_steps=4) on two ranks, stopped at ``stop_at`` (0: never) and
    resumed from ``directory`` (with ``old_format``, its checkpoint first rewritten as
    before each rank's part was kept: rank 0's state for all); each rank saves its own step
    losses and the mean it published at step 4."""
    from conftest import StopAt

    from asynchat import Callback, LoopState
    from asynchat.callbacks import Checkpoint, LossMonitor

    losses: dict[int, float] = {}  # the last run's
    published: dict[int, float] = {}

    class Record(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            losses.clear()

        def on_step_end(self, state: LoopState) -> None:
            assert state.loss is not None
            losses[state.global_step] = float(state.loss.detach())
            if state.global_step == 4:
                published[4] = state.metrics["train/mean_loss"]

    def run(*extra: Callback, resume: bool = False) -> DistributedDataParallelTrainer:
        return plain_trainer(
            num_steps=4,
            callbacks=[*extra, LossMonitor(every_n_steps=4), Record(), Checkpoint(directory)],
            resume_from=directory if resume else None,
        )

    if stop_at:
        await run(StopAt(stop_at)).fit()
    if old_format and rank == 0:
        as_written_before_rank_parts(Path(directory))
    dist.barrier()
    await run(resume=bool(stop_at)).fit()
    torch.save({"losses": losses, "published": published}, Path(out, f"rank{rank}.pt"))


def as_written_before_rank_parts(directory: Path) -> None:
    """The directory's checkpoint files rewritten without ``ranks``, rank 0's part in their
    place (what a distributed checkpoint held before), and without a manifest."""
    from asynchat._checkpoint_io import serialize

    for file in directory.glob("step-*.ckpt"):
        checkpoint = torch.load(file, weights_only=True)
        rank_zero = checkpoint.pop("ranks")[0]
        checkpoint["callbacks"].update(rank_zero["callbacks"])
        file.write_bytes(serialize(checkpoint)[0])
    (directory / "manifest.json").unlink()


async def seeded_apart_across_a_stop(
    rank: int, world_size: int, out: str, directory: str, stop_at: int
) -> None:
    """A model with dropout trained for one epoch (4 steps) with each rank seeded apart
    (nanoGPT's seed offset), a MetricUpdater and a LossMonitor, stopped at ``stop_at`` (0:
    never) and resumed from ``directory``; each rank saves its weights and metrics."""
    import torchmetrics
    from conftest import StopAt

    from asynchat import Callback, DistributedDataParallelTrainer
    from asynchat.callbacks import Checkpoint, LossMonitor, MetricUpdater

    def run(*extra: Callback, resume: bool = False) -> DistributedDataParallelTrainer:
        model = dropout_model()
        torch.manual_seed(100 + rank)
        accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        callbacks = [*extra, MetricUpdater({"accuracy": accuracy}), LossMonitor(3)]
        return DistributedDataParallelTrainer(
            model, torch.utils.data.DataLoader(ddp_data(), batch_size=8, shuffle=True),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(), device="cpu", num_epochs=1,
            callbacks=[*callbacks, Checkpoint(directory)],
            resume_from=directory if resume else None,
        )  # fmt: skip

    if stop_at:
        await run(StopAt(stop_at)).fit()
    last = run(resume=bool(stop_at))
    await last.fit()
    weights = [p.detach().clone() for p in last.model.parameters()]
    result = {"weights": weights, "metrics": dict(last.state.metrics)}
    torch.save(result, Path(out, f"rank{rank}.pt"))


async def callbacks_unlike(rank: int, world_size: int, directory: str, how: str) -> None:
    """``how="missing"``: rank 0 with a Checkpoint (as one would write ``if rank == 0:
    save``), rank 1 with a GradClip and a Progress (which the check leaves out: it writes on
    rank 0 by itself); ``"schedule"``: a Checkpoint on each, saving every 2 steps on rank 0
    and every 3 on rank 1."""
    from asynchat import Callback
    from asynchat.callbacks import Checkpoint, GradClip, Progress

    callbacks: list[Callback]
    if how == "missing":
        callbacks = [Checkpoint(directory)] if rank == 0 else [GradClip(1.0), Progress()]
    else:
        callbacks = [Checkpoint(directory, every_n_steps=2 + rank)]
    await plain_trainer(num_epochs=1, callbacks=callbacks).fit()


def uneven_samples(rank: int) -> torch.utils.data.TensorDataset:
    """Rank ``rank``'s data for the uneven-data jobs: ``4 + 3 * rank`` batches of 8."""
    g = torch.Generator().manual_seed(100 + rank)
    n = (4 + 3 * rank) * 8
    return torch.utils.data.TensorDataset(
        torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    )


class Stream(torch.utils.data.IterableDataset[Any]):
    """A dataset without a length: its samples one by one."""

    def __init__(self, samples: torch.utils.data.TensorDataset) -> None:
        self.samples = samples

    def __iter__(self) -> Any:
        return iter(self.samples)


class AsyncStream:
    """``batches`` as an async iterable (read on the event loop), without a length."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __aiter__(self) -> Any:
        return self._items()

    async def _items(self) -> Any:
        for batch in self.batches:
            await anyio.lowlevel.checkpoint()
            yield batch


async def uneven_data(rank: int, world_size: int, out: str, kind: str, accumulate: int) -> None:
    """Ranks with 4 and 7 batches an epoch, two epochs: as a list (``kind="list"``, lengths
    known), a DataLoader over an IterableDataset (``"stream"``, no length) or an async
    iterable over that (``"async"``). Writes the steps run each epoch, the weights and the
    warnings to ``out/rank<r>.json``."""
    import warnings

    from asynchat import BasicBatchProcessor, Callback, LoopState

    class Steps(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_epoch_end(self, state: LoopState) -> None:
            self.steps.append(state.step + 1)

    samples = uneven_samples(rank)
    data: Any = torch.utils.data.DataLoader(
        samples if kind == "list" else Stream(samples), batch_size=8
    )
    if kind == "list":
        data = list(data)
    elif kind == "async":
        data = AsyncStream(data)
    steps = Steps()
    trainer = plain_trainer(
        data_loader=data, num_epochs=2, callbacks=[steps], loss_fn=None,
        batch_processor=BasicBatchProcessor(
            torch.nn.CrossEntropyLoss(), grad_accumulation_steps=accumulate
        ),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await trainer.fit()
    result = {
        "steps": steps.steps,
        "global_step": trainer.state.global_step,
        "weights": [p.detach().flatten().tolist() for p in trainer.model.parameters()],
        "warnings": [str(w.message) for w in caught],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


async def fsdp_uneven_validation(
    rank: int, world_size: int, out: str, kind: str, how: str = "inline"
) -> None:
    """An FSDP trainer (8 steps on ``ddp_data()``) validating after its epoch on rank data
    of 2 and 5 batches (``uneven_samples``' first ones): a list (``kind="list"``) or a
    DataLoader over an IterableDataset (``"stream"``); by its Validation (``how="inline"``)
    or by a Predictor over the sharded model once the trainer is done (``"standalone"``).
    Writes the validation loss (the mean of every rank's batches), the batches each rank
    ran, the gathered weights and the warnings to ``out/rank<r>.pt``."""
    import warnings

    from asynchat import Callback, FullyShardedDataParallelTrainer, LoopState, Predictor
    from asynchat.callbacks import Validation

    class Losses(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.spans_ranks: list[bool] = []

        def on_loop_begin(self, state: LoopState) -> None:
            self.spans_ranks.append(state.loop.spans_ranks)

        def on_batch_end(self, state: LoopState) -> None:
            self.losses.append(float(state.loss))

    x, y = uneven_samples(rank).tensors
    samples = torch.utils.data.TensorDataset(x[: (2 + 3 * rank) * 8], y[: (2 + 3 * rank) * 8])
    data: Any = torch.utils.data.DataLoader(samples if kind == "list" else Stream(samples), 8)
    if kind == "list":
        data = list(data)
    ce = torch.nn.CrossEntropyLoss()
    losses = Losses()
    validation = Validation(data, loss_fn=ce, callbacks=[losses])
    trainer = plain_trainer(
        FullyShardedDataParallelTrainer, loss_fn=ce, num_epochs=1,
        callbacks=[validation] if how == "inline" else [],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await trainer.fit()
        if how == "standalone":
            await Predictor(trainer.model, data, loss_fn=ce, callbacks=[losses]).fit()
    total, count = trainer.sum_over_ranks([sum(losses.losses), len(losses.losses)])
    weights = {k: whole(v) for k, v in trainer.model.state_dict().items()}  # collective
    result = {"val/loss": total / count, "published": trainer.state.metrics.get("val/loss"),
              "batches": len(losses.losses), "spans_ranks": losses.spans_ranks,
              "weights": weights,
              "warnings": [str(w.message) for w in caught]}  # fmt: skip
    torch.save(result, Path(out, f"rank{rank}.pt"))


async def sharded_predictor(rank: int, world_size: int, out: str, scenario: str) -> None:
    """A Predictor on each rank over ``ddp_model()`` sharded with ``fully_shard``, 6 batches
    a rank (4 on rank 0, as ``uneven_samples``): rank 1 stops it after its second batch
    (``scenario="stop"``), rank 0 closes its ``stream()`` after 3 batches (``"stream"``:
    every rank has all 6 batches), or only rank 0 gives it a MetricUpdater
    (``"unlike"``). Writes the batches run, the status, the stop reason and the error to
    ``out/rank<r>.json``."""
    import torchmetrics
    from torch.distributed.fsdp import fully_shard

    from asynchat import Callback, LoopState, Predictor
    from asynchat.callbacks import MetricUpdater

    class Batches(Callback):
        def __init__(self) -> None:
            self.count = 0

        def on_batch_end(self, state: LoopState) -> None:
            self.count += 1
            if scenario == "stop" and rank == 1 and state.step == 1:
                state.loop.stop("enough")

    model = ddp_model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    batches = Batches()
    callbacks: list[Callback] = [batches]
    if scenario == "unlike" and rank == 0:
        callbacks.append(MetricUpdater({"mse": torchmetrics.MeanSquaredError()}))
    samples = ddp_data() if scenario == "stream" else uneven_samples(rank)
    data = list(torch.utils.data.DataLoader(samples, batch_size=8))[:6]
    predictor = Predictor(model, data, device="cpu", callbacks=callbacks)
    error = None
    try:
        if scenario == "stream":  # rank 0 reads 3 batches' outputs and closes its stream
            async with contextlib.aclosing(predictor.stream(buffer=1)) as outputs:
                read = 0  # (the batches run, counted on the compute thread, run ahead of
                # the reads and could pass 3 between two of them: the stream then ran on)
                async for _ in outputs:
                    read += 1
                    if rank == 0 and read == 3:
                        break
        else:
            await predictor.fit()
    except ValueError as exc:
        error = str(exc)
    result = {"batches": batches.count, "error": error, "status": predictor.status.value,
              "stop_reason": predictor.state.stop_reason}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


async def batch_sampler_shards(rank: int, world_size: int, out: str, how: str) -> None:
    """Two epochs over ``ddp_data()`` from a DataLoader with a batch_sampler of the user's:
    ``how="distributed"``, a BatchSampler over a shuffled DistributedSampler; ``"plain"``,
    over a SequentialSampler. Writes the first feature of each sample each epoch trained
    on (they tell the samples apart) to ``out/rank<r>.json``."""
    from asynchat import Callback, LoopState

    class Seen(Callback):
        def __init__(self) -> None:
            self.epochs: list[list[float]] = []

        def on_epoch_begin(self, state: LoopState) -> None:
            self.epochs.append([])

        def on_batch_begin(self, state: LoopState) -> None:
            self.epochs[-1].extend(state.batch[0][:, 0].tolist())

    data = ddp_data()
    sampler: Any = (
        torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
        if how == "distributed"
        else torch.utils.data.SequentialSampler(data)
    )
    batches = torch.utils.data.BatchSampler(sampler, batch_size=8, drop_last=False)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches)
    seen = Seen()
    await plain_trainer(data_loader=loader, num_epochs=2, callbacks=[seen]).fit()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen.epochs))


async def settings_unlike(rank: int, world_size: int, how: str) -> None:
    """Rank 1 built with 8 steps where rank 0 has 5 (``how="steps"``), or accumulating over
    2 steps where rank 0 updates every step (``"accumulate"``)."""
    from asynchat import BasicBatchProcessor

    processor = BasicBatchProcessor(
        torch.nn.CrossEntropyLoss(), grad_accumulation_steps=1 + rank * (how == "accumulate")
    )
    steps = 5 + 3 * rank * (how == "steps")
    await plain_trainer(num_steps=steps, loss_fn=None, batch_processor=processor).fit()


async def fsdp_settings_unlike(rank: int, world_size: int) -> None:
    """An FSDP trainer computing in bf16 on rank 1 only."""
    from asynchat import FullyShardedDataParallelTrainer

    trainer = plain_trainer(
        FullyShardedDataParallelTrainer, num_steps=4,
        mixed_precision="bf16" if rank == 1 else None,
    )  # fmt: skip
    await trainer.fit()


class GrowingEpochs:
    """Rank ``rank``'s data with ``3 + epoch + 2 * rank`` batches an epoch, as ``len()`` says
    at each epoch."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.epoch = 0

    def __len__(self) -> int:
        return 3 + self.epoch + 2 * self.rank

    def __iter__(self) -> Any:
        data = torch.utils.data.DataLoader(ddp_data(), batch_size=8)
        batches = [batch for _ in range(2) for batch in data][: len(self)]
        self.epoch += 1
        return iter(batches)


async def growing_epochs(rank: int, world_size: int, out: str) -> None:
    """Two epochs of ``GrowingEpochs``; writes the steps of each and the warnings."""
    import warnings

    from asynchat import Callback, LoopState

    steps: list[int] = []

    class Steps(Callback):
        def on_epoch_end(self, state: LoopState) -> None:
            steps.append(state.step + 1)

    trainer = plain_trainer(data_loader=GrowingEpochs(rank), num_epochs=2, callbacks=[Steps()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await trainer.fit()
    result = {"steps": steps, "warnings": [str(w.message) for w in caught]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


async def checkpoint_per_rank_directory(rank: int, world_size: int, root: str) -> None:
    """A DDP job whose ranks' Checkpoints name a directory each (``root/rank<r>``): only
    rank 0's may be written to. Each ``on_checkpoint`` call appends the step to
    ``root/on_checkpoint.rank<r>``."""
    from asynchat import Callback, LoopState
    from asynchat.callbacks import Checkpoint

    class Files(Callback):
        def on_checkpoint(self, state: LoopState) -> None:
            with Path(root, f"on_checkpoint.rank{rank}").open("a") as file:
                file.write(f"{state.global_step}\n")

    checkpoint = Checkpoint(Path(root, f"rank{rank}"), every_n_steps=1, keep_last=None)
    await plain_trainer(num_epochs=1, callbacks=[Files(), checkpoint]).fit()


async def predict_shard(rank: int, world_size: int, out: str) -> None:
    from asynchat import Callback, LoopState, Predictor

    class Collect(Callback):
        def __init__(self) -> None:
            self.rows: list[torch.Tensor] = []

        def on_batch_end(self, state: LoopState) -> None:
            self.rows.append(state.batch[0])

    dataset = ddp_data()
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
    collect = Collect()
    await Predictor(
        ddp_model(), torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler),
        callbacks=[collect],
    ).fit()  # fmt: skip
    shards: list[torch.Tensor | None] = [None] * world_size
    dist.all_gather_object(shards, torch.cat(collect.rows))
    if rank == 0:
        torch.save(torch.cat([s for s in shards if s is not None]), Path(out, "gathered.pt"))


async def nan_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1's loss turns NaN; TerminateOnNaN must end both ranks (agreed), none hanging."""
    from asynchat.callbacks import TerminateOnNaN

    ce = torch.nn.CrossEntropyLoss()
    calls = 0

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return ce(outputs, targets) * (float("nan") if rank == 1 and calls == 3 else 1.0)

    trainer = plain_trainer(
        loss_fn=loss_fn, num_epochs=50, callbacks=[TerminateOnNaN(check_every_n_steps=2)]
    )
    await trainer.fit()


async def ddp_fault(rank: int, world_size: int, fault: str, out: str = "") -> None:
    """DDP training that goes wrong at global step 5: ``sigkill``, ``abort`` or ``hang`` on rank 1,
    ``hang-all`` on every rank; ``sigkill-slow``: rank 1 is killed and rank 0 takes a second
    to wind down (its on_loop_end) before its error is reported; ``hang-one-hooked``: rank 1
    hangs and only rank 1 has the callback (as with a logger on one rank only); ``sigstop``:
    rank 0 takes 3 s over step 5's end while rank 1, waiting for it in the step's boundary
    agreement, is stopped (SIGSTOP, as by an operator or a debugger), so both ranks have
    reached as many phases. With ``out``, each rank writes its pid there first."""
    import os
    import signal
    import threading
    import time

    from asynchat import Callback, LoopState

    if out:
        write_pid(out, rank)

    class Fault(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step != 5 or (rank != 1 and fault not in ("hang-all", "sigstop")):
                return
            if fault.startswith("sigkill"):
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "abort":
                os.abort()  # a native crash as far as the launcher can tell
            if fault.startswith("hang"):
                time.sleep(3600)  # a hook stuck in Python: no phase is reached any more
            if fault == "sigstop":
                if rank == 0:
                    time.sleep(3.0)
                else:
                    stop = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGSTOP))
                    stop.start()

        def on_loop_end(self, state: LoopState) -> None:
            if fault == "sigkill-slow" and rank == 0:
                time.sleep(1.0)

    alone = fault == "hang-one-hooked" and rank != 1
    trainer = plain_trainer(num_epochs=1_000_000, callbacks=[] if alone else [Fault()])
    await trainer.fit()


async def ddp_control(
    rank: int,
    world_size: int,
    out: str,
    scenario: str,
    control_lag: int = 0,
    streamed: bool = False,
) -> None:
    """Control on one rank of two (the trainer's ``control_lag`` as given): ``pause`` (rank 0
    pauses 1 s after step 3), ``stop-at-step`` (rank 0 stops at step 6, inside the second
    epoch), ``stop-at-epoch-end`` (rank 0 stops during its first on_epoch_end), ``freeze``
    (the first layer frozen by its unwrapped name), ``predictor`` (a Predictor's rank under
    launch). ``streamed``: each rank's half of the data as an IterableDataset (no length)."""
    import threading

    from asynchat import Callback, DistributedDataParallelTrainer, LoopState, Predictor
    from asynchat.callbacks import FreezeModule

    if scenario == "predictor":
        predictor = Predictor(ddp_model(), torch.utils.data.DataLoader(ddp_data(), batch_size=8))
        Path(out, f"rank{rank}.txt").write_text(
            f"{predictor.rank} {predictor.world_size} {predictor.is_rank_zero}"
        )
        return

    class Control(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if scenario == "pause" and rank == 0 and state.global_step == 3:
                state.loop.pause()
                threading.Timer(1.0, state.loop.resume).start()
            if scenario == "stop-at-step" and rank == 0 and state.global_step == 6:
                state.loop.stop("rank 0 had enough")

        def on_epoch_end(self, state: LoopState) -> None:
            if scenario == "stop-at-epoch-end" and rank == 0 and state.epoch == 0:
                state.loop.stop("rank 0 decided at the epoch's end")

    statuses: list[str] = []
    callbacks: list[Callback] = [Control()]
    if scenario == "freeze":
        callbacks.append(FreezeModule(["0"]))
    samples = ddp_data()
    if streamed:  # the rank's half, as a DistributedSampler without shuffling gives it
        samples = torch.utils.data.TensorDataset(*(t[rank::world_size] for t in samples.tensors))
    loader = torch.utils.data.DataLoader(Stream(samples) if streamed else samples, batch_size=8)
    trainer = DistributedDataParallelTrainer(
        ddp_model(), loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=3, device="cpu", callbacks=callbacks,
        find_unused_parameters=scenario == "freeze", control_lag=control_lag,
    )  # fmt: skip
    started = trainer.snapshot()
    assert started.status.value == "created"

    async def watch() -> None:
        async for event in trainer.events(progress_every=None):
            statuses.append(event.snapshot.status.value)

    import anyio

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        state = await trainer.fit()
    torch.save(
        {"model": trainer.model.state_dict(), "global_step": state.global_step,
         "stop_reason": state.stop_reason, "statuses": statuses},
        Path(out, f"rank{rank}.pt"),
    )  # fmt: skip


class Augmented(torch.utils.data.TensorDataset):
    """Samples with noise from torch's global generator, drawn as each is read (a random
    augmentation in the main process)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(index)
        return x + 0.1 * torch.rand(x.shape), y


async def augmented_stop_resume(
    rank: int, world_size: int, out: str, phase: str, workers: int = 0
) -> None:
    """Two epochs of a model with dropout over :class:`Augmented` samples, shuffled, read on
    the compute thread (or by ``workers`` DataLoader workers): ``straight``; ``stopped``
    (rank 0 stops at global step 2, and the final checkpoint goes to ``out/../checkpoints``);
    ``resumed`` from it. Writes the weights to ``out/rank<r>.pt``."""
    from asynchat import Callback, DistributedDataParallelTrainer, LoopState
    from asynchat.callbacks import Checkpoint

    class StopOnRankZero(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if phase == "stopped" and rank == 0 and state.global_step == 2:
                state.loop.stop("rank 0 had enough")

    torch.manual_seed(0)
    checkpoints = Path(out).parent / "checkpoints"
    trainer = DistributedDataParallelTrainer(
        dropout_model(),
        torch.utils.data.DataLoader(
            Augmented(*ddp_data().tensors), batch_size=8, shuffle=True, num_workers=workers
        ),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
        num_epochs=2, device="cpu",
        callbacks=[StopOnRankZero()] + ([Checkpoint(checkpoints)] if phase != "straight" else []),
        resume_from=checkpoints if phase == "resumed" else None,
    )  # fmt: skip
    state = await trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "global_step": state.global_step},
               Path(out, f"rank{rank}.pt"))  # fmt: skip


async def uneven_augmented_cancel_resume(rank: int, world_size: int, out: str, phase: str) -> None:
    """Two epochs over :class:`Augmented` samples, rank 1's data a batch longer than rank
    0's (the ranks agree on 4 steps an epoch; rank 1 leaves its fifth batch): ``straight``;
    ``cancelled`` (rank 0's ``fit()`` cancelled at global step 4, the first epoch's last,
    whose end then does not run; the final checkpoint goes to ``out/../checkpoints``);
    ``resumed`` from it. Writes the weights to ``out/rank<r>.pt``."""
    from conftest import CancelAt

    from asynchat import DistributedDataParallelTrainer
    from asynchat.callbacks import Checkpoint

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(rank)
    samples = 32 + 8 * rank
    data = Augmented(
        torch.randn(samples, 8, generator=g), torch.randint(0, 3, (samples,), generator=g)
    )
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=rank)
    checkpoints = Path(out).parent / "checkpoints"
    cancel = CancelAt(4)
    callbacks: list[Any] = [cancel] if phase == "cancelled" and rank == 0 else []
    trainer = DistributedDataParallelTrainer(
        dropout_model(), torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
        num_epochs=2, device="cpu",
        callbacks=callbacks + ([Checkpoint(checkpoints)] if phase != "straight" else []),
        resume_from=checkpoints if phase == "resumed" else None,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(?s).*different numbers of batches")
        with anyio.CancelScope() as cancel.scope:
            await trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "global_step": trainer.state.global_step},
               Path(out, f"rank{rank}.pt"))  # fmt: skip


async def agreements_a_step(rank: int, world_size: int, out: str) -> None:
    """The all-reduces (the ranks' agreements: DDP's own gradient all-reduce is not one of
    ``torch.distributed.all_reduce``'s calls) of DDP trainers over 4 and 10 batches a rank,
    for each data kind (``list``: known lengths, ``stream``: no ``len()``) and control lag.
    Writes ``{"<kind>-<lag>": [calls with 4 batches, calls with 10]}`` to ``out/rank<r>.json``."""
    import torch.distributed as dist

    from asynchat import DistributedDataParallelTrainer

    calls = 0
    all_reduce = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted  # type: ignore[assignment]
    counts: dict[str, list[int]] = {}
    for kind in ("list", "stream"):
        for lag in (0, 1):
            for batches in (4, 10):
                samples = torch.utils.data.TensorDataset(
                    torch.randn(8 * batches, 8), torch.randint(0, 3, (8 * batches,))
                )
                data: Any = torch.utils.data.DataLoader(Stream(samples), batch_size=8)
                if kind == "list":
                    data = list(torch.utils.data.DataLoader(samples, batch_size=8))
                trainer = DistributedDataParallelTrainer(
                    ddp_model(), data, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                    loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=1, device="cpu",
                    control_lag=lag,
                )  # fmt: skip
                before = calls
                await trainer.fit()
                counts.setdefault(f"{kind}-{lag}", []).append(calls - before)
    Path(out, f"rank{rank}.json").write_text(json.dumps(counts))


async def asked_saves(rank: int, world_size: int, out: str, how: str, lag: int) -> None:
    """A DDP trainer (8 steps) with two Checkpoints that save only when asked, the second in
    ``out/checkpoints``: ``"request"``, by its ``request_save()`` on rank 1 alone at the end
    of global step 2; ``"clock"``, by rank 0's clock (``every_n_seconds=0.1``, steps of 30
    ms); over batches with a length (``"request"``, ``"clock"``) or without
    (``"request-stream"``); ``"request-fsdp"``: a FullyShardedDataParallelTrainer, whose
    ranks each write their shards; ``"both..."``: every rank asks, at the same step. Writes
    the global steps at which this rank's Checkpoints saved (``{"first": [...], "second":
    [...]}``) and what its ask's future gave (``"served"``: the path, ``None``, or
    ``"not asked"``) to ``out/rank<r>.json``."""
    from asynchat import (
        Callback,
        DistributedDataParallelTrainer,
        FullyShardedDataParallelTrainer,
        LoopState,
    )
    from asynchat.callbacks import Checkpoint

    class Saves(Checkpoint):
        def save(self, state: LoopState) -> None:
            self.saved.append(state.global_step)
            super().save(state)

    timed = how == "clock"
    first, second = (
        Saves(Path(out, name), every_n_epochs=1000, keep_last=None, save_on_end=False,
              every_n_seconds=0.1 if timed and name == "checkpoints" else None)
        for name in ("other", "checkpoints")
    )  # fmt: skip
    first.saved, second.saved = [], []

    asked: list[Any] = []

    class Ask(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if timed:
                time.sleep(0.03)
            elif (rank == 1 or how.startswith("both")) and state.global_step == 2:
                asked.append(second.request_save())

    g = torch.Generator().manual_seed(rank)
    samples = torch.utils.data.TensorDataset(
        torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    )
    data: Any = list(torch.utils.data.DataLoader(samples, batch_size=8))
    if how.endswith("-stream"):
        data = torch.utils.data.DataLoader(Stream(samples), batch_size=8)
    fsdp = how.endswith("-fsdp")
    trainer = (FullyShardedDataParallelTrainer if fsdp else DistributedDataParallelTrainer)(
        ddp_model(), data, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=1, device="cpu",
        callbacks=[Ask(), first, second], control_lag=lag,
    )  # fmt: skip
    await trainer.fit()
    served = [str(path) if path else path for path in (f.result(timeout=0) for f in asked)]
    saved = {"first": first.saved, "second": second.saved, "served": served or "not asked"}
    Path(out, f"rank{rank}.json").write_text(json.dumps(saved))


async def profiled(rank: int, world_size: int, out: str) -> None:
    """A DDP trainer of 6 steps with a Profiler on every rank, writing into ``out``."""
    from asynchat.callbacks import Profiler

    trainer = plain_trainer(num_steps=6, callbacks=[Profiler(out, wait=1, warmup=1, active=2)])
    await trainer.fit()
    Path(out, f"run_id{rank}").write_text(trainer.run_id)


async def fails_as_it_begins(rank: int, world_size: int, out: str) -> None:
    """A DDP trainer whose first callback fails in ``on_loop_begin``, before its
    Checkpoint's ``on_loop_begin`` has run (its ``on_loop_end`` runs all the same)."""
    from asynchat import Callback, LoopState
    from asynchat.callbacks import Checkpoint

    class Fails(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            raise RuntimeError("the first callback failed as the run began")

    checkpoint = Checkpoint(Path(out, "checkpoints"), every_n_steps=2)
    await plain_trainer(num_steps=4, callbacks=[Fails(), checkpoint]).fit()


async def ddp_multibatch(rank: int, world_size: int, out: str, mode: str = "multi") -> None:
    """Whether each backward all-reduced under DDP, seen in the gradients: right after a
    backward that must not (``no_sync``), the ranks' gradients differ (each saw its own data);
    at ``on_before_update`` (after the update's last backward) they are equal. ``multi``: a
    MultiBatchProcessor of two sub-batches per step; ``accumulate``: a BasicBatchProcessor
    accumulating over two steps."""
    from asynchat import (
        BasicBatchProcessor,
        Callback,
        DistributedDataParallelTrainer,
        LoopState,
        MultiBatchProcessor,
    )

    def equal_on_all_ranks(model: torch.nn.Module) -> bool:
        flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)  # every rank calls this at the same point
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

    seen: list[str] = []

    class Look(Callback):
        def on_batch_end(self, state: LoopState) -> None:
            first_of_update = state.batch_idx == 0 if mode == "multi" else state.step % 2 == 0
            if first_of_update:  # a backward that must not have all-reduced
                seen.append("synced" if equal_on_all_ranks(state.model) else "local")

        def on_before_update(self, state: LoopState) -> None:
            seen.append("update " + ("synced" if equal_on_all_ranks(state.model) else "local"))

    g = torch.Generator().manual_seed(rank)  # each rank its own data: local grads differ
    pairs = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
             for _ in range(8)]  # fmt: skip
    items: list[Any] = [(pairs[i], pairs[i + 1]) for i in range(0, 8, 2)]
    processor: BasicBatchProcessor = MultiBatchProcessor(torch.nn.CrossEntropyLoss())
    if mode == "accumulate":
        items = pairs  # 8 steps of one batch, an update every 2
        processor = BasicBatchProcessor(torch.nn.CrossEntropyLoss(), grad_accumulation_steps=2)
    trainer = DistributedDataParallelTrainer(
        ddp_model(), items, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        batch_processor=processor, num_epochs=1, device="cpu", callbacks=[Look()],
    )  # fmt: skip
    await trainer.fit()
    Path(out, f"rank{rank}.txt").write_text(" ".join(seen))


async def fsdp_train(rank: int, world_size: int, out: str, accumulate: int) -> None:
    """FSDP2 over 2 ranks, batches of 16 per rank (of 8 with accumulate=2), 16 updates;
    rank 0 saves the full (gathered) weights and the shard sizes it held."""
    from asynchat import BasicBatchProcessor, Callback, FullyShardedDataParallelTrainer, LoopState

    shards: list[int] = []

    class LookAtShards(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            shards.extend(p.to_local().numel() for p in state.model.parameters())

    loader = torch.utils.data.DataLoader(ddp_data(), batch_size=16 // accumulate)
    trainer = FullyShardedDataParallelTrainer(
        ddp_model(), loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        batch_processor=BasicBatchProcessor(
            torch.nn.CrossEntropyLoss(), grad_accumulation_steps=accumulate
        ),
        num_steps=16 * accumulate, device="cpu", callbacks=[LookAtShards()],
    )  # fmt: skip
    state = await trainer.fit()
    full = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}  # collective
    if rank == 0:
        torch.save({"model": full, "shards": shards, "global_step": state.global_step},
                   Path(out, "fsdp.pt"))  # fmt: skip


async def fsdp_shard_forgets_return(rank: int, world_size: int) -> None:
    """A ``shard`` policy that builds its list and does not return it (None)."""
    from asynchat import FullyShardedDataParallelTrainer

    def blocks(model: torch.nn.Module) -> Any:
        [m for m in model.children() if isinstance(m, torch.nn.Linear)]

    await plain_trainer(FullyShardedDataParallelTrainer, shard=blocks, num_steps=1).fit()


async def ddp_two_optimizers(rank: int, world_size: int, out: str) -> None:
    """A DDP trainer with two named optimizers and a step that updates each: saves each
    rank's weights and the update order it saw."""
    import torch.nn.functional as F

    from asynchat import (
        BatchProcessor,
        Callback,
        DistributedDataParallelTrainer,
        LoopState,
        Phase,
        RunPhase,
    )

    class TwoParts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    class TwoUpdates(BatchProcessor):
        def step(self, state: LoopState, run_phase: RunPhase) -> None:
            x, y = state.batch
            run_phase(Phase.ON_BATCH_BEGIN)
            with self.no_sync(state):
                loss = F.cross_entropy(state.model(x), y)
            self.backward(state, loss)
            self.update(state, run_phase, "a")
            self.update(state, run_phase, "b")
            state.loss = loss.detach()
            run_phase(Phase.ON_BATCH_END)

    seen: list[str] = []

    class See(Callback):
        def on_before_update(self, state: LoopState) -> None:
            seen.append(state.optimizer_name or "")

    trainer = DistributedDataParallelTrainer(
        TwoParts(), torch.utils.data.DataLoader(ddp_data(), batch_size=8),
        {"a": lambda m: torch.optim.SGD(m.a.parameters(), lr=0.1),
         "b": lambda m: torch.optim.Adam(m.b.parameters(), lr=0.01)},
        batch_processor=TwoUpdates(), num_steps=4, device="cpu", callbacks=[See()],
    )  # fmt: skip
    await trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "seen": seen}, Path(out, f"rank{rank}.pt"))


async def ddp_two_models(rank: int, world_size: int, out: str) -> None:
    """A GAN-shaped step over a mapping of two models, each wrapped in its own DDP: the
    discriminator runs twice before its backward, the generator's loss goes through it.
    The noise comes from the batch, so one process with the global batch can replay it."""
    from asynchat import DistributedDataParallelTrainer

    trainer = DistributedDataParallelTrainer(
        gan_models(), torch.utils.data.DataLoader(ddp_data(), batch_size=8), gan_optimizers(),
        batch_processor=gan_step(), num_steps=4, device="cpu",
    )  # fmt: skip
    await trainer.fit()
    assert isinstance(trainer.state.model.generator, torch.nn.parallel.DistributedDataParallel)
    torch.save({"model": trainer.model.state_dict()}, Path(out, f"rank{rank}.pt"))


def gan_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"generator": torch.nn.Linear(4, 8), "discriminator": torch.nn.Linear(8, 1)}


def gan_optimizers() -> dict[str, Any]:
    return {
        "d": lambda m: torch.optim.SGD(m.discriminator.parameters(), lr=0.1),
        "g": lambda m: torch.optim.SGD(m.generator.parameters(), lr=0.1),
    }


def gan_reference() -> dict[str, torch.Tensor]:
    """The GAN-shaped step in one process on the global batch: each step's two shards
    together, as DistributedSampler without shuffling deals them (rank r takes entries r,
    r + 2, ...; a step of 8 per rank covers 16 consecutive entries)."""
    from asynchat import Trainer

    inputs, targets = ddp_data().tensors
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]
    one = Trainer(gan_models(), batches, gan_optimizers(), batch_processor=gan_step(),
                  num_steps=4, device="cpu")  # fmt: skip
    anyio.run(one.fit)
    return one.model.state_dict()


def gan_step() -> Any:
    import torch.nn.functional as F

    from asynchat import BatchProcessor, LoopState, Phase, RunPhase

    class GanStep(BatchProcessor):
        def step(self, state: LoopState, run_phase: RunPhase) -> None:
            real, _ = state.batch
            gan: Any = state.model
            run_phase(Phase.ON_BATCH_BEGIN)
            noise = real[:, :4] * 0.5  # from the batch: the same on one process and on two
            state.optimizers["d"].zero_grad(set_to_none=True)
            fake = gan.generator(noise)
            loss_d = (F.softplus(-gan.discriminator(real)).mean()
                      + F.softplus(gan.discriminator(fake.detach())).mean())  # fmt: skip
            self.backward(state, loss_d)
            self.update(state, run_phase, "d")
            loss_g = F.softplus(-gan.discriminator(fake)).mean()
            self.backward(state, loss_g)
            self.update(state, run_phase, "g")
            state.losses = {"d": loss_d.detach(), "g": loss_g.detach()}
            run_phase(Phase.ON_BATCH_END)

    return GanStep()


async def fsdp_two_models(rank: int, world_size: int, out: str) -> None:
    """The GAN-shaped step over a mapping of two models, each sharded as its own root."""
    from asynchat import FullyShardedDataParallelTrainer

    trainer = FullyShardedDataParallelTrainer(
        gan_models(), torch.utils.data.DataLoader(ddp_data(), batch_size=8), gan_optimizers(),
        batch_processor=gan_step(), num_steps=4, device="cpu",
    )  # fmt: skip
    await trainer.fit()
    full = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}  # collective
    if rank == 0:
        torch.save({"model": full}, Path(out, "fsdp_gan.pt"))


def shuffled_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(
        torch.randn(320, 8, generator=g), torch.randint(0, 3, (320,), generator=g)
    )


async def fsdp_checkpointed(
    rank: int,
    world_size: int,
    out: str,
    checkpoints: str,
    stop_at: int,
    resume: bool,
    batch: int = 0,
) -> None:
    """FSDP2 with Adam on shuffled data (320 samples: 10 steps an epoch on 2 ranks x 16 or
    1 x 32), to 16 updates, with an EMA of the (sharded) weights; checkpoints every 4 steps
    and at a stop; a resumed run starts from the newest in ``checkpoints``. Rank 0 saves the
    gathered weights and average to ``out``, and every rank the samples (their first
    feature) it trained on in each epoch."""
    from conftest import StopAt

    from asynchat import Callback, FullyShardedDataParallelTrainer, LoopState
    from asynchat.callbacks import Checkpoint, ExponentialMovingAverage, resumable

    seen: list[tuple[int, float]] = []

    class Seen(Callback):
        def on_step_end(self, state: LoopState) -> None:
            seen.extend((state.epoch, x) for x in state.batch[0][:, 0].tolist())

    loader = torch.utils.data.DataLoader(
        shuffled_data(), batch_size=batch or 32 // world_size, shuffle=True
    )
    trainer = FullyShardedDataParallelTrainer(
        ddp_model(), loader, lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
        loss_fn=torch.nn.CrossEntropyLoss(), num_steps=16, device="cpu",
        callbacks=[Checkpoint(checkpoints, every_n_steps=4, keep_last=2), StopAt(stop_at),
                   Seen(), ema := ExponentialMovingAverage(0.9)],
        resume_from=resumable(checkpoints) if resume else None,
    )  # fmt: skip
    state = await trainer.fit()
    full = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}  # collective
    average = [t.full_tensor() for t in ema.shadow]
    torch.save(seen, f"{out}.seen{rank}")
    if rank == 0:
        torch.save({"model": full, "ema": average, "global_step": state.global_step}, out)


async def until_signalled(
    rank: int,
    world_size: int,
    directory: str,
    handle: bool,
    saves_on_usr1: bool = False,
    idle: bool = False,
) -> None:
    """A DDP job that trains until a signal ends it, checkpointing only at its end (each
    rank writes its pid first, and at the end why it stopped to ``stop_reason.<rank>``;
    rank 0 prints each step, and writes it to ``step``). ``handle``: under
    ``stop_on_signals``, whose stop is graceful on SIGTERM too. ``saves_on_usr1``: each
    rank asks for a save on SIGUSR1 (a scheduler's warning before it preempts the job),
    and rank 0 prints ``saved <path>`` once the save it asked for is written. ``idle``: the
    data is a stream that gives 6 batches and then waits for more, forever."""

    from asynchat import Callback, LoopState, stop_on_signals
    from asynchat.callbacks import Checkpoint

    class Announce(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if rank == 0:
                with contextlib.suppress(OSError):  # (a terminal that was closed: EIO)
                    print(f"step {state.global_step}", flush=True)
                Path(directory, "step").write_text(str(state.global_step))
            time.sleep(0.02)

    write_pid(directory, rank)
    checkpoint = Checkpoint(Path(directory, "checkpoints"), every_n_steps=10**6)
    trainer = plain_trainer(num_epochs=10_000, callbacks=[Announce(), checkpoint])
    if idle:
        batches = list(torch.utils.data.DataLoader(ddp_data(), batch_size=8))[:6]

        async def stream() -> Any:
            for batch in batches:
                yield batch
            await anyio.sleep_forever()

        trainer = plain_trainer(data_loader=stream(), num_epochs=1, callbacks=trainer.callbacks)
    if saves_on_usr1:
        import signal

        def save(future: Any) -> None:
            if rank == 0:
                print(f"saved {future.result()}", flush=True)

        signal.signal(signal.SIGUSR1, lambda *_: checkpoint.request_save().add_done_callback(save))
    if handle:
        async with stop_on_signals(trainer):
            await trainer.fit()
    else:
        await trainer.fit()
    Path(directory, f"stop_reason.{rank}").write_text(str(trainer.state.stop_reason))


async def ignoring_ctrl_c(rank: int, world_size: int, directory: str) -> None:
    """A rank that ignores SIGINT (as one stuck in a collective does not answer it) and
    waits forever, having written its pid."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    write_pid(directory, rank)
    await anyio.sleep_forever()


async def two_trainers(rank: int, world_size: int, out: str, how: str) -> None:
    """Two DDP trainers in this rank's process: started together in a task group
    (``how="together"``), or the second from an ``async def`` hook of the first at its first
    epoch's end (``"nested"``, when the first waits for it). Saves both models."""
    import anyio

    from asynchat import Callback, LoopState

    second = plain_trainer(num_epochs=2)

    class RunSecond(Callback):
        async def on_epoch_end(self, state: LoopState) -> None:
            if state.epoch == 0:
                await second.fit()

    first = plain_trainer(num_epochs=2, callbacks=[RunSecond()] if how == "nested" else [])
    async with anyio.create_task_group() as group:
        group.start_soon(first.fit)
        if how == "together":
            group.start_soon(second.fit)
    torch.save(
        {"first": first.model.state_dict(), "second": second.model.state_dict()},
        Path(out, f"rank{rank}.pt"),
    )


async def fsdp_jobs_one_by_one(rank: int, world_size: int, root: str, how: str) -> None:
    """FSDP trainers (8 steps, a checkpoint every 2) in this rank's process: 4 one after
    another, each followed by a Predictor over its model (``how="sequence"``), with the
    process's open file descriptors counted after each; or a second started from an
    ``async def`` hook of the first at its step 4 (``"nested"``: both save while the
    other's writes are in flight, each file's fsync slowed down). Writes the counts and
    each trainer's gathered weights to ``root/rank<r>.pt``; the checkpoints go to
    ``root/<i>``."""
    from asynchat import Callback, FullyShardedDataParallelTrainer, LoopState, Predictor
    from asynchat.callbacks import Checkpoint

    def trainer(index: int, *callbacks: Callback) -> FullyShardedDataParallelTrainer:
        return plain_trainer(
            FullyShardedDataParallelTrainer, num_steps=8,
            callbacks=[Checkpoint(Path(root, str(index)), every_n_steps=2), *callbacks],
        )  # fmt: skip

    descriptors: list[int] = []
    trainers: list[FullyShardedDataParallelTrainer] = []
    if how == "sequence":
        for index in range(4):
            trainers.append(trainer(index))
            await trainers[-1].fit()
            data = torch.utils.data.DataLoader(ddp_data(), batch_size=8)
            await Predictor(trainers[-1].model, data, device="cpu").fit()
            descriptors.append(len(os.listdir("/proc/self/fd")))
    else:
        # Every file DCP writes syncs slowly: the outer's write is still going when the
        # inner saves.
        fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(0.2)
            fsync(fd)

        os.fsync = slow_fsync
        inner = trainer(1)

        class RunInner(Callback):
            async def on_step_end(self, state: LoopState) -> None:
                if state.global_step == 4:
                    await inner.fit()

        trainers = [trainer(0, RunInner()), inner]
        await trainers[0].fit()
    weights = [{k: whole(v) for k, v in t.model.state_dict().items()} for t in trainers]
    torch.save({"descriptors": descriptors, "weights": weights}, Path(root, f"rank{rank}.pt"))


async def fsdp_save_on_a_full_disk(
    rank: int, world_size: int, checkpoints: str, where: str
) -> None:
    """FSDP2 saving every 2 steps where one rank may write no file past 64 KiB (its
    process's RLIMIT_FSIZE: a write past it fails with EFBIG, as one on a full disk fails
    with ENOSPC): rank 1, whose shard of the first checkpoint is some 300 KiB
    (``where="shard"``), or rank 0, whose asynchat.pt holds a callback's 400 KiB tensor
    (``"extras"``)."""
    import resource
    import signal

    from asynchat import Callback, FullyShardedDataParallelTrainer
    from asynchat.callbacks import Checkpoint

    class Holding(Callback):
        def state_dict(self) -> dict[str, Any]:
            return {"table": torch.zeros(100_000)}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 3),
    ) if where == "shard" else ddp_model()  # fmt: skip
    trainer = FullyShardedDataParallelTrainer(
        model, torch.utils.data.DataLoader(ddp_data(), batch_size=8),
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
        loss_fn=torch.nn.CrossEntropyLoss(), num_steps=4, device="cpu",
        callbacks=[Holding(), Checkpoint(checkpoints, every_n_steps=2, keep_last=None)],
    )  # fmt: skip
    if rank == (1 if where == "shard" else 0):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the write kills the process)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    await trainer.fit()


async def fsdp_directory_taken(
    rank: int, world_size: int, checkpoints: str, first_written: bool
) -> None:
    """FSDP2 saving every step; at step 2's end, before its save, another writer (a second
    open file of this process, which flock tells apart) takes the directory's lock file on
    rank 0: once step 1's checkpoint is listed, or with ``first_written`` False at once
    (step 1's write may still be in flight)."""
    import fcntl
    import os

    from conftest import wait_until_listed

    from asynchat import Callback, FullyShardedDataParallelTrainer, LoopState
    from asynchat.callbacks import Checkpoint

    class TakeLock(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 2 and rank == 0:
                if first_written:
                    wait_until_listed(Path(checkpoints), 1)
                lock = Path(checkpoints, ".asynchat.lock")
                lock.unlink()
                self.fd = os.open(lock, os.O_RDWR | os.O_CREAT)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                os.write(self.fd, b"pid 1 on the other writer")

    trainer = plain_trainer(
        FullyShardedDataParallelTrainer, num_steps=4,
        optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
        callbacks=[TakeLock(), Checkpoint(checkpoints, every_n_steps=1, keep_last=None)],
    )  # fmt: skip
    await trainer.fit()


async def split_callback_shards(rank: int, world_size: int, out: str) -> None:
    """What a sharded checkpoint makes of DTensors in a callback's state: a placeholder in
    ``asynchat.pt`` and the tensor by name for the shards; a Partial one is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from asynchat._dcp import split_sharded
    from asynchat._errors import CheckpointError

    mesh = init_device_mesh("cpu", (world_size,))
    sharded = distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)])
    plain, shards = split_sharded({"Kept": {"average": [sharded, 3], "updates": 5}})
    partial = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    try:
        split_sharded({"Summed": (partial,)})
        refused = ""
    except CheckpointError as exc:
        refused = str(exc)
    if rank == 0:
        torch.save({"plain": plain, "names": sorted(shards), "refused": refused}, out)


async def validated_on_the_average(rank: int, world_size: int, kind: str, out: str) -> None:
    """Two epochs with an EMA, validated on the average each epoch, under DDP or FSDP;
    rank 0 saves the metrics, the final (gathered) weights and the average."""
    import torchmetrics
    from conftest import make_loader

    from asynchat import DistributedDataParallelTrainer, FullyShardedDataParallelTrainer
    from asynchat.callbacks import ExponentialMovingAverage, Validation

    kinds = {"ddp": DistributedDataParallelTrainer, "fsdp": FullyShardedDataParallelTrainer}
    accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
    trainer = kinds[kind](
        ddp_model(), make_loader(96, 16, shuffle=True),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
        num_epochs=2, device="cpu",
        callbacks=[
            ema := ExponentialMovingAverage(0.5),
            Validation(make_loader(48, 16, seed=1), loss_fn=torch.nn.CrossEntropyLoss(),
                       metrics={"accuracy": accuracy}, use_ema=True),
        ],
    )  # fmt: skip
    state = await trainer.fit()

    weights = {k: whole(v) for k, v in trainer.model.state_dict().items()}  # a collective
    average = [whole(t) for t in ema.shadow]
    if rank == 0:
        torch.save({"metrics": dict(state.metrics), "weights": weights, "ema": average}, out)


async def frozen_without_unused_parameters(rank: int, world_size: int) -> None:
    """DDP with the first layer frozen but without find_unused_parameters (refused)."""
    from asynchat.callbacks import FreezeModule

    await plain_trainer(num_steps=2, callbacks=[FreezeModule(["0"])]).fit()


async def report_start(rank: int, world_size: int, out: str, names: list[str]) -> None:
    """How this rank started: its parent (the launcher, or the fork server, which then has
    torch loaded and ignores SIGTERM and SIGHUP), its own handling of those, the
    environment variables ``names``, its intra-op thread count, umask, CPU affinity,
    open-file limit, torch's seed and time zone, and whether DDP's DTensor and what its first
    optimizer imports were imported before it started (by the server), and how many objects
    it holds frozen (the server's, out of the garbage collector's sight)."""
    parent = os.getppid()
    maps = Path(f"/proc/{parent}/maps").read_text()
    report = {
        "parent": parent,
        "parent_has_torch": "libtorch" in maps,
        "parent_ignores_sigterm": ignores(parent, signal.SIGTERM),
        "parent_ignores_sighup": ignores(parent, signal.SIGHUP),
        "sigterm": str(signal.getsignal(signal.SIGTERM)),
        "sighup": str(signal.getsignal(signal.SIGHUP)),
        "env": {name: os.environ.get(name) for name in names},
        "threads": torch.get_num_threads(),
        "umask": os.umask(0o022),  # (set back below)
        "affinity": sorted(os.sched_getaffinity(0)),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "torch_seed": torch.initial_seed(),
        "tzname": time.tzname[0],
        "dtensor_loaded": "torch.distributed.tensor" in sys.modules,
        "dynamo_loaded": "torch._dynamo" in sys.modules,
        "frozen": gc.get_freeze_count(),
    }
    os.umask(report["umask"])
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores signal ``signum`` (its ``SigIgn`` mask)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored >> (signum - 1) & 1)


def report_sigterm(out: str) -> None:
    """Write whether this process's parent, and this process, ignore SIGTERM."""
    mine = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    Path(out).write_text(f"{ignores(os.getppid(), signal.SIGTERM)} {mine}")


async def say(rank: int, world_size: int, word: str) -> None:
    """Print ``word`` on stdout and on stderr."""
    print(f"rank {rank} says {word} on stdout", flush=True)
    print(f"rank {rank} says {word} on stderr", file=sys.stderr, flush=True)


async def device_report(rank: int, world_size: int, out: str) -> None:
    """Train the usual DDP job for a few steps on this rank's default device (its CUDA
    device where there is one) and write how it went: the backend, the parameters' device,
    the final loss, this process's parent and whether that parent had loaded the CUDA
    driver (a fork server that had would leave its forked ranks unable to use CUDA)."""
    parent = os.getppid()
    trainer = plain_trainer(num_steps=5, device=None)
    state = await trainer.fit()
    report = {
        "backend": dist.get_backend(),
        "device": str(next(trainer.model.parameters()).device),
        "loss": None if state.loss is None else state.loss.item(),
        "parent": parent,
        "parent_has_libcuda": "libcuda.so" in Path(f"/proc/{parent}/maps").read_text(),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


async def held_past_hang_timeout(
    rank: int, world_size: int, out: str, distributed: bool, held_s: float
) -> None:
    """Rank 0 pauses its loop after step 3 for ``held_s`` seconds, then resumes; the ranks
    write their final global step. ``distributed``: a DDP trainer (every rank holds, polling
    its peers); else a plain Trainer of the rank's own (the rank alone holds)."""
    import threading

    from asynchat import Callback, LoopState, Trainer

    class HoldOnce(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if rank == 0 and state.global_step == 3:
                state.loop.pause()
                threading.Timer(held_s, state.loop.resume).start()

    if distributed:
        trainer: Trainer = plain_trainer(num_epochs=2, callbacks=[HoldOnce()])
    else:
        trainer = plain_trainer(Trainer, num_epochs=2, callbacks=[HoldOnce()])
    state = await trainer.fit()
    Path(out, f"rank{rank}.txt").write_text(str(state.global_step))


class Replays:
    """Numbered batches read anew each epoch, without a length (a re-iterable stream)."""

    def __init__(self, batches: list[Any], taken: list[int]) -> None:
        self.batches, self.taken = batches, taken

    def __iter__(self) -> Any:
        for number, batch in enumerate(self.batches):
            self.taken.append(number)
            yield batch


async def stream_stopped(
    rank: int, world_size: int, out: str, kind: str, accumulate: int, lag: int
) -> None:
    """Ranks over numbered batches without a length, rank 0 stopping the trainer as global
    step 3 ends: each rank a generator (``kind="sync"``), an async generator (``"async"``),
    rank 1 a re-iterable instead (``"mixed"``), or rank 0's generator 4 batches long
    (``"short"``). Writes the numbers each rank took from its data and those it trained,
    the steps, the weights and the warnings to ``out/rank<r>.json``."""
    import warnings

    from asynchat import BasicBatchProcessor, Callback, LoopState

    taken: list[int] = []
    trained: list[int] = []
    count = 4 if kind == "short" and rank == 0 else 20
    g = torch.Generator().manual_seed(rank)
    batches = [
        (torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(count)
    ]

    def numbered() -> Any:
        for number, batch in enumerate(batches):
            taken.append(number)
            yield batch

    async def numbered_async() -> Any:
        for batch in numbered():
            await anyio.lowlevel.checkpoint()
            yield batch

    data: Any = numbered()
    if kind == "async":
        data = numbered_async()
    elif kind == "mixed" and rank == 1:
        data = Replays(batches, taken)

    class Record(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            inputs = state.batch[0]
            trained.append(next(n for n, (x, _) in enumerate(batches) if x.equal(inputs)))

        def on_step_end(self, state: LoopState) -> None:
            if rank == 0 and state.global_step == 3:
                state.loop.stop("rank 0 had enough")

    trainer = plain_trainer(
        data_loader=data, num_epochs=1, callbacks=[Record()], loss_fn=None, control_lag=lag,
        batch_processor=BasicBatchProcessor(
            torch.nn.CrossEntropyLoss(), grad_accumulation_steps=accumulate
        ),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = await trainer.fit()
    result = {
        "taken": taken, "trained": trained, "global_step": state.global_step,
        "stop_reason": state.stop_reason,
        "weights": [p.detach().flatten().tolist() for p in trainer.model.parameters()],
        "warnings": [str(w.message) for w in caught],
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


async def idle_stream_stopped(rank: int, world_size: int, out: str, kind: str, who: str) -> None:
    """Ranks whose streams give 3 batches, then wait for data that does not come (``kind``:
    an async generator sleeping, or a generator blocked on an event that is set 5 s after
    the stop), stopped once they wait: every rank (``who="all"``), or rank 0 while rank 1's
    stream goes on giving batches (``"rank0"``). Writes the steps, the batches trained, the
    seconds from the stop to the last step's end and the warnings to ``out/rank<r>.json``
    (a generator's thread blocked in it is waited for as the epoch ends: till its event)."""
    import threading
    import warnings

    from asynchat import Callback, LoopState

    flowing = who == "rank0" and rank == 1
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    released = threading.Event()

    def fed() -> Any:
        yield from batches
        while flowing:
            yield batches[0]
        released.wait()  # (data that comes too late)
        yield batches[0]

    async def fed_async() -> Any:
        for batch in fed() if flowing else batches:
            await anyio.sleep(0.02 if flowing else 0)
            yield batch
        await anyio.sleep_forever()

    trained: list[int] = []
    last_step_end = 0.0

    class Record(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            trained.append(state.global_step)

        def on_step_end(self, state: LoopState) -> None:
            nonlocal last_step_end
            last_step_end = time.monotonic()

    trainer = plain_trainer(
        data_loader=fed_async() if kind == "async" else fed(), num_epochs=1, callbacks=[Record()]
    )
    stopped_at = 0.0

    async def stop_once_waiting() -> None:
        nonlocal stopped_at
        # The third batch's step waits for the read of a fourth (is it the last?)
        while len(trained) < 2:  # noqa: ASYNC110 (the steps run on the compute thread)
            await anyio.sleep(0.02)
        await anyio.sleep(0.3)
        if who == "all" or rank == 0:
            stopped_at = time.monotonic()
            trainer.stop("enough")
        await anyio.sleep(5)
        released.set()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stop_once_waiting)
            await trainer.fit()
            released.set()
            tasks.cancel_scope.cancel()
    result = {
        "global_step": trainer.state.global_step, "trained": trained,
        "stop_reason": trainer.state.stop_reason,
        "took": last_step_end - stopped_at if stopped_at else None,
        "warnings": [str(w.message) for w in caught],
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
